"""Pretrained artifacts listed in config/weights.yaml: download, verify by SHA-256, place atomically.

Hugging Face files go through ``huggingface_hub.hf_hub_download`` (pinned revision, the HF cache, resumed
``.incomplete`` blobs, ``local_files_only`` when offline); plain URLs go through ``pooch.retrieve`` with
``known_hash`` and a downloader that keeps a partial file between attempts and resumes it with an HTTP Range
request. A file reaches its final name under the weights folder only after its size and hash check out, and a
file already there stays until its replacement has been verified. A failed download is one ``FetchError``
naming the artifact and the URL. Concurrent fetches of one artifact wait for each other (``output_lock``).

Values the manifest leaves null (size, sha256, HF revision) are recorded in a lock file at first download and
enforced on every later fetch (trust on first use); ``Fetched.unpinned`` names them so the caller can report
them for pinning.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ccalign.config import REPO_ROOT
from ccalign.errors import DiskFullError, ReportedError, chain, space_errno
from ccalign.io import atomic_write, atomic_write_json, output_lock, sha256_file
from ccalign.log import get_logger, progress

SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "weights.schema.yaml"
LOCK_NAME = "weights.lock.json"
log = get_logger(__name__)


class ChecksumError(RuntimeError):
    """A downloaded or present file does not match the expected size or SHA-256."""

    def __init__(
        self, key: str, what: str, expected: Any, actual: Any, path: Path | str, discarded: bool = True
    ):
        self.key, self.what, self.expected, self.actual = key, what, expected, actual
        msg = f"artifact '{key}': {what} mismatch for {path}: expected {expected}, got {actual}"
        super().__init__(
            msg + (" (download discarded; nothing written under the final name)" if discarded else "")
        )


class FetchError(ReportedError):
    """A download failed (HTTP error, no connection, unknown Hub file); names the artifact and the URL."""


class OfflineError(FileNotFoundError):
    """Offline mode is on and the artifact is neither in the weights folder nor in a cache."""


@dataclass(frozen=True)
class Artifact:
    """One manifest entry; exactly one of ``url`` / ``hf_repo`` is set."""

    key: str
    file: str  # path relative to the weights folder
    size: int | None
    sha256: str | None
    url: str | None = None
    hf_repo: str | None = None
    revision: str | None = None  # HF commit id; None = resolve the default branch once, then use the lock
    path: str | None = None  # file inside the HF repo
    repo_type: str = "model"
    description: str = ""

    @property
    def origin(self) -> str:
        """Where the file comes from, revision aside (a lock entry only applies to the same origin)."""
        return self.url or f"hf://{self.repo_type}/{self.hf_repo}/{self.path}"


@dataclass(frozen=True)
class Fetched:
    key: str
    path: Path
    origin: str
    revision: str | None  # resolved HF commit id (None for URLs)
    size: int
    sha256: str
    action: str  # "present" (in the weights folder already, verified) | "fetched" (downloaded or cached)
    unpinned: tuple[str, ...]  # manifest fields that were null: any of "size", "sha256", "revision"


# ----------------------------------------------------------------------------------------------- manifest


def load_manifest(
    path: str | os.PathLike, schema_path: str | os.PathLike = SCHEMA_PATH
) -> dict[str, Artifact]:
    """Read and validate the manifest; raise ``ValueError`` naming the file and the offending key."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    schema = yaml.safe_load(Path(schema_path).read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(raw), key=lambda e: list(e.path))
    if errors:
        where = ".".join(str(p) for p in errors[0].path) or "<top>"
        raise ValueError(f"{path}: {where}: {errors[0].message}")
    manifest: dict[str, Artifact] = {}
    seen: dict[str, str] = {}
    for key, entry in raw["artifacts"].items():
        src = entry["source"]
        a = Artifact(
            key=key,
            file=entry["file"],
            size=entry["size"],
            sha256=entry["sha256"],
            url=src.get("url"),
            hf_repo=src.get("hf_repo"),
            revision=src.get("revision"),
            path=src.get("path"),
            repo_type=src.get("repo_type", "model"),
            description=entry.get("description", ""),
        )
        if a.file in seen:
            raise ValueError(f"{path}: artifacts.{key}.file: '{a.file}' is also the file of '{seen[a.file]}'")
        seen[a.file] = key
        manifest[key] = a
    return manifest


