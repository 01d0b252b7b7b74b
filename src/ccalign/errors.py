"""Failures the user acts on rather than debugs, and the one place that words them.

:func:`describe` turns such an exception (found anywhere in its cause/context chain) into one line: a full
disk (with the directory and the bytes needed), an output another process is writing (with its host and
pid), a download that failed (with the artifact and the URL). The CLI prints that line instead of a traceback.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

# errno values that mean "the file system will not take these bytes"
NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
TOO_LARGE = errno.EFBIG  # a file size limit (``ulimit -f``) or the file system's maximum file size
RESUME = "run the same command again to resume (finished work is kept)"


class ReportedError(Exception):
    """An error whose message already says what happened, where, and what to do: shown as one line."""


class DiskFullError(ReportedError):
    """A write into ``directory`` failed for lack of space (or a file size limit)."""

    def __init__(
        self,
        directory: str | os.PathLike | None,
        *,
        target: str | None = None,
        needed: int | None = None,
        written: int | None = None,
        reason: int = errno.ENOSPC,
    ) -> None:
        self.directory = None if directory is None else Path(directory)
        self.needed, self.written, self.reason = needed, written, reason
        where = f"in {self.directory}" if self.directory is not None else "(directory unknown)"
        what = f"writing {target}" if target else "a write"
        if needed is not None:
            what += f" needs at least {human_bytes(needed)}"
        elif written:
            what += f" failed after {human_bytes(written)}"
        if reason == TOO_LARGE:
            message = (
                f"file too large {where}: {what}, more than a file size limit (`ulimit -f`) or the file "
                f"system allows; raise the limit or write elsewhere, then {RESUME}"
            )
        else:
            free = None if self.directory is None else free_bytes(self.directory)
            have = f", {human_bytes(free)} free" if free is not None else ""
            message = (
                f"{NO_SPACE.get(reason, NO_SPACE[errno.ENOSPC])} {where}: {what}{have}; free some space, "
                f"then {RESUME}"
            )
        super().__init__(message)


class OutputBusyError(ReportedError):
    """Another process holds the lock of an output (``ccalign.io.output_lock``)."""

    def __init__(self, path: str | os.PathLike, holder: str) -> None:
        self.path, self.holder = Path(path), holder
        super().__init__(
            f"{self.path} is being written by another process ({holder}); wait for it to finish, "
            "or stop it and run the same command again"
        )


def human_bytes(n: int) -> str:
    """``123456789`` → ``"123456789 bytes (118 MiB)"``: exact, with a readable size beside it."""
    size, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} bytes" if unit == "bytes" else f"{n} bytes ({size:.3g} {unit})"


def free_bytes(directory: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer can still put in ``directory``'s file system (None if unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its ``__cause__`` or ``__context__``, and so on (each exception once)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def space_errno(exc: BaseException, directory: str | os.PathLike | None = None) -> int | None:
    """The no-space / quota / file-too-large errno in ``exc``'s chain; with ``directory``, also ENOSPC for a
    failed write into a file system with no space left (numpy and torch report some short writes without
    an errno)."""
    for e in chain(exc):
        if isinstance(e, OSError) and (e.errno in NO_SPACE or e.errno == TOO_LARGE):
            return e.errno
    if directory is not None and isinstance(exc, (OSError, RuntimeError)) and free_bytes(directory) == 0:
        return errno.ENOSPC
    return None


def describe(exc: BaseException) -> str | None:
    """One line for a failure the user acts on (a :class:`ReportedError` or a full disk); else None."""
    for e in chain(exc):
        if isinstance(e, ReportedError):
            return str(e)
    for e in chain(exc):
        if isinstance(e, OSError) and (e.errno in NO_SPACE or e.errno == TOO_LARGE):
            path = Path(e.filename) if e.filename else None
            return str(DiskFullError(path and path.parent, target=path and path.name, reason=e.errno))
    return None
