"""Files the package ships beside its code: the device profiles (``export/profiles``)
and the C++ ``.pte`` runner's sources (``export/runner``).

They are edited in the checkout's ``export/`` folder; a wheel carries a copy as the
package data ``dijiang_edge/_export/`` (pyproject.toml maps ``export/`` there), so a
non-editable install keeps ``--target`` and the native tiers. A checkout (or an editable
install of one) uses ``export/`` itself, so an edit there takes effect without a rebuild.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent                       # the repository root, when this is a checkout


def in_checkout() -> bool:
    """Whether the package runs from a source tree (pyproject.toml and export/ beside it)."""
    return (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "export").is_dir()


def shipped(name: str) -> Path:
    """``export/NAME`` of the checkout, else the installed package's copy of it."""
    if in_checkout():
        return CHECKOUT / "export" / name
    return Path(str(files("dijiang_edge").joinpath("_export", name)))


def build_root() -> Path:
    """Where the native runner is built: ``build/runner`` of a checkout, else a per-user
    cache (an installed package's folder may not be writable); ``$DIJIANG_RUNNER_BUILD``
    overrides both."""
    if os.environ.get("DIJIANG_RUNNER_BUILD"):
        return Path(os.environ["DIJIANG_RUNNER_BUILD"])
    if in_checkout():
        return CHECKOUT / "build" / "runner"
    return Path.home() / ".cache" / "dijiang_edge" / "runner"
