#!/usr/bin/env bash
# Builds the CUDA binary, strips and compresses it into .gpu/ (ignored by git) for the
# device tool's `carry`, and writes .gpu/run.sh, which unpacks it on the GPU machine and
# points the loader at the CUDA 13 libraries of that machine's PyTorch.
#   scripts/gpu-package.sh            # then carry ".gpu" and run: bash .gpu/run.sh <args>
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source scripts/cuda-env.sh
# The patch changes Cargo.lock's record of candle-core: keep the committed one.
cp Cargo.lock .cuda-build/Cargo.lock.orig
trap 'cp .cuda-build/Cargo.lock.orig Cargo.lock' EXIT
# The commit the binary reports in its results (+dirty: built with uncommitted changes).
commit=$(git rev-parse --short=12 HEAD)
[ -n "$(git status --porcelain --untracked-files=no)" ] && commit="$commit+dirty"
ALTFORMERS_COMMIT=$commit CARGO_TARGET_DIR=target/cuda \
  cargo build --release --features cuda -p altformers-cli \
  --config "patch.crates-io.candle-core.path=\"$ALTFORMERS_CANDLE_PATCH\""
# The GPU tests (crates/altformers/tests/cuda/: fused kernels against the CPU reference), one
# binary. They run on the GPU machine with .gpu/run-tests.sh.
mkdir -p .gpu/tests
rm -f .gpu/tests/*
exe=$(ALTFORMERS_COMMIT=$commit CARGO_TARGET_DIR=target/cuda \
  cargo test --release --features cuda -p altformers --test cuda --no-run --message-format=json \
  --config "patch.crates-io.candle-core.path=\"$ALTFORMERS_CANDLE_PATCH\"" \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
cp "$exe" .gpu/tests/cuda
strip .gpu/tests/cuda
xz -T2 -6 -f .gpu/tests/cuda
cp target/cuda/release/altformers .gpu/altformers
strip .gpu/altformers
xz -T2 -6 -f .gpu/altformers
cat > .gpu/run.sh <<'RUN'
#!/usr/bin/env bash
# On the GPU machine: unpack the carried binary once, find CUDA's libraries, run it. The
# unpacked copy is named by the archive's checksum: a machine kept warm between calls, or two
# packages in one call (an A/B), never runs a stale binary.
set -e
here="$(cd "$(dirname "$0")" && pwd)"
bin=/tmp/altformers-$(cksum < "$here/altformers.xz" | cut -d' ' -f1)
if [ ! -x "$bin" ]; then
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$here/altformers.xz" "$bin.part"
  chmod +x "$bin.part"
  mv "$bin.part" "$bin"
fi
NVLIB=$(python3 -c "import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],'cu13','lib'))")
# NCCL (data-parallel training): PyTorch's wheel carries libnccl.so.2, which cudarc looks
# for as libnccl.so
NCCL_SO=$(ls "$(dirname "$NVLIB")"/../*/lib/libnccl.so* "$NVLIB"/libnccl.so* 2>/dev/null | head -1)
if [ -n "$NCCL_SO" ]; then mkdir -p /tmp/altformers-nccl && ln -sf "$NCCL_SO" /tmp/altformers-nccl/libnccl.so; fi
export LD_LIBRARY_PATH="$NVLIB:/tmp/altformers-nccl:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
exec "$bin" "$@"
RUN
chmod +x .gpu/run.sh
cat > .gpu/run-tests.sh <<'RUN'
#!/usr/bin/env bash
# On the GPU machine: unpack and run every carried GPU test binary; non-zero if any fails.
here="$(cd "$(dirname "$0")" && pwd)"
NVLIB=$(python3 -c "import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],'cu13','lib'))")
# NCCL (data-parallel training): PyTorch's wheel carries libnccl.so.2, which cudarc looks
# for as libnccl.so
NCCL_SO=$(ls "$(dirname "$NVLIB")"/../*/lib/libnccl.so* "$NVLIB"/libnccl.so* 2>/dev/null | head -1)
if [ -n "$NCCL_SO" ]; then mkdir -p /tmp/altformers-nccl && ln -sf "$NCCL_SO" /tmp/altformers-nccl/libnccl.so; fi
export LD_LIBRARY_PATH="$NVLIB:/tmp/altformers-nccl:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
rc=0
for t in "$here"/tests/*.xz; do
  exe=/tmp/$(basename "$t" .xz)
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$t" "$exe"
  chmod +x "$exe"
  echo "== $(basename "$exe")"
  "$exe" --test-threads 1 "$@" || rc=1
done
exit $rc
RUN
chmod +x .gpu/run-tests.sh
ls -la .gpu
