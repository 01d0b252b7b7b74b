"""The whole DAG on the smoke config in a copy of the repository (minutes on 2 cores): Snakemake runs it; DVC
and MLflow then know what ran; a second run does nothing; a change of config or code reruns exactly what
depends on it; `--config` values reach the jobs; `dvc repro` in a fresh copy leaves Snakemake nothing to do.

The copy's own sources are the ones every job imports (PYTHONPATH), so editing them is editing the code."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from testkit import copy_repo, one_family

from ccalign.config import load_config
from ccalign.pipeline import Plan

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE = "config/smoke.yaml"
LOCK = ROOT / "tests" / "smoke.dvc.lock"  # the smoke outputs' hashes on the CI machine kind

pytestmark = pytest.mark.slow


def env_for(ws: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "CCALIGN_RUN_GROUP"))}
    return env | {
        "PATH": f"{BIN}:{env['PATH']}",
        "PYTHONPATH": str(ws / "src"),
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
    }


def run(cmd: list[str], ws: Path, timeout: int = 1500) -> str:
    out = subprocess.run(cmd, cwd=ws, env=env_for(ws), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


def snakemake(ws: Path, *extra: str, targets: tuple[str, ...] = ()) -> str:
    """``snakemake`` on the smoke config in ``ws``; targets first (--configfile and --config take every word
    after them)."""
    cmd = [str(BIN / "snakemake"), *targets, "--profile", "workflow/profiles/local", "--configfile", SMOKE]
    return run([*cmd, *extra], ws)


def dvc(ws: Path, *args: str) -> str:
    return run([str(BIN / "dvc"), *args], ws)


def workspace(dest: Path, cfg_edit=None) -> Path:
    """A git clone-like copy of the repository (tracked and untracked files, no data), with DVC, and
    dvc.yaml made for the smoke config."""
    copy_repo(dest)
    if cfg_edit:
        cfg = yaml.safe_load((dest / SMOKE).read_text())
        cfg_edit(cfg)
        (dest / SMOKE).write_text(yaml.safe_dump(cfg, sort_keys=False))
    (dest / "dvc.yaml").write_text(run([str(BIN / "ccalign"), "plan", "--dvc", "--config", SMOKE], dest))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "clone"]):
        run([*git, *args], dest)
    return dest


def job_stats(text: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table of a dry run: rule → count."""
    if "Job stats:" not in text:
        return {}
    block = text.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def dvc_changed(ws: Path) -> set[str]:
    """Stages `dvc status` reports as changed."""
    return set(re.findall(r"^(\S+):\s*$", dvc(ws, "status"), re.M))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = workspace(tmp_path_factory.mktemp("smoke") / "repo")
    snakemake(ws)
    return ws


def plan_of(ws: Path) -> Plan:
    return Plan(load_config(ws / SMOKE), SMOKE)


def test_snakemake_runs_every_target_and_reports(ws):
    plan = plan_of(ws)
    for target in plan.targets:
        with open(ws / f"data/report/{target}/summary.csv") as f:
            rows = list(csv.DictReader(f))
        expected = {(m, str(s), v.name, g) for m, v, g in plan.target_sets(target) for s in plan.cfg["seeds"]}
        assert {(r["model"], r["seed"], r["variant"], float(r["guidance"])) for r in rows} == expected
        for r in rows:
            assert all(math.isfinite(float(r[k])) for k in ("fid", "is", "precision", "recall", "class_acc"))
        grids = sorted((ws / f"data/report/{target}/grids").rglob("*.png"))
        assert grids and all(min(Image.open(g).size) >= 512 for g in grids)  # upscaled: large enough to see
        assert "<table>" in (ws / f"data/report/{target}/summary.html").read_text()
    html = ws / "data/report/report.html"
    run([str(BIN / "snakemake"), "--configfile", SMOKE, "--report", str(html)], ws)
    text = html.read_text()
    assert all(name in text for name in ("summary.csv", "fid_is.png", *plan.targets))


def test_dvc_records_what_snakemake_made(ws):
    assert "Data and pipelines are up to date" in dvc(ws, "status")
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert set(lock) == {j.name for j in plan_of(ws).jobs()}
    assert "Data and pipelines are up to date" in dvc(ws, "status")
    assert "didn't change, skipping" in dvc(ws, "repro")  # nothing to redo
    assert not dvc_changed(ws)


def test_smoke_outputs_match_the_committed_lock(ws):
    """Same inputs, same bytes: the smoke outputs hash as tests/smoke.dvc.lock records (CI machine kind)."""

    def outs(lock: dict) -> dict[str, str]:
        return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st["outs"]}

    if os.environ.get("CCALIGN_UPDATE_SMOKE_LOCK") == "1":  # make smoke-lock: outputs changed on purpose
        shutil.copy(ws / "dvc.lock", LOCK)

    ours, committed = (
        outs(yaml.safe_load((ws / "dvc.lock").read_text())),
        outs(yaml.safe_load(LOCK.read_text())),
    )
    differ = sorted(p for p in committed if ours.get(p) != committed[p])
    assert set(ours) == set(committed) and not differ, (
        f"smoke outputs differ from {LOCK.name}: {differ[:5]} (if intended: make smoke-lock)"
    )


