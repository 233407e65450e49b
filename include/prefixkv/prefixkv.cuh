//! \file prefixkv/prefixkv.cuh
//! All of prefixkv, device entry points included. Include from CUDA translation units (nvcc).
#pragma once

#include "prefixkv.hpp"

#include "core/launch.cuh"
#include "score/score.cuh"
#include "curve/curve.cuh"
#include "solve/solve.cuh"
#include "select/select.cuh"
#include "compact/compact.cuh"
