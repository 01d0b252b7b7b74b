"""Atomic writes, output locks, hashing and resume helpers shared by every stage.

Nothing is ever visible under its final name half-written: files are written to a temporary sibling,
fsync'ed, then renamed over the target (``os.replace`` is atomic on POSIX within one file system). Outputs
get the permissions the process umask allows (umask 027 gives group-readable 0640 files and 0750 folders).
A write that runs out of space removes its temporary and raises :class:`ccalign.errors.DiskFullError`
naming the directory and the bytes needed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ccalign.errors import DiskFullError, OutputBusyError, space_errno
from ccalign.log import get_logger

log = get_logger("io")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    """A fresh temp name beside ``path`` (``remove_stale_temps`` finds what a killed writer left)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", size: int | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it to ``path``.

    The file is created with mode 0666 minus the umask. ``size``: the bytes about to be written, when known
    (named if the disk fills up).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with os.fdopen(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        reason = None if isinstance(e, DiskFullError) else space_errno(e, path.parent)  # before the unlink
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if reason is not None:
            raise DiskFullError(
                path.parent, target=path.name, needed=size, written=written, reason=reason
            ) from e
        raise


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    data = text.encode()
    with atomic_write(path, "wb", size=len(data)) as f:
        f.write(data)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages in ``obj`` (nested dicts, lists, tuples): what ``torch.save``
    writes at least."""
    import torch  # this module serves torch-free stages too

    seen, total, stack = set(), 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return total


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_write(path, "wb", size=tensor_bytes(obj)) as f:
        torch.save(obj, f)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` (if any) once the block succeeds.

    The swap holds ``path``'s output lock (:func:`output_lock`, waiting for it), so two writers of one
    directory replace it one after the other; a caller must not hold that lock itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    os.mkdir(tmp, 0o777)  # permissions: 0777 minus the umask
    try:
        yield tmp
        with output_lock(path, wait=True):
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException as e:
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else 0
        reason = None if isinstance(e, DiskFullError) else space_errno(e, path.parent)  # before the rmtree
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is not None:
            raise DiskFullError(path.parent, target=path.name, written=written, reason=reason) from e
        raise


_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # flock unsupported here


def _lock_holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    host, _, pid = os.read(fd, 4096).decode(errors="replace").strip().partition(" ")
    return f"pid {pid} on host {host}" if pid else "identity not recorded yet"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, *, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive lock of output ``path`` (``.<name>.lock`` beside it, removed on release).

    When another process holds it: with ``wait`` block until it is released, else raise
    :class:`ccalign.errors.OutputBusyError` naming that process (host and pid). A kernel lock (``flock``;
    on NFS, emulated with a byte-range lock) dies with its holder, so a killed writer never leaves it held. On
    a file system without locks (Lustre mounted without ``flock``) a warning says the output is unprotected.
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            if not wait:
                os.close(fd)
                raise OutputBusyError(path, holder) from None
            log.info("waiting for %s (%s) to finish writing %s", holder, lock, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            log.warning("cannot lock %s (%s): nothing stops a second writer of %s", lock, e.strerror, path)
        try:  # the previous holder may have removed the file we locked: then lock the current one
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # who holds it, for the others' message (a full disk may refuse)
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_torch(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers (never arbitrary pickle)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot load {path} as a weights-only torch file: {e}") from e


def remove_stale_temps(directory: str | os.PathLike, name: str = "*") -> int:
    """Delete the temp files/dirs that killed writers of ``name`` (a glob; default: any) left in
    ``directory``; returns how many. Name only your own outputs while other processes may be writing."""
    n = 0
    for p in Path(directory).glob(f".{name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            n += 1
    return n
