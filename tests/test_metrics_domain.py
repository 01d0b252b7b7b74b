"""The domain feature extractor: a classifier trained on digits, registered with torch-fidelity, and the
``train-classifier`` / ``evaluate --extractor domain`` stages end to end (offline, CPU)."""

import argparse
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from sklearn.datasets import load_digits

from ccalign.config import load_config
from ccalign.io import sha256_file
from ccalign.metrics import domain
from ccalign.metrics.features import domain_features
from ccalign.metrics.images import content_sha256, read_image_folder
from ccalign.metrics.protocol import ImageSet, evaluate
from ccalign.stages import evaluate as evaluate_stage
from ccalign.stages import train_classifier

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"batch_size": 128, "device": "cpu", "is_split_size": 5000, "prc_k": 3, "prc_batch_size": 1000}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(tmp: Path) -> dict:
    """The embedded config with an unreachable tracking server: runs are buffered under data_root."""
    cfg = load_config(ROOT / "config" / "config.yaml", [f"data_root={tmp}"])
    cfg["tracking"]["uri"] = f"http://127.0.0.1:{_closed_port()}"
    cfg["evaluate"]["classifier"] |= {"epochs": 10, "batch_size": 32}
    cfg["evaluate"] |= SETTINGS
    return cfg


def _write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / str(y) / f"{i:04d}.png")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """sklearn digits as 8x8 RGB PNG folders: 800 train, 300 val."""
    root = tmp_path_factory.mktemp("digits")
    d = load_digits()
    images = np.repeat((d.images / 16 * 255).round().astype(np.uint8)[..., None], 3, axis=-1)  # (N, 8, 8, 3)
    order = np.random.default_rng(0).permutation(len(images))
    train, val = order[:800], order[800:1100]
    _write_folder(root / "train", images[train], d.target[train])
    _write_folder(root / "val", images[val], d.target[val])
    return root


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clf") / "classifier.pt"
    cfg = _cfg(out.parent)
    args = argparse.Namespace(data=digits / "train", val=digits / "val", out=out, labels={})
    train_classifier.main(cfg, args)
    return out, cfg


def test_classifier_trains_to_high_accuracy(classifier, digits):
    path, cfg = classifier
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["classes"] == [str(i) for i in range(10)]
    assert ckpt["config"]["image_size"] == [8, 8]
    assert ckpt["metrics"]["val_accuracy"] > 0.9
    model, _ = domain.load(path)
    images, labels, _ = read_image_folder(digits / "val")
    assert np.mean(domain.predict(model, images) == labels) == ckpt["metrics"]["val_accuracy"]
    pending = list((Path(cfg["data_root"]) / "mlflow" / "pending").glob("*.json"))
    assert any("val_accuracy" in p.read_text() for p in pending)


def test_random_shift_translates_each_image():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    out = domain.random_shift(x, 1, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    for b in range(2):
        crops = [padded[b, :, dy : dy + 4, dx : dx + 4] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[b], c) for c in crops)


def _uint8_dataset(images: np.ndarray) -> torch.utils.data.Dataset:
    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return torch.from_numpy(images[i]).permute(2, 0, 1).contiguous()

    return Images()


def test_torch_fidelity_with_the_registered_extractor_agrees(classifier, digits):
    path, _ = classifier
    images = read_image_folder(digits / "val")[0]
    fake, real = ImageSet(Path("fake"), array=images[:150]), ImageSet(Path("real"), array=images[150:])
    ours = evaluate(fake, real, domain_features(path), SETTINGS, use_stored_stats=False)
    theirs = torch_fidelity.calculate_metrics(
        input1=_uint8_dataset(fake.array),
        input2=_uint8_dataset(real.array),
        feature_extractor=domain.EXTRACTOR,
        feature_extractor_weights_path=str(path),
        fid=True,
        isc=True,
        isc_splits=1,  # 150 samples: one split under ADM's rule (parts of 5,000)
        prc=True,
        cuda=False,
        verbose=False,
        save_cpu_ram=True,
    )
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)
    assert ours["fid"] > 0 and 3 < ours["is"] <= 10  # 10 classes bound the IS


def test_evaluate_stage_with_the_domain_extractor(classifier, digits, tmp_path):
    path, cfg = classifier
    images, labels, _ = read_image_folder(digits / "val")
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images, labels=labels)
    out = tmp_path / "eval" / "metrics.json"
    args = argparse.Namespace(
        samples=samples,
        reference=digits / "val",
        extractor="domain",
        inception_weights=None,
        classifier=path,
        out=out,
        labels={},
    )
    evaluate_stage.main(cfg, args)
    record = json.loads(out.read_text())
    m = record["metrics"]
    assert set(m) == {"fid", "is", "is_std", "precision", "recall", "class_accuracy"}
    assert abs(m["fid"]) < 1e-6 and m["precision"] == m["recall"] == 1.0  # the reference itself
    assert m["class_accuracy"] == pytest.approx(
        torch.load(path, weights_only=True)["metrics"]["val_accuracy"]
    )
    assert record["n"] == 300 and record["extractor"] == "domain"
    assert record["samples_sha256"] == sha256_file(samples)
    assert record["extractor_sha256"] == sha256_file(path)
    assert record["reference_sha256"] == content_sha256(digits / "val") != content_sha256(digits / "train")


def test_evaluate_rejects_labels_outside_the_classifier(classifier, digits, tmp_path):
    path, cfg = classifier
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=ImageSet.open(digits / "val").array[:20], labels=np.full(20, 10))
    args = argparse.Namespace(
        samples=samples,
        reference=digits / "val",
        extractor="domain",
        inception_weights=None,
        classifier=path,
        out=tmp_path / "m.json",
        labels={},
    )
    with pytest.raises(ValueError, match=r"labels span \[10, 10\] but the classifier has 10 classes"):
        evaluate_stage.main(cfg, args)
    assert not (tmp_path / "m.json").exists()


def test_evaluate_names_a_corrupt_samples_file(classifier, digits, tmp_path):
    path, cfg = classifier
    samples = tmp_path / "samples.npz"
    samples.write_bytes(b"PK\x03\x04 truncated")
    args = argparse.Namespace(
        samples=samples,
        reference=digits / "val",
        extractor="domain",
        inception_weights=None,
        classifier=path,
        out=tmp_path / "m.json",
        labels={},
    )
    with pytest.raises(ValueError, match="not a readable .npz") as err:
        evaluate_stage.main(cfg, args)
    assert str(samples) in str(err.value)


def test_domain_extractor_needs_a_classifier_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        domain_features(tmp_path / "missing.pt")
