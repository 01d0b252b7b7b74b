"""The code cache: tokenizer codes of every view of every image, in fixed-size memory-mappable shards.

Layout of a cache directory::

    manifest.json                 written last, once every shard is present (the cache's commit point)
    shard-00000.codes.npy         (n, num_views, seq_len) uint16, n = shard_size except in the last shard
    shard-00000.labels.npy        (n,) int16
    shard-00000.json              the shard's record: counts, byte sizes, sha256 of both files, plan key
    ...

Shard k holds images ``[k * shard_size, (k + 1) * shard_size)`` of the sorted image folder. Every file is
written atomically; the record is written after both arrays, so a record means a complete shard. A shard
whose record matches the current plan (tokenizer checkpoint, views, image list) and whose files hash to the
recorded sha256 is skipped on rerun; anything else is extracted again. The manifest holds no timestamps or
paths, so a resumed extraction gives the same manifest as an uninterrupted one.

Compared with LlamaGen's ``extract_codes_c2i.py`` (two int64 ``.npy`` files per image and crop range) this
stores 2 bytes per code instead of 8 and a few files per 4096 images instead of four per image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ccalign.data.folder import ImageFolder
from ccalign.data.views import ViewSpec, make_views, to_model_input
from ccalign.io import atomic_write, atomic_write_json, remove_stale_temps, sha256_bytes, sha256_file
from ccalign.log import get_logger, progress

FORMAT = "ccalign-code-cache/1"
MANIFEST = "manifest.json"
CODES_DTYPE, LABELS_DTYPE = np.uint16, np.int16

log = get_logger("data.cache")


def shard_files(k: int) -> dict[str, str]:
    return {
        "codes": f"shard-{k:05d}.codes.npy",
        "labels": f"shard-{k:05d}.labels.npy",
        "record": f"shard-{k:05d}.json",
    }


@dataclass(frozen=True)
class CachePlan:
    """What is extracted: which images, which views, which tokenizer, in which shards."""

    folder: ImageFolder
    views: ViewSpec
    shard_size: int
    family: str
    tokenizer: dict  # {"name", "sha256", "args"}
    vocab_size: int

    def __post_init__(self) -> None:
        if self.vocab_size > np.iinfo(CODES_DTYPE).max + 1:
            raise ValueError(f"vocab size {self.vocab_size} does not fit the cache's uint16 codes")
        if len(self.folder.classes) > np.iinfo(LABELS_DTYPE).max:
            raise ValueError(f"{len(self.folder.classes)} classes do not fit the cache's int16 labels")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")

    @property
    def num_shards(self) -> int:
        return -(-len(self.folder) // self.shard_size)

    def shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, len(self.folder)))

    @cached_property
    def header(self) -> dict[str, Any]:
        """Manifest fields that do not depend on the extracted codes."""
        return {
            "format": FORMAT,
            "family": self.family,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "views": self.views.to_dict(),
            "num_views": self.views.num_views,
            "num_images": len(self.folder),
            "num_classes": len(self.folder.classes),
            "classes": self.folder.classes,
            "images_sha256": self.folder.fingerprint,
            "shard_size": self.shard_size,
            "codes_dtype": np.dtype(CODES_DTYPE).name,
            "labels_dtype": np.dtype(LABELS_DTYPE).name,
        }

    def shard_key(self, k: int) -> str:
        """Names the exact content shard k must have; a record with another key is stale."""
        h = self.header
        blob = json.dumps(
            {**h, "shard": k, "range": [self.shard_range(k).start, self.shard_range(k).stop]}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def select_shards(num_shards: int, job: tuple[int, int] = (0, 1), rank: int = 0, world: int = 1) -> list[int]:
    """Shards of job i of n (k ≡ i mod n), then of torchrun rank r among them (every world-th)."""
    i, n = job
    if not 0 <= i < n:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {i}/{n}")
    return [k for k in range(num_shards) if k % n == i][rank::world]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _read_record(cache_dir: Path, k: int) -> dict | None:
    path = cache_dir / shard_files(k)["record"]
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _file_problem(cache_dir: Path, entry: dict, kind: str) -> str | None:
    """What is wrong with the ``kind`` ("codes"/"labels") file of a shard short of reading it, or None."""
    name = entry[kind]
    path = cache_dir / name
    want = entry.get(f"{kind}_bytes")
    if want is None or entry.get(f"{kind}_sha256") is None:
        return f"{name}: no size/sha256 record"
    if not path.is_file():
        return f"{name}: missing"
    size = path.stat().st_size
    if size != want:
        return f"{name}: {'truncated' if size < want else 'wrong size'} ({size} bytes, expected {want})"
    return None


def check_shard(cache_dir: Path, entry: dict, full: bool = True) -> list[str]:
    """Problems of one shard given its record: missing, truncated/oversized, (with ``full``) corrupt files."""
    problems = []
    for kind in ("codes", "labels"):
        problem = _file_problem(cache_dir, entry, kind)
        if problem is None and full and sha256_file(cache_dir / entry[kind]) != entry[f"{kind}_sha256"]:
            problem = f"{entry[kind]}: corrupt (sha256 differs from the recorded one)"
        if problem is not None:
            problems.append(problem)
    return problems


def shard_done(cache_dir: Path, plan: CachePlan, k: int, full: bool = True) -> dict | None:
    """The record of shard k when the shard is complete, intact and matches the plan; else None."""
    rec = _read_record(cache_dir, k)
    if rec is None or rec.get("key") != plan.shard_key(k) or check_shard(cache_dir, rec, full):
        return None
    return rec


class _ShardImages(Dataset):
    """All views of the images of one shard, as uint8 (num_views, S, S, 3), and their labels."""

    def __init__(self, plan: CachePlan, k: int) -> None:
        self.plan, self.indices = plan, plan.shard_range(k)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i = self.indices[j]
        return torch.from_numpy(
            make_views(self.plan.folder.load(i), self.plan.views, i)
        ), self.plan.folder.label(i)


@torch.inference_mode()
def encode_shard(
    plan: CachePlan,
    k: int,
    encode,
    *,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
    bar=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Codes (n, num_views, T) uint16 and labels (n,) int16 of shard k; ``encode`` maps (N,3,S,S) → (N,T)."""
    loader = DataLoader(
        _ShardImages(plan, k),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
    )
    codes, labels = [], []
    for views, y in loader:  # views: (B, V, S, S, 3) uint8
        b, v = views.shape[:2]
        x = to_model_input(views.to(device, non_blocking=True)).flatten(0, 1)  # (B*V, 3, S, S)
        z = encode(x).view(b, v, -1)  # (B, V, T) int64
        if z.numel() and (int(z.min()) < 0 or int(z.max()) >= plan.vocab_size):
            raise ValueError(f"tokenizer produced codes outside [0, {plan.vocab_size})")
        codes.append(z.to("cpu", torch.int32).numpy().astype(CODES_DTYPE))
        labels.append(y.numpy().astype(LABELS_DTYPE))
        if bar is not None:
            bar.update(b)
    return np.concatenate(codes), np.concatenate(labels)