def needed_keys(cfg: Any, manifest: dict[str, Artifact], dest: str | os.PathLike) -> list[str]:
    """Keys the config refers to (manifest order): a config value equal to a key (``weights: var_d16``) or to
    the artifact's path ``dest/<file>``."""
    values: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            values.update((node, os.path.abspath(node)))

    walk(cfg)
    return [k for k, a in manifest.items() if k in values or os.path.abspath(Path(dest) / a.file) in values]


# --------------------------------------------------------------------------------------------------- lock


def read_lock(path: str | os.PathLike) -> dict[str, dict]:
    """The lock file's entries (key -> file, origin, revision, size, sha256); empty when absent."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Serialize read-modify-write of the lock between concurrent fetch jobs (POSIX advisory lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.flock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _record(lock_path: Path, got: Fetched, file: str) -> None:
    with _exclusive(lock_path):
        entries = read_lock(lock_path)
        entries[got.key] = {
            "file": file,
            "origin": got.origin,
            "revision": got.revision,
            "size": got.size,
            "sha256": got.sha256,
        }
        atomic_write_json(entries, lock_path)


def _expected(a: Artifact, locked: dict | None) -> tuple[int | None, str | None, str | None]:
    """(size, sha256, revision) to enforce: the manifest's values, completed by the lock's when the lock entry
    is for the same origin and agrees with everything the manifest pins."""
    pinned = {"origin": a.origin, "size": a.size, "sha256": a.sha256, "revision": a.revision}
    if not locked or any(v is not None and locked.get(k) != v for k, v in pinned.items()):
        return a.size, a.sha256, a.revision
    return locked.get("size"), locked.get("sha256"), locked.get("revision")


# -------------------------------------------------------------------------------------------------- fetch


def _verify(key: str, path: Path, size: int | None, sha256: str | None, discarded: bool = True) -> str:
    """Check size, then hash; return the file's SHA-256."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(key, "size", size, actual_size, path, discarded)
    actual = sha256_file(path)
    if sha256 is not None and actual != sha256:
        raise ChecksumError(key, "sha256", sha256, actual, path, discarded)
    return actual


def _place(src: Path, target: Path) -> None:
    """Put ``src``'s content at ``target`` atomically: a hard link on the same file system, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.link(os.path.realpath(src), tmp)
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        with open(src, "rb") as fin, atomic_write(target) as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)


def _fetch_hf(
    a: Artifact,
    size: int | None,
    sha256: str | None,
    revision: str | None,
    *,
    offline: bool,
    cache_dir: str | None,
    endpoint: str | None,
) -> tuple[Path, str, str | None]:
    """Download (or find in the HF cache) and verify; return (cached path, sha256, commit id)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        cached = Path(
            hf_hub_download(
                a.hf_repo,
                a.path,
                repo_type=a.repo_type,
                revision=revision,
                cache_dir=cache_dir,
                endpoint=endpoint,
                local_files_only=offline,
            )
        )
    except LocalEntryNotFoundError as e:
        if offline:
            raise OfflineError(
                f"artifact '{a.key}': offline mode is on and {a.origin}@{revision or 'main'} is "
                "not in the Hugging Face cache; fetch it once online (or copy the file in)"
            ) from e
        raise
    parts = cached.parts  # .../snapshots/<commit>/<path in repo>
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else revision
    try:
        digest = _verify(a.key, cached, size, sha256)
    except ChecksumError:
        # Drop the bad blob from the HF cache too, so that the next attempt downloads it again.
        blob = Path(os.path.realpath(cached))
        cached.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise
    return cached, digest, commit


