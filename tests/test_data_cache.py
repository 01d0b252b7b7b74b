"""The code cache: real tokenizers round trip, shard verification, resume, job/rank split, CodeDataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import tiny_tokenizers
from torch.utils.data import DataLoader

from ccalign.data.cache import CachePlan, extract, finalize, select_shards, verify_cache, write_shard
from ccalign.data.dataset import CodeDataset
from ccalign.data.digits import load_digits_uint8
from ccalign.data.folder import ImageFolder, list_image_folder
from ccalign.data.views import ViewSpec, make_views, to_model_input
from ccalign.families import get_family

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = tiny_tokenizers()
SHIFTS = ViewSpec.from_dict({"mode": "shifts", "pad": 1}, image_size=8)


def digits_folder(root: Path, per_class: int, classes: int) -> ImageFolder:
    images, labels = load_digits_uint8()
    for c in range(classes):
        for i in np.flatnonzero(labels == c)[:per_class]:
            path = root / str(c) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
    return list_image_folder(root, classes)


def stub_encode(x: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in tokenizer: 2×2 mean of the red channel in 64 levels, (N, 16)."""
    return ((torch.nn.functional.avg_pool2d(x[:, :1], 2) + 1) * 31.5).round().long().flatten(1)


def plan_for(folder, views=SHIFTS, shard_size=4, family="stub", vocab=64, args=None) -> CachePlan:
    return CachePlan(
        folder=folder,
        views=views,
        shard_size=shard_size,
        family=family,
        vocab_size=vocab,
        tokenizer={"name": "t", "sha256": "0" * 64, "args": args or {}},
    )


