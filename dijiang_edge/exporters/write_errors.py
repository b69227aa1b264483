"""A write that fails because the disk is full or the folder is read-only is the
user's environment, not a bug: one line (``DiJiangError``), not a traceback.

Writers report it in two ways: Python's own files raise ``OSError`` with an errno;
the Rust writers (safetensors, tokenizers) raise their own error types whose text
ends in ``(os error N)``.  Both are read here; anything else is left as it is.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from ..errors import DiJiangError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_ONLY = {errno.EROFS}
DENIED = {errno.EACCES, errno.EPERM}        # only for a file inside the output being written
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def error_number(e: BaseException) -> int | None:
    """The errno behind ``e``: an ``OSError``'s, or the one a Rust I/O error names."""
    if isinstance(e, OSError):
        return e.errno
    m = _RUST_OS_ERROR.search(str(e))
    return int(m.group(1)) if m else None


def write_failure(e: BaseException, out: Path, scratch: Path) -> DiJiangError | None:
    """The one-line error for a failed write of ``out`` (through ``scratch``), or None
    when ``e`` is not a full disk or an unwritable folder."""
    code = error_number(e)
    name = getattr(e, "filename", None)
    where = f" ({name})" if name else ""
    if code in NO_SPACE:
        return DiJiangError(f"no space left on the disk while writing {out}{where}: {os.strerror(code)}; "
                            f"nothing was kept: free some space or choose another --out")
    inside = bool(name) and Path(os.path.abspath(name)).is_relative_to(scratch)
    if code in READ_ONLY or (code in DENIED and inside):
        return DiJiangError(f"cannot write {out}: {out.parent} is not writable ({os.strerror(code)}); "
                            f"nothing was kept: choose another --out")
    return None


def check_writable(out: Path) -> None:
    """Refuse an ``out`` whose nearest existing parent folder cannot be written, before
    the expensive work (``os.access``: a read-only mount, or a folder without write
    permission for this user; root may write anywhere but a read-only mount)."""
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise DiJiangError(f"cannot write {out}: {parent} is not writable (read-only or no permission); "
                           f"choose another --out")