def write_shard(cache_dir: Path, plan: CachePlan, k: int, codes: np.ndarray, labels: np.ndarray) -> dict:
    """Write both arrays atomically, then the record; returns the record."""
    files = shard_files(k)
    rec = {
        "index": k,
        "count": len(labels),
        "codes": files["codes"],
        "labels": files["labels"],
        "codes_shape": list(codes.shape),
        "key": plan.shard_key(k),
    }
    for kind, array in (("codes", codes), ("labels", labels)):
        data = _npy_bytes(array)
        with atomic_write(cache_dir / files[kind], size=len(data)) as f:
            f.write(data)
        rec[f"{kind}_bytes"], rec[f"{kind}_sha256"] = len(data), sha256_bytes(data)
    atomic_write_json(rec, cache_dir / files["record"])
    return rec


def extract(
    plan: CachePlan,
    cache_dir: str | os.PathLike,
    encode,
    shards: list[int],
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> dict[str, int]:
    """Extract the given shards into ``cache_dir``, skipping those already done; returns counts."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # temp files a killed run left behind: only our shards (other jobs may be writing theirs)
    for k in shards:
        remove_stale_temps(cache_dir, f"shard-{k:05d}")
    todo = [k for k in shards if shard_done(cache_dir, plan, k) is None]
    n_images = sum(len(plan.shard_range(k)) for k in todo)
    log.info(
        "%d of %d assigned shards to extract (%d images × %d views); %d already done",
        len(todo),
        len(shards),
        n_images,
        plan.views.num_views,
        len(shards) - len(todo),
    )
    with progress(total=n_images, desc="tokenize", unit="img") as bar:
        for k in todo:
            codes, labels = encode_shard(
                plan, k, encode, batch_size=batch_size, device=device, num_workers=num_workers, bar=bar
            )
            write_shard(cache_dir, plan, k, codes, labels)
    return {"shards_written": len(todo), "shards_skipped": len(shards) - len(todo), "images": n_images}


def finalize(plan: CachePlan, cache_dir: str | os.PathLike) -> dict | None:
    """Write ``manifest.json`` when every shard of the plan is present; returns it, or None if some are not.

    Shards written by other jobs/ranks are trusted by their record and file size (``cache-verify`` rehashes).
    """
    cache_dir = Path(cache_dir)
    records = [shard_done(cache_dir, plan, k, full=False) for k in range(plan.num_shards)]
    missing = [k for k, r in enumerate(records) if r is None]
    if missing:
        log.info(
            "%d of %d shards not yet present (first: %d); manifest.json not written yet",
            len(missing),
            plan.num_shards,
            missing[0],
        )
        return None
    seq_lens = {r["codes_shape"][2] for r in records}
    if len(seq_lens) != 1:
        raise ValueError(f"shards in {cache_dir} disagree on the sequence length: {sorted(seq_lens)}")
    keep = (
        "index",
        "count",
        "codes",
        "labels",
        "codes_bytes",
        "codes_sha256",
        "labels_bytes",
        "labels_sha256",
    )
    manifest = {
        **plan.header,
        "seq_len": seq_lens.pop(),
        "shards": [{k: r[k] for k in keep} for r in records],
    }
    atomic_write_json(manifest, cache_dir / MANIFEST)
    return manifest


def load_manifest(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"code cache manifest not found: {path} (run `ccalign tokenize` first)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown cache format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _scan_npy(path: Path, chunk: int = 1 << 20) -> tuple[str, tuple, np.dtype, int | None, int | None]:
    """One streaming pass over an .npy file: (sha256 of the file, shape, dtype, min and max of the values)."""
    h, lo, hi = hashlib.sha256(), None, None
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        header = f.tell()  # a multiple of 64, as is the chunk: no value is cut in two
        f.seek(0)
        h.update(f.read(header))
        while block := f.read(chunk):
            h.update(block)
            values = np.frombuffer(block, dtype)
            if values.size:
                lo = int(values.min()) if lo is None else min(lo, int(values.min()))
                hi = int(values.max()) if hi is None else max(hi, int(values.max()))
    return h.hexdigest(), shape, dtype, lo, hi


def _content_problem(
    path: Path, sha256: str, shape: tuple, dtype: type, values: str, bound: int
) -> str | None:
    """What is wrong with an .npy file of the right size: checksum, shape/dtype, ``values`` outside
    [0, bound); None if nothing."""
    try:
        digest, got_shape, got_dtype, lo, hi = _scan_npy(path)
    except ValueError as e:  # not an .npy header
        return f"not a valid .npy file ({e})"
    if digest != sha256:
        return "corrupt (sha256 differs from the recorded one)"
    if got_shape != shape or got_dtype != dtype:
        return f"shape {got_shape} {got_dtype}, expected {shape} {np.dtype(dtype)}"
    if lo is not None and (lo < 0 or hi >= bound):
        return f"{values} span [{lo}, {hi}], outside [0, {bound})"
    return None


def scan_shard(cache_dir: Path, entry: dict, manifest: dict) -> list[str]:
    """Every problem of one shard, each ``"<file>: <what>"``: missing, truncated, corrupt (sha256), wrong
    shape or dtype, codes outside the vocabulary, labels outside the classes. Reads each file once."""
    n = entry["count"]
    expected = {  # kind: shape, dtype, what its values are, exclusive upper bound
        "codes": (
            (n, manifest["num_views"], manifest["seq_len"]),
            CODES_DTYPE,
            "codes",
            manifest["vocab_size"],
        ),
        "labels": ((n,), LABELS_DTYPE, "labels", manifest["num_classes"]),
    }
    problems = []
    for kind, (shape, dtype, values, bound) in expected.items():
        problem = _file_problem(cache_dir, entry, kind)
        if problem is None:
            what = _content_problem(
                cache_dir / entry[kind], entry[f"{kind}_sha256"], shape, dtype, values, bound
            )
            problem = what and f"{entry[kind]}: {what}"
        if problem is not None:
            problems.append(problem)
    return problems


def verify_cache(cache_dir: str | os.PathLike) -> list[str]:
    """Every problem of the cache: missing manifest, missing/truncated/corrupt shard files, wrong shapes,
    values out of range."""
    cache_dir = Path(cache_dir)
    try:
        manifest = load_manifest(cache_dir)
    except (OSError, ValueError) as e:
        return [str(e)]
    problems = []
    for entry in manifest["shards"]:
        problems += scan_shard(cache_dir, entry, manifest)
    total = sum(entry["count"] for entry in manifest["shards"])
    if total != manifest["num_images"]:
        problems.append(f"{MANIFEST}: shards hold {total} images, manifest says {manifest['num_images']}")
    return problems
