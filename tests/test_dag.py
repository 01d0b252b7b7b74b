"""ccalign-dag: a lock left by a killed run is removed, a live run is never unlocked.

Each case builds the situation with real processes (a live ccalign-dag run, a plain ``snakemake``, a job
left behind by a killed run, queued Slurm jobs, a run of another host) and runs ``python -m ccalign.dag``
in it; when it may start, it execs the real ``snakemake --version``. The whole DAG killed and resumed is
tests/integration/test_integration_resume.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ccalign import dag


def ccalign_dag(cwd: Path, *args: str, queue: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m ccalign.dag ARGS`` in ``cwd``, with a stand-in ``squeue`` that lists ``queue``."""
    fake = cwd.parent / f"{cwd.name}-bin"
    fake.mkdir(exist_ok=True)
    (fake / "squeue").write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in queue))
    (fake / "squeue").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != dag.ENV_DIR}
    env["PATH"] = f"{fake}:{env['PATH']}"
    cmd = [sys.executable, "-m", "ccalign.dag", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def stale_lock(root: Path) -> Path:
    """What a killed Snakemake leaves: its lock files under .snakemake/locks/."""
    locks = root / ".snakemake" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "0.input.lock").write_text(f"{root}/data/x\n")
    (locks / "0.output.lock").write_text(f"{root}/data/y\n")
    return locks


def start(cmd: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    full = {**{k: v for k, v in os.environ.items() if k != dag.ENV_DIR}, **env}
    return subprocess.Popen(cmd, cwd=cwd, env=full, stdout=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def assert_starts(root: Path) -> str:
    """ccalign-dag removes the stale lock and runs snakemake (``--version``); its stderr."""
    p = ccalign_dag(root, "--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == importlib.metadata.version("snakemake")
    assert "removed Snakemake's lock left by a run that is no longer live" in p.stderr
    assert not (root / ".snakemake" / "locks").exists()
    return p.stderr


def assert_refused(root: Path, p: subprocess.CompletedProcess, *says: str) -> None:
    assert p.returncode == dag.REFUSED, p.stderr
    assert p.stderr.startswith("ccalign-dag: refusing to start: "), p.stderr
    for text in says:
        assert text in p.stderr, p.stderr
    assert sorted(os.listdir(root / ".snakemake" / "locks")) == ["0.input.lock", "0.output.lock"]


def test_stale_lock_is_removed_and_the_run_recorded(tmp_path):
    stale_lock(tmp_path)
    assert_starts(tmp_path)
    record = json.loads((tmp_path / ".snakemake" / dag.LOCK_FILE).read_text())
    assert record["argv"] == ["--version"] and record["host"] and record["pid"] > 0


def test_live_run_is_refused_and_its_lock_kept_until_it_dies(tmp_path):
    # a ccalign-dag run as Snakemake continues it after exec: the flock held, the record written
    holder = start(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom ccalign.dag import prepare\nheld = prepare(['--cores', '1'])\n"
            "print('ready', flush=True)\ntime.sleep(120)",
        ],
        tmp_path,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        stale_lock(tmp_path)  # the live run's own Snakemake lock
        p = ccalign_dag(tmp_path, "--version")
        assert_refused(
            tmp_path, p, "a run is live", f"pid {holder.pid} on ", "--cores 1", f"kill -INT {holder.pid}"
        )
    finally:
        stop(holder)
    assert f"(pid {holder.pid} on " in assert_starts(tmp_path)  # now dead: its lock is stale


@pytest.mark.parametrize(
    "kind, says",
    [
        ("snakemake here", "Snakemake is live on"),
        ("snakemake -d here", "Snakemake is live on"),
        ("job of a killed run", "jobs of a run that is no longer live are still running"),
    ],
)
def test_live_snakemake_or_leftover_job_is_refused(tmp_path, kind, says):
    here = tmp_path / "repo"
    stale_lock(here)
    sleeper = "import time; time.sleep(120)"
    if kind == "snakemake here":  # a plain `snakemake` (argv[0]) working in this directory
        proc = start(["bash", "-c", f"exec -a snakemake {sys.executable} -c '{sleeper}'"], here)
    elif kind == "snakemake -d here":  # started elsewhere, working here
        proc = start(["bash", "-c", f"exec -a snakemake {sys.executable} -c '{sleeper}' -d repo"], tmp_path)
    else:  # a job the killed run started: it carries the marker ccalign-dag exported
        proc = start([sys.executable, "-c", sleeper], tmp_path, **{dag.ENV_DIR: str(here)})
    try:
        assert_refused(here, ccalign_dag(here, "--version"), says, f"pid {proc.pid} (")
    finally:
        stop(proc)
    assert_starts(here)


def test_queued_slurm_jobs_of_this_directory_are_refused(tmp_path):
    here = tmp_path / "repo"
    stale_lock(here)
    queue = (
        f"101|{here}|rule_finetune_wildcards_x",
        "102|/elsewhere|rule_sample",
        f"103|{here}|not snakemake",
    )
    p = ccalign_dag(here, "--version", queue=queue)
    assert_refused(here, p, "still queued or running: 101\n", "scancel 101)")


def test_lock_of_a_run_started_on_another_host_is_kept(tmp_path):
    stale_lock(tmp_path)
    record = {"pid": 4711, "host": "login-elsewhere", "started": "2026-01-01T00:00:00", "argv": []}
    (tmp_path / ".snakemake" / dag.LOCK_FILE).write_text(json.dumps(record))
    p = ccalign_dag(tmp_path, "--version")
    assert_refused(
        tmp_path, p, "started on login-elsewhere (pid 4711 on login-elsewhere", "Run the same command there"
    )
