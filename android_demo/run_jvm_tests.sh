#!/usr/bin/env bash
# Compiles the app's Android-free logic (app/src/main/java/.../core) and its JUnit tests
# with kotlinc, then runs them on the JVM: the part of the app these machines can check
# (no Android SDK, no Gradle/Maven downloads). Exits non-zero on any failure.
# Without kotlin/junit4 it skips (exit 0) on a developer machine, but fails under CI=...
set -euo pipefail
cd "$(dirname "$0")"

CORE=app/src/main/java/org/dijiang/demo/core
TESTS=app/src/test/java/org/dijiang/demo/core
JUNIT=${JUNIT_JAR:-/usr/share/java/junit4.jar}
HAMCREST=${HAMCREST_JAR:-/usr/share/java/hamcrest-core.jar}

missing=""
command -v kotlinc >/dev/null 2>&1 || missing="kotlinc"
[ -f "$JUNIT" ] || missing="$missing $JUNIT"
[ -f "$HAMCREST" ] || missing="$missing $HAMCREST"
if [ -n "$missing" ]; then
  if [ -z "${CI:-}" ]; then
    echo "SKIP: android_demo JVM tests need$missing (Debian: apt-get install kotlin junit4; scripts/setup.sh installs them)"
    exit 0
  fi
  echo "ERROR: CI is set but$missing is missing: run scripts/setup.sh" >&2
  exit 1
fi

BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
# Debian's kotlinc 1.3 launcher passes -noverify, which JDK 13+ warns about on every run.
quiet() { grep -v -e '-noverify were deprecated' >&2 || true; }

echo "compiling $(ls $CORE/*.kt | wc -l) core and $(ls $TESTS/*.kt | wc -l) test files with $(kotlinc -version 2>&1 | grep -o 'kotlinc-jvm [^ ]*')"
kotlinc -nowarn -include-runtime -cp "$JUNIT:$HAMCREST" -d "$BUILD/tests.jar" \
  "$CORE"/*.kt "$TESTS"/*.kt jvm-tests/RunJvmTests.kt 2> >(quiet)

classes=$(cd "$TESTS" && ls *Test.kt | sed 's/\.kt$//; s/^/org.dijiang.demo.core./')
# shellcheck disable=SC2086  # one argument per class
java -cp "$BUILD/tests.jar:$JUNIT:$HAMCREST" org.dijiang.demo.jvmtests.RunJvmTestsKt $classes
