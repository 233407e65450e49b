// The demo with the GPU backend: demo.cpp compiled by nvcc, running the host pipeline and then the same
// pipeline on the device (examples/demo_gpu_pipeline.cuh), and checking they agree.
#define PREFIXKV_DEMO_GPU 1
#include "demo.cpp"
