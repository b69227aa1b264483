"""Keep ExecuTorch's native log lines off the user's terminal while a program loads.

Loading a ``.pte`` logs from C++ (``[cpuinfo_utils.cpp:71] Reading file ...``,
``[threadpool.cpp:66] Resetting threadpool ...``; on some machines the cpuinfo
library's own ``Error in cpuinfo: ...``): the pybindings send ExecuTorch's log to
Python's ``sys.stderr``, the cpuinfo library writes to file descriptor 2.  Either
breaks the rule that an error is one line on stderr and clutters a normal run, so
both are caught during the load.  What was caught is kept, not dropped: a load that
fails names the runtime's own last line in its one-line error (``last_line``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from typing import Iterator

_SOURCE_TAG = re.compile(r"^\[[\w.]+:\d+\]\s*")      # "[program.cpp:114] " in front of each log line


@contextlib.contextmanager
def captured(lines: list[str]) -> Iterator[None]:
    """Run the block with ``sys.stderr`` and file descriptor 2 caught; the non-empty
    lines they got are appended to ``lines`` when the block ends (also on an error).
    Where descriptor 2 cannot be duplicated (closed), only ``sys.stderr`` is caught."""
    py = io.StringIO()
    with tempfile.TemporaryFile() as f:
        saved = _redirect_fd2(f.fileno())
        try:
            with contextlib.redirect_stderr(py):
                yield
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            f.seek(0)
            # descriptor 2's lines (cpuinfo) first: the last line is then ExecuTorch's own, if any
            text = f.read().decode("utf-8", "replace") + "\n" + py.getvalue()
            lines += [ln.strip() for ln in text.splitlines() if ln.strip()]


def _redirect_fd2(target: int) -> int | None:
    """Point descriptor 2 at ``target``; returns a duplicate of the old one (None: no fd 2)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        return None
    os.dup2(target, 2)
    return saved


def last_line(lines: list[str], limit: int = 200) -> str:
    """The runtime's last caught log line without its ``[file.cpp:N]`` tag ('' if none)."""
    return _SOURCE_TAG.sub("", lines[-1])[:limit] if lines else ""
