"""A killed DAG resumes with the same command, and a second command never unlocks a live run.

The README's command is ``ccalign-dag`` (``make run``): Snakemake behind a check for a live run and a stale
lock (src/ccalign/dag.py). Here the smoke DAG (LlamaGen half) is started with it; mid-run a second
invocation is refused while the first goes on; then the first's Snakemake is SIGKILLed (its running jobs
finish as orphans, as after an OOM kill on a login node). A plain ``snakemake`` stops on the LockException
there; the same ``ccalign-dag`` command removes the stale lock, reruns only what is missing or incomplete,
and the report equals the uninterrupted run's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import (
    SMOKE,
    base_env,
    comparable,
    job_counts,
    keep_one_family,
    read_summary,
    run,
    tail,
)
from testkit import copy_repo

from ccalign import dag

pytestmark = pytest.mark.slow


def steps_done(log: Path) -> tuple[int, int]:
    """(done, total) of Snakemake's last "N of M steps" line; (0, 0) before the first."""
    found = re.findall(r"(\d+) of (\d+) steps", log.read_text())
    return tuple(map(int, found[-1])) if found else (0, 0)


def session_members(sid: int) -> list[int]:
    """Processes of session ``sid`` (the killed Snakemake started it: its jobs are in it)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def test_killed_dag_resumes_with_the_same_command(smoke_run, tmp_path, artifacts_dir):
    ws = copy_repo(tmp_path / "repo")
    family = keep_one_family(ws)
    env = base_env()
    cmd = [sys.executable, "-m", "ccalign.dag", "--profile", "workflow/profiles/local", "--configfile", SMOKE]
    locks = ws / ".snakemake" / "locks"
    killed_log = artifacts_dir / "resume_killed.log"
    t0 = time.monotonic()
    with open(killed_log, "w") as out:
        first = subprocess.Popen(
            cmd, cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 900
        while (done := steps_done(killed_log))[0] * 3 < done[1] or not done[1]:
            assert first.poll() is None, tail(killed_log)
            assert time.monotonic() < deadline, tail(killed_log)
            time.sleep(0.2)
        # a second invocation while the first is live: refused, the lock kept, the first undisturbed
        second = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == dag.REFUSED, second.stderr
        assert "refusing to start: a run is live" in second.stderr and f"pid {first.pid} on " in second.stderr
        assert locks.is_dir() and first.poll() is None
    finally:
        os.kill(first.pid, signal.SIGKILL)  # Snakemake's main process only: its jobs run on
        first.wait()
    killed_at = steps_done(killed_log)
    print(f"killed at {killed_at[0]} of {killed_at[1]} jobs after {time.monotonic() - t0:.0f} s")
    deadline = time.monotonic() + 600
    while orphans := session_members(first.pid):
        assert time.monotonic() < deadline, f"jobs of the killed run still running: {orphans}"
        time.sleep(0.2)
    assert locks.is_dir()  # the lock a plain rerun stops on

    rerun_log = artifacts_dir / "resume_rerun.log"
    p = run(cmd, ws, env, rerun_log)
    text = rerun_log.read_text()
    assert "removed Snakemake's lock left by a run that is no longer live" in text, tail(rerun_log)
    assert f"(pid {first.pid} on " in text
    rerun = sum(job_counts(rerun_log).values())
    assert 0 < rerun < killed_at[1] - killed_at[0], f"{rerun} jobs rerun, killed at {killed_at}"  # not `all`
    assert not locks.exists()
    local = [r for r in read_summary(smoke_run.ws) if r["family"] == family]
    assert comparable(read_summary(ws)) == comparable(local)
    print(f"rerun: {rerun} jobs in {p.seconds:.0f} s")