class ResumableDownloader:
    """A pooch downloader that keeps ``part`` between attempts and resumes it with ``Range: bytes=N-``.

    The complete, size-checked file is moved to pooch's temporary output, which pooch hash-checks against
    ``known_hash`` before renaming it to its name. ``sha256`` is the hash of the last complete download. A
    failed attempt that got no byte leaves no ``part`` behind.
    """

    chunk_size = 1 << 20  # bytes per write; a cut loses at most one chunk

    def __init__(self, key: str, part: Path, size: int | None, timeout: float):
        self.key, self.part, self.size, self.timeout = key, part, size, timeout
        self.sha256: str | None = None

    def __call__(self, url: str, output_file: str, pooch_instance: Any) -> None:
        offset = self.part.stat().st_size if self.part.exists() else 0
        if self.size is not None and offset > self.size:
            self.part.unlink()
            offset = 0
        if self.size is None or offset < self.size:
            try:
                self._append(url, offset, pooch_instance)
            except BaseException:
                if self.part.exists() and self.part.stat().st_size == 0:  # nothing worth resuming
                    self.part.unlink()
                raise
        got_size = self.part.stat().st_size
        if self.size is not None and got_size != self.size:
            self.part.unlink()
            raise ChecksumError(self.key, "size", self.size, got_size, url)
        self.sha256 = sha256_file(self.part)
        os.replace(self.part, output_file)

    def _append(self, url: str, offset: int, pooch_instance: Any) -> None:
        """Append ``url``'s bytes from ``offset`` on to ``part`` (from zero when the server ignores Range)."""
        import pooch
        import requests

        with open(self.part, "ab") as f:

            def on_response(response: Any, *args: Any, **kwargs: Any) -> None:
                if offset and response.status_code == 200:  # the server ignored Range: start over
                    f.seek(0)
                    f.truncate()
                elif offset and response.status_code == 206:
                    got = response.headers.get("Content-Range", "")
                    if not got.startswith(f"bytes {offset}-"):
                        raise requests.HTTPError(f"asked for bytes {offset}- of {url}, got '{got}'")

            headers = {"Range": f"bytes={offset}-"} if offset else {}
            desc = f"{self.key} (resuming at {offset} B)" if offset else self.key
            bar = progress(total=1, desc=desc, unit="B")
            try:
                pooch.HTTPDownloader(
                    progressbar=False if bar.disable else bar,
                    chunk_size=self.chunk_size,
                    timeout=self.timeout,
                    headers=headers,
                    hooks={"response": on_response},
                )(url, f, pooch_instance)
            except requests.HTTPError as e:
                if e.response is not None and e.response.status_code == 416:
                    self.part.unlink()  # the partial file does not fit the remote one: restart from zero
                raise
            finally:
                bar.close()


def _retryable(e: Exception) -> bool:
    """A failure worth another attempt: no connection, a timeout, a server error; not a 4xx answer except
    408 (request timeout), 416 (range not satisfiable: the download restarts) and 429 (too many requests)."""
    import requests

    response = getattr(e, "response", None)
    if isinstance(e, requests.HTTPError) and response is not None:
        return response.status_code >= 500 or response.status_code in (408, 416, 429)
    return isinstance(e, requests.RequestException)


def _fetch_url(
    a: Artifact,
    target: Path,
    size: int | None,
    sha256: str | None,
    *,
    retries: int,
    backoff: float,
    timeout: float,
) -> str:
    """Download through pooch (resuming across attempts) to a staging name, then replace ``target`` with the
    verified file; return its SHA-256. A failed download leaves ``target`` as it was."""
    import pooch
    import requests

    staging = target.with_name(f".{target.name}.download")
    staging.unlink(missing_ok=True)  # pooch would keep one without checking it when no hash is known
    dl = ResumableDownloader(a.key, target.with_name(f".{target.name}.part"), size, timeout)
    pooch.get_logger().setLevel(logging.WARNING)  # its "use this as known_hash" hint names pooch's API
    attempt = 1
    while True:
        log.info("%s: downloading %s", a.key, a.url)
        try:
            pooch.retrieve(
                a.url,
                known_hash=f"sha256:{sha256}" if sha256 else None,
                fname=staging.name,
                path=staging.parent,
                downloader=dl,
            )
            digest = dl.sha256 or sha256_file(staging)
            os.replace(staging, target)
            return digest
        except requests.RequestException as e:
            if attempt >= retries or not _retryable(e):
                raise
            log.warning("%s: attempt %d/%d failed (%s); retrying", a.key, attempt, retries, _reason(e))
            time.sleep(backoff * 2 ** (attempt - 1))
            attempt += 1
        except ValueError as e:  # pooch: hash of the complete download does not match known_hash
            raise ChecksumError(a.key, "sha256", sha256, dl.sha256, a.url) from e