def test_mlflow_has_one_parent_run_with_a_child_per_job(ws):
    db = sqlite3.connect(ws / "data/mlflow/mlflow.db")
    tags: dict[str, dict[str, str]] = {}
    for run_uuid, key, value in db.execute("SELECT run_uuid, key, value FROM tags"):
        tags.setdefault(run_uuid, {})[key] = value
    status = dict(db.execute("SELECT run_uuid, status FROM runs"))
    names = dict(db.execute("SELECT run_uuid, name FROM runs"))
    (parent,) = [r for r, t in tags.items() if t.get("ccalign.role") == "invocation"]
    children = [r for r in tags if r != parent]
    assert status[parent] == "FINISHED" and names[parent].startswith("pipeline · ccalign-smoke")
    assert all(tags[r]["mlflow.parentRunId"] == parent for r in children)
    jobs = plan_of(ws).jobs()
    assert sorted(tags[r]["stage"] for r in children) == sorted(j.stage.name for j in jobs)
    for job in jobs:  # the same tag keys for every stage: the job's labels
        (match,) = [r for r in children if all(tags[r].get(k) == v for k, v in job.labels.items())
                    and tags[r]["stage"] == job.stage.name]  # fmt: skip
        assert status[match] == "FINISHED"
    sample = next(r for r in children if tags[r]["stage"] == "sample" and tags[r]["objective"] == "cca")
    assert re.fullmatch(r"sample · \w+ · cca λ=[\d.]+ · g=[\d.]+ · seed 0", names[sample])
    inputs = db.execute("SELECT destination_id FROM inputs WHERE destination_type = 'RUN'").fetchall()
    assert {r for (r,) in inputs} >= {r for r in children if tags[r]["stage"] in ("pretrain", "finetune")}


def test_second_invocation_does_nothing_and_lambda_reruns_only_downstream(ws):
    assert "Nothing to be done" in snakemake(ws, "-n")
    original = (ws / SMOKE).read_text()
    edited = yaml.safe_load(original)
    edited["models"]["llamagen_tiny"]["variants"]["cca"]["lam"] = 2.0
    (ws / SMOKE).write_text(yaml.safe_dump(edited, sort_keys=False))
    try:
        stats = job_stats(snakemake(ws, "-n"))
        plan = plan_of(ws)
        uses = {  # target → the (variant, guidance) of the edited model that it shows
            t: {(v, g) for m, v, g in plan.target_sets(t) if m == "llamagen_tiny" and v.name == "cca_lam2"}
            for t in plan.targets
        }
    finally:
        (ws / SMOKE).write_text(original)
    sets = set().union(*uses.values())  # a sample made once serves every target that shows it
    reports = sum(bool(u) for u in uses.values())
    assert stats == {"finetune": 1, "sample": len(sets), "evaluate": len(sets), "report": reports, "all": 1}


@pytest.mark.parametrize(
    "module, importer, expected",
    [
        ("sample/shards.py", "sample", {"sample", "evaluate", "report"}),  # imported by the sample stage
        ("report.py", "report", {"report"}),
    ],
)
def test_a_code_change_reruns_exactly_what_imports_it(ws, module, importer, expected):
    path = ws / "src/ccalign" / module
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    try:
        stats = job_stats(snakemake(ws, "-n"))
        changed = dvc_changed(ws)
    finally:
        path.write_text(original)
    jobs = plan_of(ws).jobs()
    assert set(stats) - {"all"} == expected
    assert stats[importer] == sum(j.stage.name == importer for j in jobs)  # every job of the stage
    assert changed == {j.name for j in jobs if j.stage.name == importer}  # DVC: those stages' deps changed
    assert "Nothing to be done" in snakemake(ws, "-n")  # and the edit undone, nothing again


def test_config_values_reach_the_jobs_that_read_them(ws):
    plan = plan_of(ws)
    sample = next(j for j in plan.jobs() if j.stage.name == "sample" and j.labels["objective"] == "cca")
    finetune = next(j for j in plan.jobs() if j.stage.name == "finetune")
    overrides = ("--config", "sample={per_class: 3}", "finetune={lr: 3.0e-5}")
    out = snakemake(ws, *overrides, targets=(sample.output, finetune.output))
    assert set(job_stats(out)) == {"finetune", "sample"}  # nothing upstream reads these values
    record = json.loads((ws / sample.outputs["record"]).read_text())
    assert record["config"]["overrides"] == ["sample.per_class=3"]  # the job gets the values it reads
    assert record["values"][f"models.{sample.labels['model']}.sample"]["per_class"] == 3
    with np.load(ws / sample.output) as z:
        assert np.bincount(z["labels"]).tolist() == [3] * len(np.unique(z["labels"]))
    tuned = json.loads((ws / finetune.outputs["record"]).read_text())
    assert tuned["values"][f"models.{finetune.labels['model']}.finetune"]["lr"] == 3e-5


def test_after_dvc_repro_snakemake_has_nothing_to_do(tmp_path):
    # DVC runs stages one at a time: half the DAG bounds the time
    ws = workspace(tmp_path / "repo", lambda cfg: one_family(cfg, "llamagen"))
    dvc(ws, "repro", "--quiet")
    assert "Data and pipelines are up to date" in dvc(ws, "status")
    assert "Nothing to be done" in snakemake(ws, "-n")
    assert list((ws / "data/report").glob("*/summary.csv"))
