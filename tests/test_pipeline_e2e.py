"""The whole DAG on the smoke config, through Snakemake and again through `dvc repro` (minutes on 2 cores)."""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ccalign.workflow import Plan

from ccalign.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("MLFLOW_TRACKING_URI", None)

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path = ROOT, timeout: int = 1500) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


def snakemake(cfg: Path, root: Path, *extra: str) -> str:
    return run(
        [
            str(BIN / "snakemake"),
            "--profile",
            "workflow/profiles/local",
            "--configfile",
            str(cfg),
            "--config",
            f"data_root={root}",
            *extra,
        ]
    )


def expected_rows(cfg_path: Path, root: Path) -> set[tuple]:
    cfg = load_config(cfg_path, [f"data_root={root}"])
    rows = set()
    for j in Plan(cfg, str(cfg_path)).jobs():
        if j.stage == "evaluate":
            w = j.wildcards
            objective, lam = ("base", "") if w["variant"] == "base" else w["variant"].split("_lam")
            rows.add(
                (
                    w["family"],
                    w["model"],
                    w["seed"],
                    objective,
                    lam and str(float(lam)),
                    str(float(w["guidance"])),
                )
            )
    return rows


def summary(root: Path) -> list[dict]:
    with open(root / "report" / "summary.csv") as f:
        return list(csv.DictReader(f))


def check_summary(cfg: Path, root: Path) -> None:
    rows = summary(root)
    got = {(r["family"], r["model"], r["seed"], r["objective"], r["lambda"], r["guidance"]) for r in rows}
    assert got == expected_rows(cfg, root)
    for r in rows:
        for k in ("fid", "is", "precision", "recall", "class_acc", "images_per_s"):
            assert math.isfinite(float(r[k])), (k, r)
        assert int(r["n_samples"]) > 0


def job_stats(text: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table of a dry run: rule → count."""
    block = text.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    cfg = work / "smoke.yaml"
    shutil.copy(ROOT / "config" / "smoke.yaml", cfg)
    root = work / "data"
    snakemake(cfg, root)
    return cfg, root


def test_snakemake_runs_every_stage_and_reports(smoke):
    cfg, root = smoke
    check_summary(cfg, root)
    for name in ("summary.md", "fid_is.png"):
        assert (root / "report" / name).stat().st_size > 0
    assert list((root / "report" / "grids").rglob("*.png"))


def test_mlflow_holds_one_run_per_job_with_lineage(smoke):
    cfg, root = smoke
    jobs = Plan(load_config(cfg, [f"data_root={root}"]), str(cfg)).jobs()
    db = sqlite3.connect(root / "mlflow" / "mlflow.db")
    tags: dict[str, dict[str, str]] = {}
    for run_uuid, key, value in db.execute("SELECT run_uuid, key, value FROM tags"):
        tags.setdefault(run_uuid, {})[key] = value
    rules = sorted(t.get("snakemake.rule", "") for t in tags.values())
    assert rules == sorted(j.stage for j in jobs)
    assert len({t["ccalign.group"] for t in tags.values()}) == 1  # one pipeline invocation
    for t in tags.values():
        assert t["git.commit"] and t["ccalign.config_hash"]
        assert t.get("snakemake.wildcards") or t["snakemake.rule"] == "report"  # report has no wildcards


def test_second_invocation_does_nothing_and_lambda_reruns_only_downstream(smoke):
    cfg, root = smoke
    assert "Nothing to be done" in snakemake(cfg, root, "-n")
    edited = yaml.safe_load(cfg.read_text())
    edited["models"]["llamagen_tiny"]["sweep"]["cca"] = [1.0, 2.0]
    cfg.write_text(yaml.safe_dump(edited, sort_keys=False))
    try:
        stats = job_stats(snakemake(cfg, root, "-n"))
    finally:
        shutil.copy(ROOT / "config" / "smoke.yaml", cfg)
    guidance = len(edited["models"]["llamagen_tiny"]["guidance"]["finetuned"])
    assert stats == {"finetune": 1, "sample": guidance, "evaluate": guidance, "report": 1, "all": 1}


def test_dvc_repro_reproduces_the_smoke_pipeline(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("src", "config", "workflow", "pyproject.toml"):
        (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, repo / item)
    # DVC runs stages one at a time: keep one family to bound the time (the Snakemake test runs both).
    smoke = yaml.safe_load((repo / "config" / "smoke.yaml").read_text())
    del smoke["models"]["var_tiny"], smoke["tokenizers"]["msvq_tiny"]
    smoke["tracking"]["defer"] = True  # no MLflow start-up per stage; the report stage sends every run
    (repo / "config" / "smoke.yaml").write_text(yaml.safe_dump(smoke, sort_keys=False))
    run(["git", "init", "-q"], cwd=repo)
    run([str(BIN / "dvc"), "init", "-q"], cwd=repo)
    dvc_yaml = run(
        [sys.executable, "-m", "ccalign.workflow", "--config", "config/smoke.yaml", "--dvc"], cwd=repo
    )
    (repo / "dvc.yaml").write_text(dvc_yaml)
    run([str(BIN / "dvc"), "repro", "--quiet"], cwd=repo)
    check_summary(repo / "config" / "smoke.yaml", repo / "data")
    assert "Data and pipelines are up to date" in run([str(BIN / "dvc"), "status"], cwd=repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(yaml.safe_load(dvc_yaml)["stages"])
    # deferred tracking: nothing left buffered, one finished MLflow run per DVC stage
    assert not list((repo / "data" / "mlflow" / "pending").iterdir())
    db = sqlite3.connect(repo / "data" / "mlflow" / "mlflow.db")
    statuses = [s for (s,) in db.execute("SELECT status FROM runs")]
    assert statuses == ["FINISHED"] * len(lock["stages"])
