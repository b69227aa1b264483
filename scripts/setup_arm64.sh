#!/usr/bin/env bash
# Tools for the ARM64 tier of runtime_tests and `dijiang-export bench DIR --native aarch64`
# (docs/arm64.md), on Debian 12 x86_64 as root.  Idempotent and quiet when done.
#
#   qemu-user 10 from bookworm-backports   Debian 12's qemu 7.2 crashes onnxruntime and
#                                          computes wrong XNNPACK int8 results
#   g++-aarch64-linux-gnu, g++, valgrind   build export/runner (the C++ .pte runner) for
#                                          aarch64 and x86_64; callgrind counts x86 instructions
#   $DIJIANG_ARM64_ROOT/sysroot            arm64 Debian libc + Python 3.11 (run under qemu)
#   $DIJIANG_ARM64_ROOT/site               aarch64 wheels: executorch (libs + headers the
#                                          runner links), onnxruntime, numpy
set -euo pipefail
ROOT=${DIJIANG_ARM64_ROOT:-$HOME/.cache/dijiang_edge/arm64}
PY=${PYTHON:-python3}
EXECUTORCH=1.5.1
ONNXRUNTIME=1.32.0
NUMPY=$($PY -c 'import numpy; print(numpy.__version__)' 2>/dev/null || echo 2.4.6)
export DEBIAN_FRONTEND=noninteractive

qemu_major() { qemu-aarch64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1; }

# 1. qemu-user >= 10 (backports: the source is added for it; apt's default priority for
#    backports is 100, so nothing else is upgraded from it) and the cross compiler.
updated=0
if [ "$(qemu_major || true)" = "" ] || [ "$(qemu_major)" -lt 10 ]; then
  src=/etc/apt/sources.list.d/bookworm-backports.sources
  if [ ! -f "$src" ]; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$src"
  fi
  apt-get update -qq >/dev/null; updated=1
  apt-get install -y -qq -t bookworm-backports qemu-user >/dev/null
  m=$(qemu_major || true)
  if [ -z "$m" ] || [ "$m" -lt 10 ]; then
    echo "setup_arm64: qemu-aarch64 is version '${m:-none}' after installing from bookworm-backports; need >= 10" >&2
    exit 1
  fi
fi
need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v g++ >/dev/null || need+=(g++)                 # the x86_64 runner
command -v valgrind >/dev/null || need+=(valgrind)       # x86_64 instruction counts (callgrind)
if [ ${#need[@]} -gt 0 ]; then
  [ $updated = 1 ] || { apt-get update -qq >/dev/null; updated=1; }
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

# 2. An arm64 sysroot with Python 3.11 (Debian's own packages, unpacked, not installed).
SYSROOT=$ROOT/sysroot
ARM_DEBS=(libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libbz2-1.0 liblzma5 libssl3
          libuuid1 libcrypt1 libtinfo6 libncursesw6 libsqlite3-0 libtirpc3
          libnsl2 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2
          libkeyutils1 libdb5.3 libreadline8 media-types
          python3.11-minimal libpython3.11-minimal libpython3.11-stdlib)
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    updated=0
  fi
  [ $updated = 1 ] || apt-get update -qq >/dev/null
  debs=$(mktemp -d); chmod 755 "$debs"       # apt's _apt user downloads into it
  (cd "$debs" && apt-get download -qq $(printf '%s:arm64 ' "${ARM_DEBS[@]}" | sed 's/media-types:arm64/media-types/') >/dev/null)
  mkdir -p "$SYSROOT.tmp"
  for d in "$debs"/*.deb; do dpkg -x "$d" "$SYSROOT.tmp"; done
  $PY -m compileall -q -j 0 "$SYSROOT.tmp/usr/lib/python3.11" >/dev/null 2>&1 || true
  rm -rf "$debs" "$SYSROOT"
  mv "$SYSROOT.tmp" "$SYSROOT"
fi

# 3. aarch64 wheels, unpacked (not installed: the host Python is x86_64).
SITE=$ROOT/site
stamp="executorch==$EXECUTORCH onnxruntime==$ONNXRUNTIME numpy==$NUMPY"
if [ "$(cat "$SITE/.wheels" 2>/dev/null)" != "$stamp" ]; then
  whl=$(mktemp -d)
  $PY -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 \
    --python-version 3.11 --implementation cp -d "$whl" $stamp 2> >(grep -v '^WARNING: Location' >&2)
  rm -rf "$SITE.tmp"; mkdir -p "$SITE.tmp"
  for w in "$whl"/*.whl; do $PY -m zipfile -e "$w" "$SITE.tmp"; done
  # Bytecode compiled here (same 3.11 magic): the emulated Python then imports in seconds.
  $PY -m compileall -q -j 0 "$SITE.tmp" >/dev/null 2>&1 || true
  echo "$stamp" > "$SITE.tmp/.wheels"
  rm -rf "$whl" "$SITE"
  mv "$SITE.tmp" "$SITE"
fi

# 4. Smoke test (once per set of wheels): the emulated Python imports onnxruntime.
if [ "$(cat "$ROOT/.checked" 2>/dev/null)" != "$stamp" ]; then
  if ! qemu-aarch64 -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" -c \
       "import sys; sys.path.insert(0, '$SITE'); import numpy, onnxruntime" >/dev/null 2>&1; then
    echo "setup_arm64: the emulated arm64 Python cannot import onnxruntime from $SITE" >&2
    exit 1
  fi
  echo "$stamp" > "$ROOT/.checked"
fi
