//! \file prefixkv/prefixkv.hpp
//! Everything a plain C++17 compiler can use: the error model, workspaces, views and their validation, and
//! (as the pipeline's stages land) the solver, host twins, profiles and the .npy reader.
//! For device code as well, include `prefixkv/prefixkv.cuh` from a CUDA translation unit.
#pragma once

#include "core/config.hpp"
#include "core/error.hpp"
#include "core/validate.hpp"
#include "core/views.hpp"
#include "core/workspace.hpp"
#include "core/numeric.hpp"
#include "curve/curve.hpp"
#include "score/score.hpp"
#include "select/selection.hpp"
#include "select/select.hpp"
#include "solve/solve.hpp"
#include "compact/compact.hpp"
#include "compress/compress.hpp"
#include "decode/decode.hpp"
#include "profile/profile.hpp"
#include "io/npy.hpp"
#include "io/json.hpp"
