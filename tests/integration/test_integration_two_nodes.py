"""The paper config's multi-node fine-tuning on two real Slurm nodes, and its recovery from a killed worker.

The cluster (slurm_cluster.sh, CCALIGN_SLURM_NODES=2) runs each slurmd in its own network namespace with
its own address and hostname. The fine-tuning command is the plan's own (``Plan.jobs()``: srun → torchrun
with the c10d rendezvous on the job's first node, one process per node without GPUs), the multi-node
settings are the paper XXL/3B models' (``resources.finetune.nodes: 2``, ``finetune.fsdp: true``) on the
smoke config's tiny LlamaGen: FSDP over gloo between the two namespaces.

- The plan's command as a two-node batch job gives the same weights as one process with the same global
  batch. Killing the second node's worker mid-run fails the job; Slurm requeues it (as it does a preempted
  job of the Slurm profile, which submits with --requeue; a failed job is resubmitted by Snakemake's
  ``retries`` instead) and the rerun resumes from the last checkpoint to the same weights.
- The same job through the README's Slurm command (ccalign-dag, the Slurm profile, the executor plugin and
  its jobstep) runs on both nodes to the same weights.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from harness import SMOKE, base_env, keep_one_family, run, slurm_test_profile, tail
from testkit import copy_repo

from ccalign.config import load_config
from ccalign.dag import read_proc
from ccalign.pipeline import Plan, join_args

pytestmark = pytest.mark.slow

CONFIG = "config/two_nodes.yaml"
MODEL = "llamagen_tiny"
STEPS = 200
# The paper's multi-node path (config/paper.yaml, XXL and 3B) on the tiny model, without GPUs.
OVERLAY = {
    "resources": {"finetune": {"nodes": 2, "gpus": 0, "mem_mb": 2000, "runtime": 10}},
    "finetune": {
        "fsdp": True,
        # Comparable with one process bit for bit: fp32 (FSDP's bf16 parameters are not autocast), no
        # dropout (each process draws from its own RNG stream; 1e-12 keeps the null-class row), one
        # micro-batch of 8 per process = the single process's two (the same uncond masks and negatives),
        # no gradient clipping (FSDP sums the sharded norm in another order).
        "precision": "fp32",
        "dropout": 0.0,
        "model_args": {"class_dropout_prob": 1.0e-12},
        "micro_batch": 8,
        "grad_clip": 0.0,
        # long enough to kill a worker between two checkpoints
        "lr": 1.0e-3,
        "max_steps": STEPS,
        "ckpt_every": 10,
        "log_every": 50,
    },
}
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def write_config(ws: Path) -> dict:
    keep_one_family(ws)
    cfg = yaml.safe_load((ws / SMOKE).read_text())
    cfg["models"] = {MODEL: {**cfg["models"][MODEL], **copy.deepcopy(OVERLAY)}}
    cfg["targets"] = {"table2": cfg["targets"]["table2"]}  # one CCA fine-tuning job
    (ws / CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_config(ws / CONFIG)


def finetune_job(cfg: dict):
    (job,) = [j for j in Plan(cfg, CONFIG).jobs() if j.stage.name == "finetune"]
    return job


class Cluster:
    """Client commands of the two-node cluster, run from the workspace."""

    def __init__(self, cluster, ws: Path, env: dict):
        self.prefix, self.ws, self.env = cluster.client, ws, {**env, **cluster.names}

    def __call__(self, *cmd: str) -> str:
        p = subprocess.run([*self.prefix, *cmd], cwd=self.ws, env=self.env, capture_output=True, text=True)
        assert p.returncode == 0, f"{' '.join(cmd)}: {p.stderr}"
        return p.stdout.strip()

    def state(self, job: str) -> str:
        return self("squeue", "-h", "-t", "all", "-j", job, "-o", "%T")

    def wait(self, job: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.state(job)) not in DONE:
            assert time.monotonic() < deadline, f"job {job} still {state} after {timeout} s"
            time.sleep(0.5)
        return state

    def requeue(self, job: str, timeout: float = 60) -> None:
        """Requeue a finished job to start now; returns once Slurm shows it queued again (the controller
        applies the request asynchronously: right after it, the job may still read FAILED)."""
        self("scontrol", "requeue", job)
        self("scontrol", "update", f"JobId={job}", "StartTime=now")  # Slurm holds requeued jobs ~2 min
        deadline = time.monotonic() + timeout
        while (state := self.state(job)) in DONE:
            assert time.monotonic() < deadline, f"job {job} still {state} {timeout} s after its requeue"
            time.sleep(0.2)


def worker_pids(job: str, node: str) -> list[int]:
    """The torchrun workers of Slurm job ``job`` on ``node`` (same machine: their /proc is visible)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            _, _, env = read_proc(int(entry.name))
        except OSError:  # exited meanwhile
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == node and "LOCAL_RANK" in env:
            pids.append(int(entry.name))
    return pids


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(got: Path, want: Path, base: Path) -> None:
    a, b, start = weights(got), weights(want), weights(base)
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    moved = max((b[k] - start[k]).abs().max().item() for k in b)
    assert moved > 1e-2, f"fine-tuning barely moved the weights ({moved}): the comparison would be empty"


