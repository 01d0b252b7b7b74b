"""Sampling building blocks: per-sample seeds, class balance, shard plan, pixel conversions, shard files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ccalign.families import get_family
from ccalign.sample.generate import SampleSpec, sample_seed, to_uint8
from ccalign.sample.shards import (
    Shard,
    check_shard,
    grid_indices,
    merge_shards,
    plan_shards,
    rank_shards,
    read_shard,
    save_grid,
    shard_paths,
    write_shard,
)


def test_sample_seeds_are_distinct_across_runs_and_indices():
    seeds = {(s, i): sample_seed(s, i) for s in range(5) for i in range(2000)}
    assert len(set(seeds.values())) == len(seeds)  # no (seed, i) pair shares noise with another
    assert all(0 <= v < 2**64 for v in seeds.values())
    assert sample_seed(3, 17) == seeds[(3, 17)]


def test_labels_are_class_balanced():
    spec = SampleSpec(family="llamagen", num_classes=7, per_class=5, seed=0, guidance=1.0)
    labels = spec.labels()
    assert spec.num_samples == 35 and labels.tolist() == [i // 5 for i in range(35)]
    assert np.bincount(labels).tolist() == [5] * 7
    assert spec.labels(12, 17).tolist() == labels[12:17].tolist()


def test_fingerprint_tracks_every_setting():
    base = dict(family="var", num_classes=4, per_class=2, seed=1, guidance=1.5, sampling={"top_k": 9})
    fp = SampleSpec(**base).fingerprint()
    assert SampleSpec(**{**base, "sampling": {"top_k": 9}}).fingerprint() == fp
    for change in (
        {"seed": 2},
        {"guidance": 2.0},
        {"sampling": {"top_k": 8}},
        {"per_class": 3},
        {"resize_to": 32},
        {"decode_batch": 4},
        {"checkpoint_sha256": "ab"},
        {"precision": "bf16"},
        {"noise": "torch.Generator"},
    ):
        assert SampleSpec(**{**base, **change}).fingerprint() != fp


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_shards_partition_the_plan(world_size):
    shards = plan_shards(23, 5)
    assert [(s.start, s.stop) for s in shards] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    mine = [rank_shards(shards, r, world_size) for r in range(world_size)]
    assert sorted((s for m in mine for s in m), key=lambda s: s.index) == shards


def test_llamagen_pixels_follow_the_official_formula():
    x = torch.tensor([-1.2, -1.0, -0.5, 0.0, 0.999, 1.0, 1.3]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    # clamp(127.5 x + 128, 0, 255) then truncation: -0.5 -> 64.25 -> 64, 0 -> 128, 0.999 -> 255.37 -> 255
    assert to_uint8(get_family("llamagen"), x)[0, 0, :, 0].tolist() == [0, 0, 64, 128, 255, 255, 255]


def test_var_pixels_follow_the_official_formula():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    # (x + 1) * 0.5 * 255 truncated: 0 -> 127 (not 128 as LlamaGen), 0.5 -> 191.25 -> 191
    assert to_uint8(get_family("var"), x)[0, 0, :, 0].tolist() == [0, 63, 127, 191, 255]


def test_resize_is_bicubic_before_conversion():
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = to_uint8(get_family("llamagen"), x, size=8)
    assert out.shape == (2, 8, 8, 3) and out.dtype == np.uint8
    ref = torch.clamp(127.5 * F.interpolate(x, size=(8, 8), mode="bicubic") + 128, 0, 255)
    assert np.array_equal(out, ref.permute(0, 2, 3, 1).to(torch.uint8).numpy())
    assert to_uint8(get_family("llamagen"), x, size=12).shape == (2, 12, 12, 3)


def _shard(tmp_path: Path, shard: Shard, fp: str = "spec-a") -> np.ndarray:
    n = shard.stop - shard.start
    pixels = np.random.default_rng(shard.index).integers(0, 256, (n, 4, 5, 3), dtype=np.uint8)
    write_shard(tmp_path, shard, pixels, np.arange(shard.start, shard.stop) // 2, fp)
    return pixels


def test_shard_checks_catch_every_kind_of_damage(tmp_path):
    shard = Shard(0, 0, 6)
    npz, record = shard_paths(tmp_path, shard)
    assert check_shard(tmp_path, shard, "spec-a") == "not written yet"
    pixels = _shard(tmp_path, shard)
    assert check_shard(tmp_path, shard, "spec-a") is None
    assert np.array_equal(read_shard(tmp_path, shard)[0], pixels)
    assert check_shard(tmp_path, shard, "spec-b") == "made with other settings"
    assert check_shard(tmp_path, Shard(0, 0, 5), "spec-a") == "holds other samples"

    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    npz.write_bytes(bytes(data))
    assert check_shard(tmp_path, shard, "spec-a") == "checksum differs from its record"
    npz.write_bytes(bytes(data[:-10]))
    assert check_shard(tmp_path, shard, "spec-a") == "size differs from its record"
    record.write_text("{not json")
    assert check_shard(tmp_path, shard, "spec-a") == "unreadable record"
    record.unlink()
    assert check_shard(tmp_path, shard, "spec-a") == "no record (write interrupted)"


def test_write_shard_removes_its_own_stale_temp_files_only(tmp_path):
    (tmp_path / ".shard-00000.npz.abc.tmp").write_bytes(b"partial")
    (tmp_path / ".shard-00001.npz.abc.tmp").write_bytes(b"another rank's write in progress")
    _shard(tmp_path, Shard(0, 0, 2))
    assert not (tmp_path / ".shard-00000.npz.abc.tmp").exists()
    assert (tmp_path / ".shard-00001.npz.abc.tmp").exists()


def test_merge_streams_shards_into_an_adm_npz(tmp_path):
    shards = plan_shards(11, 4)
    parts = [_shard(tmp_path, s) for s in shards]
    labels = np.arange(11) // 2
    out = tmp_path / "samples.npz"
    kept = merge_shards(tmp_path, shards, labels, out, keep=np.array([9, 0, 5]))
    with np.load(out) as data:
        assert sorted(data.files) == ["arr_0", "labels"]
        arr = data["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (11, 4, 5, 3)
        assert np.array_equal(arr, np.concatenate(parts))
        assert np.array_equal(data["labels"], labels)
    assert np.array_equal(kept, arr[[9, 0, 5]])

    with pytest.raises(ValueError, match="labels differ"):
        merge_shards(tmp_path, shards, labels + 1, tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()  # nothing half-written under the final name


def test_grid_takes_the_first_samples_of_spread_classes(tmp_path):
    idx = grid_indices(num_classes=10, per_class=50, rows=8, cols=8)
    assert idx.shape == (64,) and idx[:8].tolist() == list(range(8))
    assert sorted({int(i) // 50 for i in idx}) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert grid_indices(num_classes=3, per_class=2).tolist() == [0, 1, 2, 3, 4, 5]

    pixels = np.zeros((6, 8, 8, 3), dtype=np.uint8)
    save_grid(pixels, 2, tmp_path / "grid.png", pad=2, min_tile=16)
    assert Image.open(tmp_path / "grid.png").size == (2 * 18 + 2, 3 * 18 + 2)  # 8 px tiles upscaled to 16
