"""Fixed-size sample shards: atomic writes, verified resume, the merged ADM-format npz and the sample grid.

A shard is ``shard-NNNNN.npz`` (``arr_0`` (n,H,W,3) uint8, ``labels`` (n,) int64) plus ``shard-NNNNN.json``
recording which samples it holds, the spec fingerprint, its byte size and sha256. The record is written after
the npz, both atomically, so a record vouches for a complete file; a shard is reused only if its record
matches the current spec and the file still has the recorded size and checksum.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ccalign.io import atomic_write, atomic_write_json, remove_stale_temps, sha256_file


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first sample index
    stop: int  # one past the last sample index

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def plan_shards(num_samples: int, shard_size: int) -> list[Shard]:
    """Consecutive shards of ``shard_size`` samples (the last may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [
        Shard(k, s, min(s + shard_size, num_samples)) for k, s in enumerate(range(0, num_samples, shard_size))
    ]


def rank_shards(shards: list[Shard], rank: int, world_size: int) -> list[Shard]:
    """Rank r's share: shards r, r + world_size, ..."""
    return shards[rank::world_size]


def shard_paths(shard_dir: Path, shard: Shard) -> tuple[Path, Path]:
    return shard_dir / f"{shard.name}.npz", shard_dir / f"{shard.name}.json"


def write_shard(
    shard_dir: Path, shard: Shard, pixels: np.ndarray, labels: np.ndarray, fingerprint: str
) -> None:
    """Write the shard's npz, then its record (both atomic), after removing leftovers of a killed write."""
    npz, record = shard_paths(shard_dir, shard)
    remove_stale_temps(shard_dir, shard.name)  # other ranks' temps are kept
    assert pixels.shape[0] == labels.shape[0] == shard.stop - shard.start
    with atomic_write(npz, size=pixels.nbytes + labels.nbytes) as f:
        np.savez(f, arr_0=pixels, labels=labels)
    atomic_write_json(
        {
            "start": shard.start,
            "stop": shard.stop,
            "shape": list(pixels.shape),
            "spec": fingerprint,
            "bytes": npz.stat().st_size,
            "sha256": sha256_file(npz),
        },
        record,
    )


def check_shard(shard_dir: Path, shard: Shard, fingerprint: str) -> str | None:
    """None if the shard on disk is complete and was made under this spec, else why it cannot be trusted."""
    npz, record = shard_paths(shard_dir, shard)
    if not record.is_file():
        return "not written yet" if not npz.exists() else "no record (write interrupted)"
    try:
        meta = json.loads(record.read_text())
    except (OSError, ValueError):
        return "unreadable record"
    if meta.get("spec") != fingerprint:
        return "made with other settings"
    if (meta.get("start"), meta.get("stop")) != (shard.start, shard.stop):
        return "holds other samples"
    if not npz.is_file() or npz.stat().st_size != meta.get("bytes"):
        return "size differs from its record"
    if sha256_file(npz) != meta.get("sha256"):
        return "checksum differs from its record"
    return None


def read_shard(shard_dir: Path, shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (n,H,W,3) uint8, labels (n,)) of a checked shard."""
    npz, _ = shard_paths(shard_dir, shard)
    with np.load(npz) as data:
        pixels, labels = data["arr_0"], data["labels"]
    n = shard.stop - shard.start
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[0] != n or pixels.shape[3] != 3:
        raise ValueError(
            f"{npz}: arr_0 has shape {pixels.shape} {pixels.dtype}, expected ({n}, H, W, 3) uint8"
        )
    return pixels, labels


def merge_shards(
    shard_dir: Path, shards: list[Shard], labels: np.ndarray, out: Path, keep: np.ndarray | None = None
) -> np.ndarray | None:
    """Stream checked shards into ``out`` (``arr_0`` N×H×W×3 uint8, ``labels`` N), one shard at a time.

    The file is what ``np.savez`` writes (uncompressed zip of .npy members), so numpy and ADM's evaluator read
    it. Returns the rows at sample indices ``keep`` (for the grid), if given.
    """
    _, record = shard_paths(shard_dir, shards[0])
    _, height, width, _ = json.loads(record.read_text())["shape"]
    remove_stale_temps(out.parent, out.name)
    wanted = set() if keep is None else {int(i) for i in keep}
    kept = {}
    with (
        atomic_write(out, size=len(labels) * (height * width * 3 + 8)) as f,
        zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {
                "descr": np.dtype(np.uint8).str,
                "fortran_order": False,
                "shape": (len(labels), height, width, 3),
            }
            np.lib.format.write_array_header_1_0(member, header)
            for shard in shards:
                pixels, shard_labels = read_shard(shard_dir, shard)
                if pixels.shape[1:3] != (height, width):
                    raise ValueError(
                        f"{shard.name}: images are {pixels.shape[1:3]}, others {(height, width)}"
                    )
                if not np.array_equal(shard_labels, labels[shard.start : shard.stop]):
                    raise ValueError(f"{shard.name}: labels differ from the class-balanced plan")
                member.write(np.ascontiguousarray(pixels).tobytes())
                for i in wanted.intersection(range(shard.start, shard.stop)):
                    kept[i] = pixels[i - shard.start]
        with zf.open("labels.npy", "w") as member:
            np.lib.format.write_array(member, np.asarray(labels, dtype=np.int64))
    return None if keep is None else np.stack([kept[int(i)] for i in keep])


def grid_indices(num_classes: int, per_class: int, rows: int = 8, cols: int = 8) -> np.ndarray:
    """Sample indices of a rows×cols grid: the first ``cols`` samples of ``rows`` evenly spread classes."""
    rows, cols = min(rows, num_classes), min(cols, per_class)
    classes = np.arange(rows) * num_classes // rows
    return (classes[:, None] * per_class + np.arange(cols)[None, :]).reshape(-1)


def save_grid(pixels: np.ndarray, cols: int, path: Path, pad: int = 2, min_tile: int = 64) -> None:
    """Tile images (n,H,W,3) uint8 into a PNG with ``cols`` columns; tiny images are upscaled (nearest)."""
    n, h, w, _ = pixels.shape
    scale = max(1, min_tile // max(h, w))
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w, rows = h * scale, w * scale, -(-n // cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w
        ] = pixels[k]
    with atomic_write(path) as f:
        Image.fromarray(canvas).save(f, format="PNG")
