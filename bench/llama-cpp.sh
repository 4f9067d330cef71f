#!/usr/bin/env bash
# Builds llama.cpp's llama-server (the baseline of the text-generation benchmark) from the
# llama.cpp tree vendored in the llama-cpp-python sdist on the package registry, cached by
# version under ~/.cache/kiln. Prints the binary's path on its last line.
#   LLAMA_CPP_PYTHON_VERSION   sdist version (default below)
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
# -noamx: see the cmake line; a new key so an earlier build with AMX is not reused.
DIR="$CACHE/llama.cpp-python-$VERSION-noamx"
BIN="$DIR/build/bin/llama-server"

if [[ -x "$BIN" && -f "$DIR/.complete" ]]; then
  echo "$BIN"
  exit 0
fi
for tool in cmake c++ python3; do
  command -v "$tool" >/dev/null || { echo "llama-cpp.sh: '$tool' is required to build llama-server" >&2; exit 1; }
done
echo "llama-cpp.sh: building llama-server from llama-cpp-python==$VERSION (a few minutes on 2 cores)" >&2
rm -rf "$DIR"
mkdir -p "$DIR"
python3 -m pip download --quiet --no-deps --no-binary :all: --disable-pip-version-check -d "$DIR" \
  "llama-cpp-python==$VERSION" >&2
tar xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
src="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
# Native CPU flags (AVX2/FMA, AVX-512 where the machine has them), as a user building llama.cpp
# would. No web UI: neither its npm build nor the prebuilt assets it would otherwise fetch from
# outside the package registries (the benchmark talks to the HTTP API only). No AMX tiles: on
# the Sapphire Rapids development VM ggml's AMX kernel for Q4_1 (tinygemm_kernel_amx) dies with
# SIGILL at the first matmul although the CPU and kernel allow AMX; Kiln has no AMX kernels
# either, so both sides run AVX-512 VNNI. (GCC lets -mno-* win over -march=native.)
cmake -S "$src" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
  -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2
cmake --build "$DIR/build" --target llama-server -j "$(nproc)" >&2
touch "$DIR/.complete"
echo "$BIN"
