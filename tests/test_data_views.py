"""Image folders, the embedded digits dataset and the view geometry of the code cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccalign.data.dataset import ImageViewDataset
from ccalign.data.digits import load_digits_uint8, split_indices, write_digits
from ccalign.data.folder import list_image_folder
from ccalign.data.views import ViewSpec, center_crop_arr, make_views, random_view, to_model_input

GOLDEN = Path(__file__).resolve().parents[1] / os.environ.get("CCALIGN_GOLDEN_DIR", "tests/golden")


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_class_order_is_sorted_folder_names(tmp_path):
    rng = np.random.default_rng(0)
    for wnid in ("n04592741", "n01440764", "n02102040"):  # created out of order
        for name in ("b.JPEG", "a.png", "sub/c.jpg"):
            _png(tmp_path / wnid / name, rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    (tmp_path / "n01440764" / "notes.txt").write_text("not an image")
    folder = list_image_folder(tmp_path, num_classes=3)
    assert folder.classes == ["n01440764", "n02102040", "n04592741"]
    assert folder.samples[:3] == [("n01440764/a.png", 0), ("n01440764/b.JPEG", 0), ("n01440764/sub/c.jpg", 0)]
    assert [label for _, label in folder.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert folder.load(8).mode == "RGB" and folder.load(8).size == (7, 5)


def test_wrong_class_count_is_a_clear_error(tmp_path):
    for c in ("cat", "dog"):
        _png(tmp_path / c / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(
        ValueError, match=r"has 2 class folders but the config says dataset.num_classes = 1000"
    ):
        list_image_folder(tmp_path, num_classes=1000)


def test_digits_are_written_deterministically(tmp_path):
    a = write_digits(tmp_path / "a", val_count=500, seed=0)
    write_digits(tmp_path / "b", val_count=500, seed=0)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 1797 + 1 and (a["train"], a["val"]) == (1297, 500)
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    # the split is stratified and the pixels are the package's own
    val = list_image_folder(tmp_path / "a" / "val", num_classes=10)
    counts = np.bincount([label for _, label in val.samples])
    assert counts.sum() == 500 and counts.min() >= 48 and counts.max() <= 52
    images, labels = load_digits_uint8()
    rel, label = val.samples[7]
    index = int(Path(rel).stem)
    assert labels[index] == label
    assert np.array_equal(np.asarray(Image.open(val.path(7))), images[index])
    # the split is a function of the seed
    val_files = sorted(int(Path(rel).stem) for rel, _ in val.samples)
    assert np.array_equal(split_indices(labels, 500, 0)[1], val_files)
    assert not np.array_equal(split_indices(labels, 500, 1)[1], val_files)


def test_center_crop_and_normalisation_match_golden():
    g = torch.load(GOLDEN / "llamagen" / "preprocess.pt", weights_only=True)
    img = Image.fromarray(g["pil_input_uint8_hwc"].numpy())
    crop = np.asarray(center_crop_arr(img, g["image_size"]))
    assert np.array_equal(crop, g["center_crop_uint8_hwc"].numpy())
    x = to_model_input(crop.copy())
    assert torch.equal(x, g["normalized_chw"])
    assert torch.equal(x.flip(-1), g["normalized_hflip_chw"])


def test_both_official_normalisations_are_one_function():
    """LlamaGen's (x/255 - 0.5)/0.5 and VAR's 2·x/255 - 1 agree bit for bit on every uint8 value."""
    values = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)  # (H=1, W=256, 3)
    x = torch.from_numpy(values).float().div(255)
    assert torch.equal(to_model_input(values)[0], x[..., 0].sub(0.5).div(0.5))
    assert torch.equal(to_model_input(values)[0], x[..., 0].mul(2).sub(1))


def test_tencrop_gives_ten_views_per_crop_range():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8))
    spec = ViewSpec.from_dict({"mode": "tencrop", "crop_ranges": [1.1, 1.05]}, image_size=16)
    views = make_views(img, spec)
    assert spec.num_views == 20 and views.shape == (20, 16, 16, 3) and views.dtype == np.uint8
    for r, block in zip((1.1, 1.05), (views[:10], views[10:]), strict=True):
        base = np.asarray(center_crop_arr(img, int(16 * r)))  # ADM crop at image_size × crop_range
        n = base.shape[0]
        assert np.array_equal(block[0], base[:16, :16]) and np.array_equal(block[3], base[n - 16 :, n - 16 :])
        # views 5..9 are the same five crops of the mirrored image: each corner's mirror is present
        for a, b in ((5, 1), (6, 0), (7, 3), (8, 2)):
            assert np.array_equal(block[a], block[b][:, ::-1])


def test_shifts_are_every_one_pixel_translation():
    img = np.zeros((8, 8, 3), np.uint8)
    img[2:6, 3:5] = 200
    img[0, 0] = 90
    spec = ViewSpec.from_dict({"mode": "shifts", "pad": 1}, image_size=8)
    views = make_views(Image.fromarray(img), spec)
    assert spec.num_views == 9 and views.shape == (9, 8, 8, 3)
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)))
    expected = [padded[1 - dy : 9 - dy, 1 - dx : 9 - dx] for dy in (1, 0, -1) for dx in (1, 0, -1)]
    assert all(np.array_equal(v, e) for v, e in zip(views, expected, strict=True))
    assert np.array_equal(views[4], img)  # the middle view is the image itself
    assert len({v.tobytes() for v in views}) == 9
    # an image upscaled 2× keeps its one-source-pixel shifts with pad 2, stride 2
    big = ViewSpec.from_dict({"mode": "shifts", "pad": 2, "stride": 2, "hflip": True}, image_size=16)
    assert big.num_views == 18
    with pytest.raises(ValueError, match="stride dividing"):
        ViewSpec.from_dict({"mode": "shifts", "pad": 1, "stride": 3}, image_size=8)


def test_random_views_are_seeded_crops_of_the_resized_image():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
    spec = ViewSpec.from_dict({"mode": "random", "count": 4, "mid_reso": 1.125, "seed": 3}, image_size=16)
    a, b, c = make_views(img, spec, index=5), make_views(img, spec, index=5), make_views(img, spec, index=6)
    assert a.shape == (4, 16, 16, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    resized = np.asarray(img.resize((25, 18), Image.LANCZOS))  # shorter side → round(1.125 × 16) = 18
    windows = {resized[i : i + 16, j : j + 16].tobytes() for i in range(3) for j in range(10)}
    assert all(v.tobytes() in windows for v in a)
    fresh = {random_view(img, spec, np.random.default_rng(s)).tobytes() for s in range(20)}
    assert len(fresh) > 4 and fresh <= windows  # on the fly: new crops every draw


def test_view_spec_rejects_unknown_settings():
    with pytest.raises(ValueError, match="mode must be one of"):
        ViewSpec.from_dict({"mode": "fivecrop"}, image_size=8)
    with pytest.raises(ValueError, match=r"takes \['crop_ranges'\], not \['pad'\]"):
        ViewSpec.from_dict({"mode": "tencrop", "pad": 1}, image_size=8)
    spec = ViewSpec.from_dict({"mode": "tencrop", "image_size": 384, "crop_ranges": [1.1, 1.05]})
    assert spec.to_dict() == {"mode": "tencrop", "image_size": 384, "crop_ranges": [1.1, 1.05]}


def test_image_view_dataset_draws_a_view_per_epoch(tmp_path):
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        for j in range(3):
            _png(tmp_path / c / f"{j}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    spec = ViewSpec.from_dict({"mode": "shifts", "pad": 1}, image_size=8)
    ds = ImageViewDataset(tmp_path, spec, num_classes=2, seed=0)
    x, label = ds[4]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and label == 1
    all_views = to_model_input(make_views(ds.folder.load(4), spec))
    assert any(torch.equal(x, v) for v in all_views)
    assert torch.equal(
        ImageViewDataset(tmp_path, spec, seed=0)[4][0], x
    )  # a function of (seed, epoch, index)
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        seen.add(ds[4][0].numpy().tobytes())
    assert len(seen) > 3  # other epochs, other views
