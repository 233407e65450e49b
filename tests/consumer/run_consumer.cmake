# Builds a tiny external project against prefixkv in one of three ways (MODE):
#   install       — install prefixkv to a temporary prefix, then find_package(prefixkv CONFIG REQUIRED)
#   subdirectory  — add_subdirectory(<prefixkv source>)
#   include       — no CMake at all: the compiler with -I<prefixkv>/include
# and runs the result. Invoked by ctest with -P.
cmake_minimum_required(VERSION 3.25)
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(app_src "${SOURCE_DIR}/tests/consumer/app")

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

if(MODE STREQUAL "install")
  # Configure prefixkv alone (no tests/benchmarks/examples), install it, consume it.
  run(${CMAKE_COMMAND} -S "${SOURCE_DIR}" -B "${WORK_DIR}/pkv" -G "${GENERATOR}"
      -DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix -DPREFIXKV_BUILD_TESTS=OFF -DPREFIXKV_BUILD_BENCHMARKS=OFF
      -DPREFIXKV_BUILD_EXAMPLES=OFF -DPREFIXKV_ENABLE_CUDA=OFF)
  run(${CMAKE_COMMAND} --install "${WORK_DIR}/pkv")
  run(${CMAKE_COMMAND} -S "${app_src}" -B "${WORK_DIR}/app" -G "${GENERATOR}"
      -DCONSUME=find_package -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
elseif(MODE STREQUAL "subdirectory")
  run(${CMAKE_COMMAND} -S "${app_src}" -B "${WORK_DIR}/app" -G "${GENERATOR}"
      -DCONSUME=subdirectory -DPREFIXKV_SOURCE_DIR=${SOURCE_DIR})
elseif(MODE STREQUAL "include")
  run(${CXX} -std=c++17 -I${SOURCE_DIR}/include "${app_src}/main.cpp" -o "${WORK_DIR}/app_bin")
  run("${WORK_DIR}/app_bin")
  return()
else()
  message(FATAL_ERROR "unknown MODE ${MODE}")
endif()
run(${CMAKE_COMMAND} --build "${WORK_DIR}/app")
run("${WORK_DIR}/app/app")
