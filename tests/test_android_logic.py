"""The Android demo's model-facing logic (android_demo/app/src/main/java/.../core): its
JUnit tests, compiled with kotlinc and run on the JVM by android_demo/run_jvm_tests.sh."""

import os
import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "android_demo" / "run_jvm_tests.sh"


def _run(env_extra: dict, drop: tuple = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)


def test_kotlin_logic_unit_tests_pass():
    res = _run({})
    out = res.stdout + res.stderr
    if res.returncode == 0 and out.startswith("SKIP:"):
        pytest.skip(out.strip())
    assert res.returncode == 0, out
    m = re.search(r"(\d+) passed, (\d+) failed", out)
    assert m, out
    assert int(m.group(1)) >= 30 and int(m.group(2)) == 0, out


def test_missing_toolchain_skips_locally_but_fails_in_ci():
    missing = {"JUNIT_JAR": "/nonexistent/junit4.jar"}
    local = _run(missing, drop=("CI",))
    assert local.returncode == 0 and local.stdout.startswith("SKIP:"), local.stdout + local.stderr
    ci = _run({**missing, "CI": "1"})
    assert ci.returncode != 0 and "ERROR" in ci.stderr, ci.stdout + ci.stderr
