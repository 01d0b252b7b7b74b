"""A family registered only through the protocol (``tests/toy_family.py``, under the ``ccalign.families``
entry-point group of a distribution made here) plans and runs through the CLI, every stage of a target."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

CONFIG = {
    "experiment": "toy",
    "tracking": {"defer": True},
    "dataset": {
        "name": "digits",
        "source": "sklearn_digits",
        "num_classes": 10,
        "image_size": 8,
        "val_count": 200,
    },
    "tokenizers": {"grey": {"family": "toy", "args": {"levels": 8}, "train": {"steps": 5, "batch_size": 16}}},
    "models": {
        "toy_model": {
            "family": "toy",
            "tokenizer": "grey",
            "args": {"vocab": 8, "seq_len": 16, "num_classes": 10, "dim": 16},
            "variants": {"cca": {"objective": "cca", "lam": 1.0}},
            "cfg_scale": 2.0,
        }
    },
    "targets": {
        "table2": {
            "description": "toy",
            "sets": [
                {"variant": "base", "guidance": ["free", "cfg"]},
                {"variant": "cca", "guidance": ["free"]},
            ],
        }
    },
    "pretrain": {"lr": 1e-2, "global_batch": 16, "max_steps": 4, "precision": "fp32"},
    "finetune": {"beta": 0.3, "lr": 1e-3, "global_batch": 16, "max_steps": 2, "precision": "fp32"},
    "sample": {"per_class": 2, "batch_size": 20, "shard_size": 10},
    "evaluate": {"extractor": "domain", "classifier": {"epochs": 1}},
}


@pytest.fixture
def workspace(tmp_path) -> tuple[Path, dict]:
    site = tmp_path / "site"  # a distribution that registers the toy family, as a plugin package would
    dist = site / "toy_family-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-family\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ccalign.families]\ntoy = toy_family:FAMILY\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "tests"), str(ROOT / "src")])}
    env |= {"OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    return tmp_path, env


def test_a_plugin_family_plans_and_runs_through_the_cli(workspace):
    ws, env = workspace
    ccalign = [str(BIN / "ccalign")]
    listed = subprocess.run(
        [*ccalign, "plan", "--config", "config.yaml"], cwd=ws, env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    jobs = [line.split(": ", 1) for line in listed.stdout.splitlines()]
    assert {name.split("-")[0] for name, _ in jobs} == {
        "prepare_data", "train_tokenizer", "tokenize", "train_classifier", "pretrain", "finetune", "sample",
        "evaluate", "report",
    }  # fmt: skip
    assert any("/toy/toy_model/" in cmd for _, cmd in jobs)
    for name, cmd in jobs:  # in dependency order, as the plan lists them
        done = subprocess.run(cmd, shell=True, cwd=ws, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    with open(ws / "data/report/table2/summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["variant"], r["guidance"]) for r in rows} == {
        ("base", "1.0"),
        ("base", "2.0"),
        ("cca_lam1", "1.0"),
    }
    assert {r["guided"] for r in rows} == {
        "true",
        "false",
    }  # the family's guidance-free scale, read by evaluate
