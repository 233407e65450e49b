"""Build (just in time) and load the prefixkv_torch extension from the source tree.

The C++ sources live in ``csrc/`` next to this file and prefixkv's headers in ``<repo>/include``. The first
``load()`` in a fresh build directory compiles them with ``torch.utils.cpp_extension.load`` (ninja); later loads
reuse the build. CUDA sources are compiled only when PyTorch was built with CUDA and ``nvcc`` is found
(``PREFIXKV_TORCH_CUDA=0`` forces a CPU-only build).

Environment:
  PREFIXKV_TORCH_BUILD_DIR  where to build (default: ``<repo>/build-python/<variant>``, else torch's default)
  PREFIXKV_TORCH_CUDA       ``0`` = never compile the CUDA sources
  PREFIXKV_TORCH_VERBOSE    ``1`` = show the compiler commands
  MAX_JOBS                  parallel compile jobs (ninja)
"""

import os
import shutil

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.join(_HERE, "csrc")
_REPO = os.path.abspath(os.path.join(_HERE, "..", ".."))
_INCLUDE = os.path.join(_REPO, "include")

_module = None


def _cuda_wanted():
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("PREFIXKV_TORCH_CUDA", "1") == "0":
        return False
    if torch.version.cuda is None:
        return False
    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    return bool(nvcc and os.path.exists(nvcc)) or shutil.which("nvcc") is not None


def _build_dir(variant):
    import torch

    d = os.environ.get("PREFIXKV_TORCH_BUILD_DIR")
    if not d:
        d = os.path.join(_REPO, "build-python", "torch-%s-%s" % (torch.__version__.split("+")[0], variant))
    os.makedirs(d, exist_ok=True)
    return d


def load():
    """Compile (if needed) and import the extension; returns the Python module (ops are under torch.ops.prefixkv)."""
    global _module
    if _module is not None:
        return _module
    import torch  # (the ops register with this torch)
    from torch.utils import cpp_extension

    cuda = _cuda_wanted()
    variant = "cuda" if cuda else "cpu"
    sources = [os.path.join(_CSRC, "ops.cpp")]
    # PyTorch 1.x builds extensions as C++14; prefixkv needs C++17 (PyTorch 2 defaults to C++17 or newer: kept)
    std = ["-std=c++17"] if int(torch.__version__.split(".")[0]) < 2 else []
    cflags = ["-O2", "-Wno-unused-function"] + std
    cuda_flags = []
    if cuda:
        sources += [os.path.join(_CSRC, f) for f in
                    ("stages_cuda.cu", "compress_f32.cu", "compress_f16.cu", "compress_bf16.cu")]
        cflags.append("-DPKV_TORCH_CUDA")
        cuda_flags = ["-O2", "-DPKV_TORCH_CUDA", "--expt-relaxed-constexpr", "-lineinfo",
                      "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                      "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"] + std
    _module = cpp_extension.load(
        name="prefixkv_torch_" + variant,
        sources=sources,
        extra_include_paths=[_INCLUDE, _CSRC],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        with_cuda=cuda,
        build_directory=_build_dir(variant),
        verbose=os.environ.get("PREFIXKV_TORCH_VERBOSE", "0") == "1",
    )
    return _module
