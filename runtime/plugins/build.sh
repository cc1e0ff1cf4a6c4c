#!/usr/bin/env bash
# Builds runtime/plugins/build/libmoe_llava_plugin.so (see README.md in this directory).
#   ./build.sh                                        # TensorRT found in the system include dirs (JetPack, .deb)
#   TENSORRT_ROOT=/opt/TensorRT-10.3 ./build.sh       # a TensorRT tarball
#   ./build.sh -DCMAKE_CUDA_ARCHITECTURES=87          # extra CMake arguments, e.g. only the Jetson's own GPU
set -euo pipefail
cd "$(dirname "$0")"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release ${TENSORRT_ROOT:+-DTENSORRT_ROOT="$TENSORRT_ROOT"} "$@"
cmake --build build -j"$(nproc)"
echo "built $(pwd)/build/libmoe_llava_plugin.so"
