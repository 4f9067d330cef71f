#!/usr/bin/env bash
# Installs the CUDA 13.0 toolchain the model server's `cuda` feature builds with, from NVIDIA's
# PyPI wheels, under ~/.cache/kiln/cuda-13.0.88-rN (once), and prints that directory. It is laid
# out as a CUDA root for CUDA_HOME: bin/nvcc, include, lib, lib64/stubs.
#
# No NVIDIA driver or GPU is needed to build: nvcc compiles candle's kernels for explicit compute
# capabilities, and the driver library the binary links against is a stub generated here (the
# node's driver, mounted by the NVIDIA container runtime, is what loads at run time). CUDA 13
# because its nvcc wheel is the first that ships nvcc itself (the 12.x wheels carry only ptxas);
# it needs an NVIDIA driver of the R580 series or later on the node.
#
# Compute capabilities: candle builds its kernels for the one CUDA_COMPUTE_CAP it is given. The
# PTX it embeds for compute 8.0 is compiled by the driver for any later GPU, but its statically
# linked kernels (the GGUF quantized matmuls) are machine code for exactly that GPU. bin/nvcc is
# therefore a wrapper that turns a machine-code compile's -gencode into one per capability in
# KILN_CUDA_ARCHS (default 80 86 89 90), plus PTX for 9.0 so later GPUs can still run it.
#
#   --check   print the directory if the toolchain is complete, else exit 1 (installs nothing)
set -euo pipefail
VERSION=13.0.88
# The revision changes whenever the layout below does, so an older cache is not reused.
DIR="${KILN_CACHE:-$HOME/.cache/kiln}/cuda-${VERSION}-r1"
CUDA="$DIR/site/nvidia/cu13"

complete() { [ -x "$DIR/bin/nvcc" ] && [ -f "$DIR/lib64/stubs/libcuda.so" ] && [ -f "$DIR/.complete" ]; }
if [ "${1:-}" = --check ]; then
  complete && { echo "$DIR"; exit 0; }
  exit 1
fi

if ! complete; then
  rm -rf "$DIR" && mkdir -p "$DIR"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # Pinned by digest: nvcc and its parts (crt headers, nvvm, cccl for cuda_fp16.h's <cuda/std>),
  # the runtime, and the libraries candle's CUDA backend links (cuBLAS, cuRAND, NVRTC).
  cat >"$tmp/requirements.txt" <<'REQUIREMENTS'
nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-nvrtc==13.0.88 --hash=sha256:ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
nvidia-cublas==13.0.2.14 --hash=sha256:0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c
nvidia-curand==10.4.0.35 --hash=sha256:1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc
REQUIREMENTS
  echo "cuda-toolchain.sh: installing the CUDA $VERSION wheels (about 800 MB) into $DIR" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --require-hashes --only-binary=:all: --target "$DIR/site" -r "$tmp/requirements.txt" >&2
  # The linker looks for unversioned names; the wheels ship only the sonames.
  for lib in cudart cublas cublasLt curand nvrtc; do
    so="$(cd "$CUDA/lib" && ls "lib${lib}.so."* | sort | head -n1)"
    ln -sfn "$so" "$CUDA/lib/lib${lib}.so"
  done
  ln -sfn site/nvidia/cu13/include "$DIR/include"
  ln -sfn site/nvidia/cu13/lib "$DIR/lib"

  # libcuda.so belongs to the driver, which no wheel ships: a stub with every driver entry point
  # cudarc declares satisfies the linker and records the soname libcuda.so.1.
  cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -n1)"
  if [ -z "$cudarc" ]; then
    echo "cuda-toolchain.sh: cudarc's sources are not in the cargo registry; run 'cargo fetch --locked' first" >&2
    exit 1
  fi
  mkdir -p "$DIR/lib64/stubs"
  grep -ohE '^pub unsafe fn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" \
    | sed -E 's/^pub unsafe fn ([A-Za-z0-9_]+)\(/int \1(void) { return 999; }/' | sort -u >"$tmp/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$DIR/lib64/stubs/libcuda.so" "$tmp/cuda_stub.c"

  mkdir -p "$DIR/bin"
  cat >"$DIR/bin/nvcc" <<WRAPPER
#!/usr/bin/env bash
# Written by scripts/cuda-toolchain.sh: nvcc with one -gencode per compute capability for
# machine-code compiles; PTX compiles (--ptx) pass through unchanged.
set -euo pipefail
ptx=0
for a in "\$@"; do [ "\$a" = --ptx ] && ptx=1; done
args=()
for a in "\$@"; do
  if [ \$ptx = 0 ] && [[ "\$a" == -gencode=* ]]; then
    for cap in \${KILN_CUDA_ARCHS:-80 86 89 90}; do args+=("-gencode=arch=compute_\$cap,code=sm_\$cap"); done
    args+=("-gencode=arch=compute_90,code=compute_90")
  else
    args+=("\$a")
  fi
done
exec "$CUDA/bin/nvcc" "\${args[@]}"
WRAPPER
  chmod +x "$DIR/bin/nvcc"
  "$DIR/bin/nvcc" --version | grep -q "release 13.0" \
    || { echo "cuda-toolchain.sh: $DIR/bin/nvcc is not CUDA 13.0" >&2; exit 1; }
  touch "$DIR/.complete"
fi
echo "$DIR"
