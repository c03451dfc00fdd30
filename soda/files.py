"""Writing a file so that a reader, or a restart after a crash, sees the old file or the new one,
never part of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object], fsync: bool = False) -> None:
    """`write(handle)` fills a temporary file in `path`'s folder (named `.<name>.*.tmp`), which
    then replaces `path`. On any failure the temporary file is removed and `path` is unchanged.
    A write the operating system refuses (full disk, quota, `ulimit -f`, read-only folder) is
    raised as its OSError, also where the writer hid it: torch.save reports a failed write as
    RuntimeError "unexpected pos ...", with the OSError only as that error's context. A Ctrl-C
    or SIGTERM that torch.save hid the same way is raised as what it is.
    The file keeps the mode it had, or gets the one open() gives a new file (mkstemp's private
    0600 would otherwise become the file's)."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            write(handle)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        refused = _cause(error)
        if refused is None or refused is error:
            raise
        raise refused from None


def _cause(error: BaseException | None) -> BaseException | None:
    """The OSError, or the stop from outside (Ctrl-C, SIGTERM), that `error` hides, if any."""
    from soda.errors import Terminated

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        if isinstance(error, KeyboardInterrupt | Terminated):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
