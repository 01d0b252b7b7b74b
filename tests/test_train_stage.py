"""The ``pretrain`` and ``finetune`` stages end to end: config → code cache → model.pt, with MLflow records.

A tiny LlamaGen config, a real (hand-written, two-shard) code cache read by ``CodeDataset``, and a tracking
URI nobody answers, so the run is recorded in the offline buffer (data_root/mlflow/pending) and inspected.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from testkit import BASE_TARGET, run_stage, stage_args

from ccalign import cli
from ccalign.config import resolve
from ccalign.data.cache import FORMAT, MANIFEST, shard_files
from ccalign.families import get_family
from ccalign.pipeline import stages
from ccalign.train.checkpoint import STATE_FILE
from ccalign.train.data import StepSampler
from ccalign.train.stage import state_dir_for

FAMILY = get_family("llamagen")
TOKENIZER_ARGS = dict(
    codebook_size=16,
    codebook_embed_dim=4,
    ch=32,  # GroupNorm has 32 groups
    encoder_ch_mult=[1, 2],
    decoder_ch_mult=[1, 2],
    z_channels=32,
    codebook_show_usage=False,
)
MODEL_ARGS = dict(
    dim=32,
    n_layer=2,
    n_head=2,
    multiple_of=32,
    vocab_size=16,
    block_size=4,
    num_classes=3,
    class_dropout_prob=0.1,
)


def write_cache(
    cache: Path, n: int = 40, family: str = "llamagen", vocab_size: int = 16, codes: np.ndarray | None = None
) -> None:
    """A two-shard, two-view code cache in the data module's layout; ``codes`` (n, 2, 4) or random."""
    g = np.random.default_rng(0)
    codes = g.integers(0, 16, (n, 2, 4)) if codes is None else codes
    cache.mkdir(parents=True)
    shards = []
    for k, count in enumerate((n // 2, n - n // 2)):
        files = shard_files(k)
        np.save(cache / files["codes"], codes[k * (n // 2) :][:count].astype(np.uint16))
        np.save(cache / files["labels"], g.integers(0, 3, count).astype(np.int16))
        entry = {"index": k, "count": count, "codes": files["codes"], "labels": files["labels"]}
        for kind in ("codes", "labels"):  # the records training checks the shards against
            data = (cache / files[kind]).read_bytes()
            entry[f"{kind}_bytes"], entry[f"{kind}_sha256"] = len(data), hashlib.sha256(data).hexdigest()
        shards.append(entry)
    manifest = {
        "format": FORMAT,
        "family": family,
        "vocab_size": vocab_size,
        "seq_len": 4,
        "num_classes": 3,
        "num_views": 2,
        "num_images": n,
        "shards": shards,
    }
    (cache / MANIFEST).write_text(json.dumps(manifest))


def make_config(root: Path) -> dict:
    cfg = {
        "experiment": "test-train-stage",
        "data_root": str(root / "data"),
        "tracking": {"uri": "http://127.0.0.1:9"},  # refused at once: offline buffer
        "dataset": {"name": "toy", "source": "imagefolder", "num_classes": 3, "image_size": 8},
        "tokenizers": {"vq": {"family": "llamagen", "args": TOKENIZER_ARGS}},
        "models": {
            "tiny": {
                "family": "llamagen",
                "tokenizer": "vq",
                "args": MODEL_ARGS,
                "finetune": {"model_args": {"class_dropout_prob": 1e-5}, "lr": 1e-3},
            }
        },
        "targets": BASE_TARGET,
        "pretrain": {"lr": 1e-2, "global_batch": 8, "max_steps": 6, "precision": "fp32", "log_every": 3},
        "finetune": {
            "beta": 0.1,
            "uncond_ratio": 0.1,
            "global_batch": 8,
            "micro_batch": 4,
            "epochs": 1,
            "precision": "fp32",
            "log_every": 2,
            "ckpt_every": 2,
            "keep_dropout": True,
        },
    }
    return resolve(cfg)


def pending_runs(cfg: dict) -> list[dict]:
    return [
        json.loads(p.read_text())
        for p in sorted((Path(cfg["data_root"]) / "mlflow" / "pending").glob("*.json"))
    ]


def test_pretrain_then_finetune_stages(tmp_path: Path):
    cfg = make_config(tmp_path)
    cache, tok = tmp_path / "cache", tmp_path / "tokenizer.pt"
    write_cache(cache)
    FAMILY.save_tokenizer(FAMILY.build_tokenizer(TOKENIZER_ARGS), tok)
    base, tuned = tmp_path / "pretrain" / "model.pt", tmp_path / "ft" / "cca_lam2.0" / "model.pt"

    run_stage(
        "pretrain", cfg, "--model", "tiny", "--seed", 0, "--tokenizer", tok, "--cache", cache, "--out", base
    )
    labels = "family=llamagen,model=tiny,seed=1,objective=cca,lambda=2"
    argv = [
        "--labels",
        labels,
        "--record",
        f"{tuned}.job.json",
        "--model",
        "tiny",
        "--seed",
        "1",
        "--objective",
        "cca",
        "--lam",
        "2.0",
        "--base",
        str(base),
        "--tokenizer",
        str(tok),
        "--cache",
        str(cache),
        "--out",
        str(tuned),
    ]
    with mock.patch("ccalign.cli.load_config", lambda *a: cfg):  # the CLI's path: work, then the record
        cli.run_stage(stages()["finetune"], stage_args("finetune", *argv))

    model = FAMILY.load_model(tuned, MODEL_ARGS)  # the official layout, loadable strictly
    assert not torch.equal(
        model.state_dict()["output.weight"], FAMILY.load_model(base, MODEL_ARGS).output.weight
    )
    assert FAMILY.load_model(tuned).config.class_dropout_prob == 1e-5  # the arguments it was trained with
    record = json.loads(Path(f"{tuned}.job.json").read_text())
    assert record["stage"] == "finetune" and record["labels"]["lambda"] == "2"
    resolved = record["values"]["models.tiny.finetune"]
    assert resolved["lr"] == 1e-3 and resolved["beta"] == 0.1  # the model's own, then the top level
    assert resolved["model_args"] == {"class_dropout_prob": 1e-5}
    assert not state_dir_for(tuned).exists()

    runs = {r["tags"]["stage"]: r for r in pending_runs(cfg)}
    assert set(runs) == {"pretrain", "finetune"}
    ft = runs["finetune"]
    assert ft["status"] == "FINISHED" and ft["tags"]["lambda"] == "2"
    assert ft["run_name"] == "finetune · tiny · cca λ=2 · seed 1"
    assert ft["params"]["finetune.resolved.lam"] == "2.0" and ft["params"]["finetune.resolved.beta"] == "0.1"
    logged = {name for name, *_ in ft["metrics"]}
    assert {
        "loss",
        "accuracy",
        "margin",
        "reward_pos",
        "reward_neg",
        "lr",
        "grad_norm",
        "images_per_s",
        "tokens_per_s",
        "peak_memory_mb",
    } <= logged
    assert sorted({step for _, _, step, _ in ft["metrics"]}) == [2, 4, 5]  # every log step and the last
    assert "nll" in {name for name, *_ in runs["pretrain"]["metrics"]}


def test_finetune_refuses_a_cache_of_another_family_or_vocabulary(tmp_path: Path):
    cfg = make_config(tmp_path)
    tok, base = tmp_path / "tokenizer.pt", tmp_path / "base.pt"
    FAMILY.save_tokenizer(FAMILY.build_tokenizer(TOKENIZER_ARGS), tok)
    FAMILY.save_model(FAMILY.build_model(MODEL_ARGS), base)
    for name, kwargs, match in [
        ("var", dict(family="var"), "made by a var tokenizer"),
        ("big", dict(vocab_size=4096), "vocab_size = 4096 does not match"),
    ]:
        write_cache(tmp_path / name, **kwargs)
        argv = [
            "--model",
            "tiny",
            "--seed",
            "0",
            "--objective",
            "dpo",
            "--lam",
            "1",
            "--base",
            str(base),
            "--tokenizer",
            str(tok),
            "--cache",
            str(tmp_path / name),
            "--out",
            str(tmp_path / "o" / "m.pt"),
        ]
        with pytest.raises(ValueError, match=match):
            run_stage("finetune", cfg, *argv)


def test_finetune_cli_stops_at_a_nonfinite_loss(tmp_path: Path):
    """``ccalign finetune`` from a base whose code 15 embeds to 3.3e38 (finite: the base loads; token
    dropout's 1 / 0.9 rescaling overflows it), on a cache that feeds code 15 first at step 3: one clear
    error, a non-zero exit, no model.pt, and the checkpoint of step 2 kept."""
    cfg = make_config(tmp_path)
    cfg["finetune"]["ckpt_every"] = 1
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    seed = 1
    codes = np.random.default_rng(0).integers(0, 15, (40, 2, 4))  # no 15 anywhere
    batches = list(
        StepSampler(40, global_batch=8, micro_batch=4, rank=0, world_size=1, seed=seed, stop_step=5)
    )
    codes[batches[2 * 2][0], :, 0] = 15  # step 3's first image, both views, an input position
    write_cache(tmp_path / "cache", codes=codes)
    tok, base, out = tmp_path / "tokenizer.pt", tmp_path / "base.pt", tmp_path / "ft" / "model.pt"
    FAMILY.save_tokenizer(FAMILY.build_tokenizer(TOKENIZER_ARGS), tok)
    model = FAMILY.build_model(MODEL_ARGS)
    with torch.no_grad():
        model.tok_embeddings.weight[15] = 3.3e38
    FAMILY.save_model(model, base)
    argv = ["--model", "tiny", "--seed", str(seed), "--objective", "cca", "--lam", "2", "--base", str(base)]
    argv += ["--tokenizer", str(tok), "--cache", str(tmp_path / "cache"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ccalign", "finetune", "--config", str(config), *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode != 0, done.stderr[-3000:]
    assert "step 3: loss nan" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not out.exists()
    assert torch.load(state_dir_for(out) / STATE_FILE, weights_only=True)["step"] == 2
