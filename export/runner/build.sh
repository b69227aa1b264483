#!/usr/bin/env bash
# Build pte_runner for x86_64 (native) or aarch64 (cross, g++-aarch64-linux-gnu) against
# the ExecuTorch runtime inside the executorch wheel of that platform:
#   x86_64   the installed wheel (python3 -c 'import executorch')
#   aarch64  the aarch64 wheel unpacked by scripts/setup_arm64.sh ($DIJIANG_ARM64_ROOT/site)
# Output: build/runner/ARCH/ holding pte_runner and the ExecuTorch libraries it loads
# (RUNPATH $ORIGIN): copy that folder to the device and run it there.
# Rebuilds only when the source or the libraries changed.  Usage: build.sh [x86_64|aarch64] [OUTDIR]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ARCH=${1:-x86_64}
OUT=${2:-$HERE/../../build/runner/$ARCH}
case "$ARCH" in
  x86_64)
    CXX=${CXX:-g++}
    ET=$(${PYTHON:-python3} -c 'import executorch, os; print(list(executorch.__path__)[0])' 2>/dev/null) ||
      { echo "build.sh: executorch is not installed for ${PYTHON:-python3}: pip install executorch" >&2; exit 2; } ;;
  aarch64)
    CXX=${CXX_AARCH64:-aarch64-linux-gnu-g++}
    ET=${DIJIANG_ARM64_ROOT:-$HOME/.cache/dijiang_edge/arm64}/site/executorch
    command -v "$CXX" >/dev/null ||
      { echo "build.sh: $CXX not found: run bash scripts/setup_arm64.sh" >&2; exit 2; } ;;
  *) echo "build.sh: unknown arch '$ARCH' (x86_64 or aarch64)" >&2; exit 2 ;;
esac
LIBS=(executorch executorch_threadpool executorch_backend_xnnpack executorch_kernels_optimized
      executorch_kernels_quantized)
for l in "${LIBS[@]}"; do
  [ -f "$ET/lib/lib$l.so" ] ||
    { echo "build.sh: $ET/lib/lib$l.so is missing (executorch wheel for $ARCH; for aarch64 run bash scripts/setup_arm64.sh)" >&2; exit 2; }
done
BIN=$OUT/pte_runner
mkdir -p "$OUT"
exec 9>"$OUT/.build.lock"; flock 9          # concurrent callers (tests, check) build once
if [ -x "$BIN" ] && [ "$BIN" -nt "$HERE/pte_runner.cpp" ] && [ "$BIN" -nt "$HERE/build.sh" ] &&
   [ "$BIN" -nt "$ET/lib/libexecutorch.so" ]; then
  exit 0
fi
for l in "${LIBS[@]}"; do     # replaced by rename, never rewritten: a running runner maps them
  cmp -s "$ET/lib/lib$l.so" "$OUT/lib$l.so" || { cp "$ET/lib/lib$l.so" "$OUT/.lib$l.so.tmp"; mv -f "$OUT/.lib$l.so.tmp" "$OUT/lib$l.so"; }
done
# --no-as-needed: the backend and kernel libraries are linked for their static
# registrations, not for symbols the runner calls.
"$CXX" -std=c++17 -O2 -g -Wno-deprecated-declarations -D C10_USING_CUSTOM_GENERATED_MACROS -I "$ET/include" -I "$ET/include/executorch/runtime/core/portable_type/c10" \
  "$HERE/pte_runner.cpp" -o "$BIN.tmp.$$" -L "$OUT" -Wl,--no-as-needed $(printf -- '-l%s ' "${LIBS[@]}") \
  -Wl,--as-needed -Wl,-rpath,'$ORIGIN' -lpthread
mv -f "$BIN.tmp.$$" "$BIN"
