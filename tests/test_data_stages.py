"""Stages prepare-data, train-tokenizer, tokenize and cache-verify, as the CLI runs them (flags + cfg)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import BASE_TARGET, run_stage, tiny_tokenizers

from ccalign.config import resolve
from ccalign.data.dataset import CodeDataset
from ccalign.data.digits import load_digits_uint8
from ccalign.families import get_family
from ccalign.io import atomic_save_torch
from ccalign.tools import cache_verify

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = tiny_tokenizers()


def make_cfg(tmp_path: Path, num_classes: int = 10, **tokenizers) -> dict:
    """A resolved config with these tokenizers (a tiny VAR one if none) and a model for each."""
    tokenizers = tokenizers or {"msvq": {"family": "var", "args": TINY["var"]}}
    models = {f"m_{n}": {"family": t["family"], "tokenizer": n, "args": {}} for n, t in tokenizers.items()}
    return resolve(
        {
            "experiment": "test-data",
            "data_root": str(tmp_path / "root"),
            "tracking": {"uri": "http://127.0.0.1:9"},  # unreachable: runs are buffered locally, fast
            "dataset": {
                "name": "digits",
                "source": "sklearn_digits",
                "num_classes": num_classes,
                "image_size": 8,
                "val_count": 500,
                "seed": 0,
            },
            "tokenizers": tokenizers,
            "models": models,
            "targets": BASE_TARGET,
        }
    )


def verify(*argv) -> None:
    parser = argparse.ArgumentParser()
    cache_verify.add_arguments(parser)
    cache_verify.main(parser.parse_args([str(a) for a in argv]))


def tiny_checkpoint(path: Path, family_name: str) -> Path:
    """A random-init tiny tokenizer saved in the official layout ({"model": state_dict})."""
    torch.manual_seed(0)
    tok = get_family(family_name).build_tokenizer(TINY[family_name])
    atomic_save_torch({"model": tok.state_dict()}, path)
    return path


def digits_subset(root: Path, per_class: int, classes: int) -> Path:
    images, labels = load_digits_uint8()
    for c in range(classes):
        for i in np.flatnonzero(labels == c)[:per_class]:
            path = root / "train" / str(c) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
    return root


def test_prepare_data_then_tokenize_and_verify_the_embedded_dataset(tmp_path, caplog):
    tokenizers = {
        "msvq": {
            "family": "var",
            "args": TINY["var"],
            "tokenize": {"views": {"mode": "center"}, "shard_size": 128, "batch_size": 100},
        }
    }
    with pytest.raises(ValueError, match="10 classes but dataset.num_classes is 9"):
        run_stage("prepare_data", make_cfg(tmp_path, num_classes=9), "--out", tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    cfg = make_cfg(tmp_path, **tokenizers)
    run_stage("prepare_data", cfg, "--out", tmp_path / "raw")
    assert json.loads((tmp_path / "raw" / "dataset.json").read_text())["train"] == 1297
    ckpt = tiny_checkpoint(tmp_path / "tok.pt", "var")
    run_stage(
        "tokenize",
        cfg,
        "--tokenizer",
        ckpt,
        "--tokenizer-name",
        "msvq",
        "--data",
        tmp_path / "raw",
        "--split",
        "val",
        "--out",
        tmp_path / "cache",
    )
    ds = CodeDataset(tmp_path / "cache")
    assert (len(ds), ds.num_views, ds.seq_len, ds.num_classes, ds.family) == (500, 1, 21, 10, "var")
    labels = [int(p.parent.name) for p in sorted((tmp_path / "raw" / "val").rglob("*.png"))]
    assert [ds[i][1] for i in range(len(ds))] == labels
    verify("--cache", tmp_path / "cache")  # intact: returns normally
    with open(tmp_path / "cache" / "shard-00002.codes.npy", "r+b") as f:
        f.truncate(100)
    logging.getLogger("ccalign").addHandler(caplog.handler)  # the ccalign logger does not propagate
    try:
        with pytest.raises(SystemExit) as e:
            verify("--cache", tmp_path / "cache")
    finally:
        logging.getLogger("ccalign").removeHandler(caplog.handler)
    assert e.value.code == 1
    assert "shard-00002.codes.npy: truncated (100 bytes" in caplog.text


def test_tokenize_an_imagenet_layout_folder_with_ten_crop(tmp_path):
    rng = np.random.default_rng(0)
    for wnid in ("n02085620", "n01530575", "n01443537"):
        for j, (h, w) in enumerate([(24, 30), (19, 17)]):
            path = tmp_path / "imagenet" / "train" / wnid / f"{wnid}_{j}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
    tokenizers = {
        "vq": {
            "family": "llamagen",
            "args": TINY["llamagen"],
            "tokenize": {
                "views": {"mode": "tencrop", "image_size": 16, "crop_ranges": [1.1, 1.05]},
                "shard_size": 4,
                "batch_size": 2,
            },
        }
    }
    ckpt = tiny_checkpoint(tmp_path / "vq.pt", "llamagen")
    argv = [
        "--tokenizer",
        ckpt,
        "--tokenizer-name",
        "vq",
        "--data",
        tmp_path / "imagenet",
        "--out",
        tmp_path / "c",
    ]
    with pytest.raises(ValueError, match="3 class folders but the config says dataset.num_classes = 1000"):
        run_stage("tokenize", make_cfg(tmp_path, num_classes=1000, **tokenizers), *argv)
    run_stage("tokenize", make_cfg(tmp_path, num_classes=3, **tokenizers), *argv)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["classes"] == ["n01443537", "n01530575", "n02085620"]
    assert (manifest["num_views"], manifest["seq_len"], manifest["num_images"]) == (20, 64, 6)
    assert [s["count"] for s in manifest["shards"]] == [4, 2]
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert manifest["views"] == {"mode": "tencrop", "image_size": 16, "crop_ranges": [1.1, 1.05]}
    ds = CodeDataset(tmp_path / "c")
    assert [ds[i][1] for i in range(6)] == [0, 0, 1, 1, 2, 2]


KILLED_RUN = """
import json, sys
from testkit import run_stage
run_stage("tokenize", json.loads(sys.argv[1]), *sys.argv[2:])
"""


def test_sigkill_during_extraction_then_rerun_gives_the_uninterrupted_manifest(tmp_path):
    digits_subset(tmp_path / "img", per_class=8, classes=4)
    tokenizers = {
        "vq": {
            "family": "llamagen",
            "args": TINY["llamagen"],
            "tokenize": {"views": {"mode": "shifts", "pad": 1}, "shard_size": 2, "batch_size": 2},
        }
    }
    cfg = make_cfg(tmp_path, num_classes=4, **tokenizers)
    ckpt = tiny_checkpoint(tmp_path / "vq.pt", "llamagen")
    argv = ["--tokenizer", ckpt, "--tokenizer-name", "vq", "--data", tmp_path / "img"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_RUN,
            json.dumps(cfg),
            *map(str, argv),
            "--out",
            str(tmp_path / "killed"),
        ],
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)},
    )
    try:
        while proc.poll() is None and not list((tmp_path / "killed").glob("shard-*.json")):
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "extraction finished before it could be killed"
    done = len(list((tmp_path / "killed").glob("shard-*.json")))
    assert 1 <= done < 16 and not (tmp_path / "killed" / "manifest.json").exists()

    run_stage("tokenize", cfg, *argv, "--out", tmp_path / "killed")  # rerun: resumes
    run_stage("tokenize", cfg, *argv, "--out", tmp_path / "clean")  # uninterrupted reference
    resumed = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert resumed == json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert len(resumed["shards"]) == 16 and not list((tmp_path / "killed").glob(".*.tmp"))
    for s in resumed["shards"]:
        assert (tmp_path / "killed" / s["codes"]).read_bytes() == (
            tmp_path / "clean" / s["codes"]
        ).read_bytes()


@pytest.mark.parametrize("family_name", ["llamagen", "var"])
def test_train_tokenizer_resumes_to_the_uninterrupted_result(tmp_path, family_name):
    digits_subset(tmp_path / "img", per_class=4, classes=3)
    train = {"steps": 4, "batch_size": 8, "lr": 1e-3, "seed": 0, "ckpt_every": 2}
    tcfg = {
        "family": family_name,
        "args": TINY[family_name],
        "train": train,
        "tokenize": {"views": {"mode": "shifts", "pad": 1}},
    }
    argv = ["--name", "tok", "--data", tmp_path / "img"]
    run_stage(
        "train_tokenizer",
        make_cfg(tmp_path, num_classes=3, tok=tcfg),
        *argv,
        "--out",
        tmp_path / "a" / "tok.pt",
    )
    # stop half way (a shorter run), then continue to the full length
    half = {**tcfg, "train": {**train, "steps": 2}}
    run_stage(
        "train_tokenizer",
        make_cfg(tmp_path, num_classes=3, tok=half),
        *argv,
        "--out",
        tmp_path / "b" / "tok.pt",
    )
    run_stage(
        "train_tokenizer",
        make_cfg(tmp_path, num_classes=3, tok=tcfg),
        *argv,
        "--out",
        tmp_path / "b" / "tok.pt",
    )

    family = get_family(family_name)
    a = family.load_tokenizer(tmp_path / "a" / "tok.pt", TINY[family_name]).state_dict()
    b = family.load_tokenizer(tmp_path / "b" / "tok.pt", TINY[family_name]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(train["seed"])
    start = family.build_tokenizer(TINY[family_name]).state_dict()  # the weights training started from
    assert any(not torch.equal(a[k], start[k]) for k in a if a[k].is_floating_point())
