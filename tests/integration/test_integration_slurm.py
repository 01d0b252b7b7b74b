"""The Slurm profile on a real single-node cluster, and the sbatch lines it emits for the paper config."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from harness import (
    HERE,
    SMOKE,
    VENV_BIN,
    base_env,
    comparable,
    experiment_id,
    job_counts,
    keep_one_family,
    read_summary,
    run,
    search_runs,
    slurm_test_profile,
    snakemake,
    tail,
)
from testkit import copy_repo

from ccalign.config import load_config
from ccalign.pipeline import Plan

pytestmark = pytest.mark.slow


def test_sbatch_wrap_job_runs_with_its_resources(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    script = "echo job=$SLURM_JOB_ID cpus=$SLURM_CPUS_PER_TASK mem=$SLURM_MEM_PER_NODE"
    cmd = ["sbatch", "--parsable", "--wait", "-p", slurm_cluster, "--cpus-per-task=1", "--mem=100"]
    p = subprocess.run([*cmd, "-o", str(out), "--wrap", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    assert out.read_text().split() == [f"job={job}", "cpus=1", "mem=100"]
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info


def test_smoke_dag_on_slurm_matches_local_run(
    slurm_cluster, smoke_run, mlflow_server_factory, tmp_path, artifacts_dir
):
    ws = copy_repo(tmp_path / "repo")
    family = keep_one_family(ws)  # every rule still runs; the other family's jobs would only add queue time
    profile = slurm_test_profile(ws, slurm_cluster)
    server = mlflow_server_factory(tmp_path / "mlflow-server")
    log = artifacts_dir / "slurm_smoke.log"
    env = base_env(MLFLOW_TRACKING_URI=server.uri)
    p = run(snakemake("--profile", str(profile), "--configfile", SMOKE), ws, env, log)
    print(f"smoke DAG on Slurm: {p.seconds:.0f} s")

    # Every job of the DAG was one sbatch submission, and Slurm says each COMPLETED.
    n_jobs = sum(job_counts(log).values())
    ids = re.findall(r"has been submitted with SLURM jobid (\d+)", log.read_text())
    assert len(set(ids)) == n_jobs, f"{n_jobs} jobs, {len(ids)} submitted:\n{tail(log)}"
    states = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i %T"], capture_output=True, text=True
    ).stdout.split()
    assert dict(zip(states[::2], states[1::2], strict=True)) == dict.fromkeys(ids, "COMPLETED")

    # Each job's MLflow run names the Slurm job it ran in.
    runs = search_runs(server.uri, experiment_id(server.uri, load_config(ws / SMOKE)["experiment"]))
    jobs = [r for r in runs if r["tags"].get("ccalign.role") != "invocation"]  # the invocation's own run
    assert sorted(r["tags"].get("slurm.job_id", "") for r in jobs) == sorted(ids)

    local = [r for r in read_summary(smoke_run.ws) if r["family"] == family]
    assert comparable(read_summary(ws)) == comparable(local)


# -- the paper config's fine-tuning jobs as the plugin submits them ------------------------------------------
FAKE_COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "sinfo", "scontrol", "sacctmgr", "sshare", "srun")


def dry_run_jobs(log: str, rule: str) -> list[dict[str, str]]:
    """``rule``'s jobs in a ``snakemake -n`` listing: input, output, wildcards, resources lines."""
    jobs = []
    for block in re.split(r"\n(?=rule \w+:\n)", log):
        if block.startswith(f"rule {rule}:\n"):
            fields = dict(re.findall(r"^    (\w+): (.*)$", block, re.M))
            jobs.append(fields)
    return jobs


