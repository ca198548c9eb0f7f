#!/usr/bin/env bash
# Source this to build altformers with `--features cuda` on a machine without a CUDA toolkit:
#   source scripts/cuda-env.sh     (scripts/gpu-package.sh does this and builds)
# It installs the CUDA 13.0 compiler and headers from PyPI into a cache folder (once),
# exports the variables candle's build needs, and prepares a patched copy of candle-core
# whose cudarc dependency loads the CUDA libraries at run time ("dynamic-loading") instead
# of linking them ("dynamic-linking"), so nothing from CUDA is needed at link time, and whose
# backward stores a node's first gradient instead of adding it to zeros. Nothing from candle
# is committed: the copy lives in the ignored folder .cuda-build/.
set -u
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ALTFORMERS_CUDA_CACHE:-$HOME/.cache/altformers-cuda}"
mkdir -p "$CACHE"
if [ ! -x "$CACHE/cuda13/nvidia/cu13/bin/nvcc" ]; then
  echo "cuda-env: installing CUDA 13.0 nvcc and headers from PyPI into $CACHE/cuda13" >&2
  python3 -m pip install -q --target "$CACHE/cuda13" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 || { echo "cuda-env: pip install failed" >&2; return 1 2>/dev/null || exit 1; }
fi
mkdir -p "$CACHE/cudart-static"
ln -sf "$CACHE/cuda13/nvidia/cu13/lib/libcudart_static.a" "$CACHE/cudart-static/libcudart.so"
export CUDA_ROOT="$CACHE/cuda13/nvidia/cu13" CUDA_PATH="$CACHE/cuda13/nvidia/cu13" CUDA_HOME="$CACHE/cuda13/nvidia/cu13"
export PATH="$CUDA_ROOT/bin:$PATH" CUDA_COMPUTE_CAP=90 LIBRARY_PATH="$CACHE/cudart-static${LIBRARY_PATH:+:$LIBRARY_PATH}"
# nvcc's own include path for the cccl headers (cuda_bf16.h includes nv/target)
export NVCC_PREPEND_FLAGS="-I$CUDA_ROOT/include ${NVCC_PREPEND_FLAGS:-}"

# The candle-core patches: dynamic-loading instead of dynamic-linking, and the first gradient
# of a node stored rather than added to zeros (scripts/patch-candle-autograd.py says why).
_ver=$(grep -A1 'name = "candle-core"' "$_root/Cargo.lock" | sed -n 's/version = "\(.*\)"/\1/p' | head -1)
_patched="$_root/.cuda-build/candle-core-$_ver"
if [ ! -f "$_patched/Cargo.toml" ]; then
  (cd "$_root" && cargo fetch -q) || true
  _src=$(ls -d "$HOME"/.cargo/registry/src/*/candle-core-"$_ver" 2>/dev/null | head -1)
  if [ -z "$_src" ]; then echo "cuda-env: candle-core $_ver not found in the cargo registry" >&2; return 1 2>/dev/null || exit 1; fi
  mkdir -p "$_root/.cuda-build"
  cp -r "$_src" "$_patched"
  sed -i 's/"dynamic-linking"/"dynamic-loading"/g' "$_patched/Cargo.toml"
  grep -q '"dynamic-loading"' "$_patched/Cargo.toml" || { echo "cuda-env: could not patch $_patched/Cargo.toml" >&2; return 1 2>/dev/null || exit 1; }
fi
# The autograd patch: a node's first gradient is stored, not added to zeros (idempotent).
python3 "$_root/scripts/patch-candle-autograd.py" "$_patched/src/backprop.rs" >&2 || { return 1 2>/dev/null || exit 1; }
export ALTFORMERS_CANDLE_PATCH="$_patched"
echo "cuda-env: ready (CUDA_ROOT=$CUDA_ROOT, patched candle-core in $_patched); scripts/gpu-package.sh builds with it" >&2
