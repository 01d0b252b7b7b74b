"""The smoke DAG tracked by a real MLflow server: runs, params, metrics and artifacts read back over REST."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from harness import (
    SMOKE,
    base_env,
    experiment_id,
    get_artifact,
    job_counts,
    keep_one_family,
    list_artifacts,
    read_summary,
    run,
    search_runs,
    snakemake,
    tail,
)
from testkit import copy_repo

from ccalign.config import load_config

pytestmark = pytest.mark.slow

LINEAGE = ("stage", "ccalign.config_hash", "ccalign.group", "git.commit", "mlflow.parentRunId")


def smoke_experiment(ws: Path) -> str:
    return load_config(ws / SMOKE).get("experiment", "ccalign")


def job_key(run: dict) -> str:
    return run["info"]["run_name"]  # "sample · llamagen_tiny · cca λ=1 · g=1 · seed 0": one per job


def children(runs: list[dict]) -> list[dict]:
    """The job runs (the invocation's own parent run left out)."""
    return [r for r in runs if r["tags"].get("ccalign.role") != "invocation"]


def test_every_stage_is_one_finished_run_with_lineage(smoke_run):
    uri, ws = smoke_run.server.uri, smoke_run.ws
    everything = search_runs(uri, experiment_id(uri, smoke_experiment(ws)))
    (parent,) = [r for r in everything if r["tags"].get("ccalign.role") == "invocation"]
    assert parent["info"]["status"] == "FINISHED"
    runs = children(everything)
    assert {r["tags"]["mlflow.parentRunId"] for r in runs} == {parent["info"]["run_id"]}
    n_jobs = sum(job_counts(smoke_run.log).values())
    assert len(runs) == n_jobs, f"{len(runs)} runs for {n_jobs} jobs"
    assert len({job_key(r) for r in runs}) == n_jobs  # one run per job, named after it
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}
    for r in runs:
        missing = [t for t in LINEAGE if not r["tags"].get(t)]
        assert not missing, (r["info"]["run_name"], missing)
    assert len({r["tags"]["ccalign.group"] for r in runs}) == 1  # one pipeline invocation
    cfg = load_config(ws / SMOKE)
    assert all(r["params"].get("data_root") == str(cfg["data_root"]) for r in runs)


def test_metrics_and_artifacts_match_the_files(smoke_run):
    uri, ws = smoke_run.server.uri, smoke_run.ws
    runs = search_runs(uri, experiment_id(uri, smoke_experiment(ws)))
    summary = read_summary(ws)

    # Every evaluated sample set's FID is a metric of one evaluate run.
    fids = sorted(r["metrics"]["fid"] for r in runs if r["tags"].get("stage") == "evaluate")
    assert fids == pytest.approx(sorted(float(row["fid"]) for row in summary), rel=1e-6)

    # Each report run holds its target's summary.csv, byte for byte, downloadable through the server.
    reports = [r for r in runs if r["tags"].get("stage") == "report"]
    cfg = load_config(ws / SMOKE)
    assert {r["tags"]["target"] for r in reports} == set(cfg["targets"])
    for report in reports:
        files = list_artifacts(uri, report["info"]["run_id"])
        csv_path = next(f for f in files if f.endswith("summary.csv"))
        local = ws / cfg["data_root"] / "report" / report["tags"]["target"] / "summary.csv"
        assert get_artifact(uri, report["info"]["run_id"], csv_path) == local.read_bytes()


def test_server_outage_mid_run_loses_no_records(mlflow_server_factory, tmp_path, artifacts_dir):
    """Stop the server while the DAG runs: the DAG completes, buffered runs are replayed once it is back."""
    ws = copy_repo(tmp_path / "repo")
    keep_one_family(ws)
    server = mlflow_server_factory(tmp_path / "mlflow-server")
    exp_name, data_root = smoke_experiment(ws), load_config(ws / SMOKE)["data_root"]
    env = base_env(MLFLOW_TRACKING_URI=server.uri)
    log = artifacts_dir / "smoke_outage.log"
    cmd = snakemake("--profile", "workflow/profiles/local", "--configfile", SMOKE)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT)
        # Once one stage has finished and another is mid-run, take the server away for the rest of the DAG.
        while not _mid_run(server.uri, exp_name):
            assert proc.poll() is None, f"DAG ended before a stage was caught mid-run:\n{tail(log)}"
            time.sleep(0.2)
        server.stop()
        assert proc.wait(timeout=1800) == 0, tail(log)
    n_jobs = sum(job_counts(log).values())
    pending = list((ws / data_root / "mlflow" / "pending").glob("*.json"))
    assert pending, "no stage ran while the server was down (the DAG finished too soon)"
    stage_logs = (ws / data_root / "logs").rglob("*.log")
    assert any("unreachable" in f.read_text() for f in stage_logs)  # the stages said they went offline

    # Server back: the next stage that reaches it replays what was buffered.
    server.start()
    run(cmd + ["--forcerun", "report"], ws, env, artifacts_dir / "smoke_outage_replay.log")
    assert not list((ws / data_root / "mlflow" / "pending").glob("*.json"))
    runs = children(search_runs(server.uri, experiment_id(server.uri, exp_name)))
    finished = {job_key(r) for r in runs if r["info"]["status"] == "FINISHED"}
    assert len(finished) == n_jobs, f"{len(finished)} of {n_jobs} jobs have a finished run"
    assert sum(r["tags"].get("ccalign.replayed") == "true" for r in runs) >= len(pending)
    # The stage that was running when the server went away is not left behind as a stale RUNNING run.
    assert not [r["info"]["run_name"] for r in runs if r["info"]["status"] == "RUNNING"]


def _mid_run(uri: str, exp_name: str) -> bool:
    """True when at least one run has FINISHED and one is RUNNING."""
    try:
        status = {r["info"]["status"] for r in search_runs(uri, experiment_id(uri, exp_name))}
    except OSError:  # experiment not created yet (HTTP 404) or server busy
        return False
    return {"FINISHED", "RUNNING"} <= status