@pytest.fixture(scope="module")
def prepared(smoke_run, tmp_path_factory, artifacts_dir) -> SimpleNamespace:
    """A workspace with the two-node config, the smoke run's inputs and the one-process weights."""
    ws = copy_repo(tmp_path_factory.mktemp("two-nodes") / "repo")
    cfg = write_config(ws)
    job = finetune_job(cfg)
    assert job.args[0] == "srun" and "--nnodes=2" in job.args, job.args
    env = base_env(OMP_NUM_THREADS="1")
    # inputs (tokenizer, code cache, base model): the smoke run's (the overlay changes only fine-tuning)
    for name, path in job.inputs.items():
        src = smoke_run.ws / path
        assert src.is_file(), f"the smoke run has no {path}"
        if name == "cache":  # the manifest stands for its directory of shards
            shutil.copytree(src.parent, (ws / path).parent, dirs_exist_ok=True)
        else:
            (ws / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ws / path)
    # one process, same settings
    single_cfg = copy.deepcopy(cfg)
    single_cfg["models"][MODEL]["resources"]["finetune"]["nodes"] = 1
    single = finetune_job(single_cfg).args
    assert single[:2] == ["ccalign", "finetune"], single  # no launcher for one node without GPUs
    reference = ws.parent / "one-process" / "model.pt"
    single[single.index("--out") + 1] = str(reference)
    p = run(single, ws, env, artifacts_dir / "two_nodes_one_process.log")
    print(f"one-process run: {p.seconds:.0f} s")
    return SimpleNamespace(ws=ws, job=job, env=env, reference=reference, base=ws / job.inputs["base"])


def fresh_output(job, ws: Path) -> Path:
    """The job's output path, with every trace of an earlier run there removed."""
    out = ws / job.output
    for f in (out, out.with_suffix(".json")):
        f.unlink(missing_ok=True)
    shutil.rmtree(out.parent / f"{out.stem}_state", ignore_errors=True)
    return out