def _reason(e: BaseException) -> str:
    """A download failure in a few words: ``HTTP 404 Not Found``, ``connection refused``, ``timed out``
    (from the first exception in ``e``'s chain that says it: Hugging Face wraps the HTTP error)."""
    for x in chain(e):
        response = getattr(x, "response", None)
        if response is not None and getattr(response, "status_code", None):
            phrase = getattr(response, "reason", None) or getattr(response, "reason_phrase", "")
            return f"HTTP {response.status_code} {phrase}".strip()
    for x in chain(e):
        text = str(x)
        if "Connection broken" in text:
            return "connection broken mid-download (the partial download is kept: fetching again resumes it)"
        socket_error = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)  # inside urllib3's / httpx's message
        if socket_error:
            return socket_error.group(1).strip().lower()
        if isinstance(x, TimeoutError) or "timed out" in text.lower():
            return "timed out"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _url(a: Artifact, revision: str | None, endpoint: str | None) -> str:
    """The URL the artifact is downloaded from."""
    if a.url:
        return a.url
    from huggingface_hub import hf_hub_url

    return hf_hub_url(a.hf_repo, a.path, repo_type=a.repo_type, revision=revision, endpoint=endpoint)


def fetch(
    a: Artifact,
    dest: str | os.PathLike,
    *,
    lock_path: str | os.PathLike | None = None,
    offline: bool = False,
    cache_dir: str | None = None,
    endpoint: str | None = None,
    retries: int = 3,
    backoff: float = 2.0,
    timeout: float = 60.0,
) -> Fetched:
    """Make ``dest/<a.file>`` hold the verified artifact; record what was fetched in the lock file.

    ``cache_dir``/``endpoint``: Hugging Face cache and Hub URL (defaults: ``HF_HUB_CACHE``/``HF_ENDPOINT``).
    A file already at ``dest/<a.file>`` is replaced only by a verified download. Raises ``ChecksumError``,
    ``OfflineError`` or ``FetchError``; then nothing new is under the final name.
    """
    dest = Path(dest)
    with output_lock(dest / a.file, wait=True):  # a concurrent fetch of the same file finishes first
        return _fetch_locked(a, dest, lock_path, offline, cache_dir, endpoint, retries, backoff, timeout)


def _fetch_locked(a, dest, lock_path, offline, cache_dir, endpoint, retries, backoff, timeout) -> Fetched:
    """:func:`fetch`, holding the output lock of the artifact's file."""
    from huggingface_hub.constants import is_offline_mode

    offline = offline or is_offline_mode()  # HF_HUB_OFFLINE=1 counts as --offline
    target = dest / a.file
    lock_path = Path(lock_path) if lock_path is not None else dest / LOCK_NAME
    size, sha256, revision = _expected(a, read_lock(lock_path).get(a.key))
    unpinned = tuple(n for n, v in (("size", a.size), ("sha256", a.sha256)) if v is None)
    unpinned += ("revision",) if a.hf_repo and a.revision is None else ()
    commit = revision if a.hf_repo else None

    digest = None
    if target.is_file():
        try:
            digest = _verify(a.key, target, size, sha256, discarded=False)
            action = "present"
        except ChecksumError as e:
            if offline and not a.hf_repo:  # nothing to replace it with
                raise
            log.warning("%s; fetching it again (the present file stays until the new one verifies)", e)
    if digest is None:
        action = "fetched"
        try:
            if a.hf_repo:
                cached, digest, commit = _fetch_hf(
                    a, size, sha256, revision, offline=offline, cache_dir=cache_dir, endpoint=endpoint
                )
                _place(cached, target)
            elif offline:
                raise OfflineError(
                    f"artifact '{a.key}': offline mode is on and {target} does not exist; "
                    f"fetch it once online (or copy the file there)"
                )
            else:
                digest = _fetch_url(
                    a, target, size, sha256, retries=retries, backoff=backoff, timeout=timeout
                )
        except (ChecksumError, OfflineError):
            raise
        except Exception as e:
            import requests
            from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

            if (reason := space_errno(e, target.parent)) is not None:  # a partial download stays to resume
                raise DiskFullError(target.parent, target=target.name, needed=size, reason=reason) from e
            if not isinstance(e, (requests.RequestException, HfHubHTTPError, LocalEntryNotFoundError)):
                e.add_note(f"while fetching artifact '{a.key}' from {a.origin}")
                raise
            kept = f"; {target} is left as it was" if target.is_file() else ""
            raise FetchError(
                f"artifact '{a.key}': cannot download {_url(a, revision, endpoint)}: {_reason(e)}{kept}"
            ) from e
    got = Fetched(a.key, target, a.origin, commit, target.stat().st_size, digest, action, unpinned)
    _record(lock_path, got, a.file)
    return got