def test_paper_finetune_jobs_request_gpus_the_plugin_way(tmp_path, artifacts_dir):
    """Every fine-tuning job of config/paper.yaml reaches sbatch with its GPUs, CPUs/GPU, nodes and memory.

    Runs the real Slurm profile with stand-ins for the Slurm commands that record their argv; the
    fine-tuning inputs are empty placeholder files so only those jobs are submitted.
    """
    ws = copy_repo(tmp_path / "repo")
    env = base_env()
    args = ("--profile", "workflow/profiles/slurm", "--configfile", "config/paper.yaml")
    dry = run(snakemake(*args, "-n"), ws, env, artifacts_dir / "paper_dry_run.log", timeout=600)
    jobs = dry_run_jobs((artifacts_dir / "paper_dry_run.log").read_text(), "finetune")
    cfg = load_config(ws / "config/paper.yaml")
    planned = {j.output for j in Plan(cfg, "config/paper.yaml").jobs() if j.stage.name == "finetune"}
    assert {
        j["output"].split(", ")[0] for j in jobs
    } == planned  # every model, every variant the targets fine-tune
    print(f"paper dry run: {dry.seconds:.0f} s, {len(jobs)} finetune jobs")

    for job in jobs:
        for f in job["input"].split(", "):
            (ws / f).parent.mkdir(parents=True, exist_ok=True)
            (ws / f).touch()
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    for name in FAKE_COMMANDS:
        (fake / name).write_text(f"#!{VENV_BIN / 'python'}\n" + (HERE / "fake_slurm.py").read_text())
        (fake / name).chmod(0o755)
    record = tmp_path / "slurm-calls.jsonl"
    record.touch()
    env = base_env(PATH=f"{fake}:{env['PATH']}", FAKE_SLURM_LOG=str(record))
    targets = [j["output"].split(", ")[0] for j in jobs]
    cmd = snakemake(*args, "--allowed-rules", "finetune", "--slurm-status-command", "squeue", *targets)
    with open(artifacts_dir / "paper_fake_sbatch.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and len(_sbatch_calls(record)) < len(jobs):
                assert proc.poll() is None, tail(artifacts_dir / "paper_fake_sbatch.log")
                time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGINT)  # snakemake cancels its "jobs" through the fake scancel
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()  # nothing real runs behind the stand-ins
                proc.wait()
    calls = _sbatch_calls(record)
    assert len(calls) == len(jobs), tail(artifacts_dir / "paper_fake_sbatch.log")

    for argv in calls:
        opts = _options(argv)
        wrap = opts["--wrap"]  # the jobstep's snakemake call: --target-jobs 'finetune:family=..,model=..'
        model = re.search(r"--target-jobs 'finetune:[^']*model=(\w+)", wrap).group(1)
        res = cfg["models"][model]["resources"]["finetune"]
        assert opts.get("--nodes") == str(res["nodes"]), (model, argv)
        # `gpus` is per node (schema); Slurm's --gpus is per job, --gres=gpu:N and --gpus-per-node per node.
        total = (int(opts["--gpus"]) if "--gpus" in opts else 0) + res["nodes"] * (
            int(opts.get("--gpus-per-node", 0)) + int(opts.get("--gres", "gpu:0").split(":")[-1])
        )
        assert total == res["gpus"] * res["nodes"], (model, res, argv)
        assert opts.get("--cpus-per-gpu") == str(res["cpus_per_gpu"]), (model, argv)
        assert "--cpus-per-task" not in opts, argv  # mutually exclusive with --cpus-per-gpu
        assert not any(a.startswith("--ntasks-per-gpu") for a in argv), argv  # torchrun spawns per-GPU ranks
        assert opts.get("--mem") == str(res["mem_mb"]) and opts.get("-t") == str(res["runtime"]), argv
        assert "--executor slurm-jobstep" in wrap, wrap
        assert "--requeue" in argv, argv  # a preempted job goes back to the queue (profile: slurm-requeue)
    submitted = {re.search(r"--target-jobs '([^']*)'", _options(a)["--wrap"]).group(1) for a in calls}
    assert len(submitted) == len(jobs)


def _sbatch_calls(record: Path) -> list[list[str]]:
    lines = [json.loads(x) for x in record.read_text().splitlines() if x.strip()]
    return [c["argv"] for c in lines if c["cmd"] == "sbatch"]


def _options(argv: list[str]) -> dict[str, str]:
    """``--opt=value``, ``--opt value`` and ``-X value`` forms → {option: value} (flags map to "")."""
    opts, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and "=" in a:
            k, v = a.split("=", 1)
            opts[k] = v
        elif a.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            opts[a] = argv[i + 1]
            i += 1
        else:
            opts[a] = ""
        i += 1
    return opts