def test_fsdp_on_two_nodes_matches_one_process_and_resumes_after_a_killed_worker(slurm_two_nodes, prepared):
    ws, job = prepared.ws, prepared.job
    out = fresh_output(job, ws)
    cluster = Cluster(slurm_two_nodes, ws, prepared.env)
    script = ws / "finetune.sbatch"
    script.write_text(f"#!/bin/bash\nset -euo pipefail\n{join_args(job.args)}\n")
    res = job.resources
    sbatch = [
        "sbatch",
        "--parsable",
        f"--nodes={res['nodes']}",
        f"--ntasks={res['nodes']}",
        "--cpus-per-task=1",
    ]
    sbatch += [f"--mem={res['mem_mb']}", f"--time={res['runtime']}", "--requeue", "-D", str(ws)]

    # 1. two nodes, uninterrupted = one process
    t1 = time.monotonic()
    first = cluster(*sbatch, "-o", str(ws / "slurm-%j.out"), str(script))
    assert cluster.wait(first) == "COMPLETED", tail(ws / f"slurm-{first}.out")
    text = (ws / f"slurm-{first}.out").read_text()
    assert f"{STEPS} steps" in text and "= 2 processes × 1 micro-batches × 8" in text, text[-3000:]
    assert cluster("squeue", "-h", "-t", "all", "-j", first, "-o", "%N") == "node[1-2]"
    assert_same_weights(out, prepared.reference, prepared.base)
    print(f"two-node run: {time.monotonic() - t1:.0f} s")

    # 2. the second node's worker killed after a checkpoint: the job fails; requeued, it resumes
    out = fresh_output(job, ws)
    t2 = time.monotonic()
    second = cluster(*sbatch, "-o", str(ws / "slurm-%j.out"), str(script))
    checkpoint = out.parent / f"{out.stem}_state" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert cluster.state(second) not in DONE, tail(ws / f"slurm-{second}.out")
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    (victim,) = worker_pids(second, "node2")
    os.kill(victim, signal.SIGKILL)
    failed = cluster.wait(second)
    assert failed == "FAILED", f"{failed}: the kill came too late?\n{tail(ws / f'slurm-{second}.out')}"
    assert not out.exists()
    cluster.requeue(second)
    assert cluster.wait(second) == "COMPLETED", tail(ws / f"slurm-{second}.out")
    text = (ws / f"slurm-{second}.out").read_text()
    resumed = {int(s) for s in re.findall(r"resuming from \S+ at step (\d+)", text)}
    assert len(resumed) == 1 and 0 < min(resumed) < STEPS, tail(ws / f"slurm-{second}.out")
    assert_same_weights(out, prepared.reference, prepared.base)
    print(f"killed worker, requeued, resumed at step {min(resumed)}: {time.monotonic() - t2:.0f} s")


def test_finetune_job_through_the_slurm_profile_runs_on_both_nodes(slurm_two_nodes, prepared, artifacts_dir):
    ws, job = prepared.ws, prepared.job
    out = fresh_output(job, ws)
    profile = slurm_test_profile(ws, slurm_two_nodes.partition)
    cmd = [sys.executable, "-m", "ccalign.dag", job.output, "--profile", str(profile), "--configfile", CONFIG]
    log = artifacts_dir / "two_nodes_snakemake.log"
    t0 = time.monotonic()
    with open(log, "w") as fh:  # Snakemake runs where the clients do: the cluster's login namespace
        env = {**prepared.env, **slurm_two_nodes.names}
        p = subprocess.run(
            [*slurm_two_nodes.client, *cmd], cwd=ws, env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    job_logs = list((ws / "data" / "logs" / "finetune").rglob("*.log"))
    assert p.returncode == 0, f"{tail(log, 30)}\n--- the job's log:\n" + "\n".join(tail(f) for f in job_logs)
    (submitted,) = re.findall(r"has been submitted with SLURM jobid (\d+)", log.read_text())
    cluster = Cluster(slurm_two_nodes, ws, prepared.env)
    assert cluster("squeue", "-h", "-t", "all", "-j", submitted, "-o", "%T %N") == "COMPLETED node[1-2]"
    (job_log,) = job_logs
    assert "= 2 processes × 1 micro-batches × 8" in job_log.read_text(), tail(job_log)
    assert_same_weights(out, prepared.reference, prepared.base)
    print(f"through ccalign-dag and the Slurm profile: {time.monotonic() - t0:.0f} s")