@pytest.mark.parametrize("family_name", ["llamagen", "var"])
def test_round_trip_cache_equals_direct_tokenizer_output(tmp_path, family_name):
    folder = digits_folder(tmp_path / "img", per_class=5, classes=3)
    torch.manual_seed(0)
    family = get_family(family_name)
    tok = family.build_tokenizer(TINY[family_name]).eval()
    plan = plan_for(folder, family=family_name, args=TINY[family_name])
    counts = extract(
        plan,
        tmp_path / "cache",
        lambda x: family.encode(tok, x),
        select_shards(plan.num_shards),
        batch_size=3,
    )
    assert counts == {"shards_written": 4, "shards_skipped": 0, "images": 15}
    manifest = finalize(plan, tmp_path / "cache")
    assert verify_cache(tmp_path / "cache") == []

    ds = CodeDataset(tmp_path / "cache", seed=0)
    assert (ds.family, ds.vocab_size, ds.num_classes, ds.num_views) == (family_name, 64, 3, 9)
    assert len(ds) == 15 and ds.seq_len == manifest["seq_len"] == (16 if family_name == "llamagen" else 21)
    with torch.inference_mode():
        for i in range(len(ds)):
            direct = family.encode(tok, to_model_input(make_views(folder.load(i), SHIFTS, i)))  # (9, T)
            shard = np.load(tmp_path / "cache" / manifest["shards"][i // 4]["codes"], mmap_mode="r")
            assert np.array_equal(shard[i % 4], direct.numpy())  # every cached view
            codes, label = ds[i]
            assert codes.dtype == torch.int64 and torch.equal(codes, direct[ds.view_of[i]])
            assert label == folder.label(i)
        # and codes → images → codes is the tokenizer's own round trip
        img = family.decode(tok, ds[0][0][None])
        assert img.shape == (1, 3, 8, 8)


def stub_cache(root: Path, n: int, views: int, shard_size: int, seq_len: int = 3) -> CachePlan:
    """A cache whose codes say which view they are: codes[i, v] = [v, i % 7, 5]."""
    folder = ImageFolder(root, [str(c) for c in range(7)], [(f"{i % 7}/{i}.png", i % 7) for i in range(n)])
    plan = plan_for(folder, ViewSpec.from_dict({"mode": "random", "count": views}, 8), shard_size)
    for k in range(plan.num_shards):
        idx = np.array(plan.shard_range(k))
        codes = np.zeros((len(idx), views, seq_len), np.uint16)
        codes[:, :, 0] = np.arange(views)
        codes[:, :, 1] = (idx % 7)[:, None]
        codes[:, :, 2] = 5
        write_shard(root, plan, k, codes, (idx % 7).astype(np.int16))
    finalize(plan, root)
    return plan


def test_dataset_draws_one_view_per_epoch_uniformly_and_deterministically(tmp_path):
    stub_cache(tmp_path, n=2000, views=20, shard_size=512)
    ds = CodeDataset(tmp_path, seed=1)
    assert isinstance(ds[0][0], torch.Tensor)
    assert all(isinstance(m, np.memmap) for m in ds._codes)  # items are read from the memory maps
    items = [ds[i] for i in range(len(ds))]
    assert all(int(c[1]) == i % 7 == label for i, (c, label) in enumerate(items))
    drawn = np.array([int(c[0]) for c, _ in items])
    assert np.array_equal(drawn, ds.view_of)
    counts = np.bincount(drawn, minlength=20)
    assert counts.min() > 60 and counts.max() < 140  # uniform over the 20 views (expected 100 each)
    assert np.array_equal(CodeDataset(tmp_path, seed=1).view_of, drawn)  # same seed and epoch → same views
    ds.set_epoch(1)
    assert (ds.view_of != drawn).mean() > 0.9
    # worker processes re-open the memory maps and see the same items
    loader = DataLoader(ds, batch_size=500, num_workers=2)
    codes = torch.cat([c for c, _ in loader])
    assert torch.equal(codes[:, 0], torch.from_numpy(ds.view_of).long())


def test_verify_names_every_missing_truncated_or_corrupt_shard(tmp_path):
    stub_cache(tmp_path, n=40, views=3, shard_size=8)
    assert verify_cache(tmp_path) == []
    (tmp_path / "shard-00000.codes.npy").unlink()
    data = bytearray((tmp_path / "shard-00001.codes.npy").read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the payload
    (tmp_path / "shard-00001.codes.npy").write_bytes(bytes(data))
    with open(tmp_path / "shard-00003.labels.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)
    problems = verify_cache(tmp_path)
    assert len(problems) == 3
    assert problems[0].startswith("shard-00000.codes.npy: missing")
    assert problems[1].startswith("shard-00001.codes.npy: corrupt")
    assert problems[2].startswith("shard-00003.labels.npy: truncated")
    (tmp_path / "manifest.json").unlink()
    assert "manifest not found" in verify_cache(tmp_path)[0]


def test_rerun_redoes_only_damaged_shards_and_gives_the_same_manifest(tmp_path):
    folder = digits_folder(tmp_path / "img", per_class=4, classes=3)
    plan = plan_for(folder, shard_size=5)
    everything = select_shards(plan.num_shards)
    extract(plan, tmp_path / "c", stub_encode, everything, batch_size=4)
    first = finalize(plan, tmp_path / "c")
    data = bytearray((tmp_path / "c" / "shard-00001.codes.npy").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "c" / "shard-00001.codes.npy").write_bytes(bytes(data))
    counts = extract(plan, tmp_path / "c", stub_encode, everything, batch_size=4)
    assert counts["shards_written"] == 1 and counts["shards_skipped"] == 2
    assert finalize(plan, tmp_path / "c") == first and verify_cache(tmp_path / "c") == []
    # a different plan (other views) does not reuse the shards
    other = plan_for(folder, ViewSpec.from_dict({"mode": "center"}, 8), shard_size=5)
    assert extract(other, tmp_path / "c", stub_encode, everything, batch_size=4)["shards_written"] == 3


def test_jobs_and_ranks_split_the_shards_and_the_last_one_writes_the_manifest(tmp_path):
    for n in (1, 2, 3):
        for world in (1, 2, 4):
            parts = [select_shards(11, (i, n), r, world) for i in range(n) for r in range(world)]
            assert sorted(k for p in parts for k in p) == list(range(11))
    folder = digits_folder(tmp_path / "img", per_class=3, classes=4)
    plan = plan_for(folder, shard_size=2)
    extract(plan, tmp_path / "one", stub_encode, select_shards(plan.num_shards), batch_size=3)
    single = finalize(plan, tmp_path / "one")
    for rank in (1, 0):  # job 0/2 as a torchrun world of 2, then job 1/2 alone
        extract(
            plan,
            tmp_path / "split",
            stub_encode,
            select_shards(plan.num_shards, (0, 2), rank, 2),
            batch_size=3,
        )
    assert finalize(plan, tmp_path / "split") is None and not (tmp_path / "split" / "manifest.json").exists()
    extract(plan, tmp_path / "split", stub_encode, select_shards(plan.num_shards, (1, 2)), batch_size=3)
    assert finalize(plan, tmp_path / "split") == single
    assert json.loads((tmp_path / "split" / "manifest.json").read_text()) == single
