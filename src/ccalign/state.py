"""One state across Snakemake, DVC and MLflow: what a Snakemake invocation made, the other two record.

When an invocation ends, the Snakefile calls :func:`after_invocation` (its ``onsuccess`` / ``onerror``
handlers, in the one Snakemake process that schedules the jobs):

- **DVC**: every stage of ``dvc.yaml`` whose outputs now exist is committed in one ``dvc commit`` (dvc.lock
  updated, outputs copied into the DVC cache), so ``dvc status`` is clean, ``dvc repro`` has nothing to do
  and ``dvc push`` ships the data. One process at the end, after every job, never races another DVC command
  of this invocation (DVC takes its repository lock; jobs running in parallel would contend for it). Skipped,
  with one line saying why, when the repository has no DVC or its ``dvc.yaml`` was generated for another
  config (``ccalign plan --dvc`` makes the one for a config). Entries of dvc.lock for stages that dvc.yaml no
  longer has (another config ran here before) are dropped: the lock describes this pipeline only.
- **MLflow**: the runs the jobs buffered are sent and the invocation's parent run is closed.

The reverse needs nothing: after ``dvc repro`` every output is newer than its inputs, so Snakemake has
nothing to do (it reruns a job only for changed files, params or code it has records of).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from ccalign.io import atomic_write_text
from ccalign.log import get_logger
from ccalign.pipeline import Plan, dvc_yaml

log = get_logger("state")


def dvc_stages_to_commit(plan: Plan, root: Path = Path()) -> list[str] | str:
    """The dvc.yaml stages whose outputs all exist, or why DVC cannot record this invocation."""
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return "no DVC repository here"
    if yaml.safe_load((root / "dvc.yaml").read_text()) != dvc_yaml(plan):
        files = " + ".join(plan.configfiles)
        return (
            f"dvc.yaml describes another config than {files} (make it with: ccalign plan --dvc --config ...)"
        )
    return [j.name for j in plan.jobs() if all((root / p).exists() for p in j.outputs.values())]


def commit_to_dvc(plan: Plan, root: Path = Path()) -> bool:
    """Record the finished stages in dvc.lock and the DVC cache; True if it did."""
    stages = dvc_stages_to_commit(plan, root)
    if isinstance(stages, str):
        log.info("DVC not updated: %s", stages)
        return False
    if not stages:
        return False
    dvc = shutil.which("dvc") or "dvc"
    # DVC may put a copy from its cache in place of an output; its modification time must stay what Snakemake
    # saw, or every job downstream would look out of date
    files = [
        p for j in plan.jobs() if j.name in stages for out in j.outputs.values() for p in _files(root / out)
    ]
    times = {p: p.stat().st_mtime_ns for p in files}
    # DVC resolves each named target on its own (~1.4 s each on a 2-core VM: 3.5 min for the embedded
    # default's 103 stages), every stage at once in one pass (14 s): name them only when some are missing
    targets = [] if len(stages) == len(plan.jobs()) else stages
    done = subprocess.run(
        [dvc, "commit", "--force", "--quiet", *targets], cwd=root, capture_output=True, text=True
    )
    for p, mtime in times.items():
        if p.exists():
            os.utime(p, ns=(mtime, mtime))
    if done.returncode != 0:
        log.warning(
            "dvc commit failed (%s); run `dvc commit --force` to record the outputs", done.stderr.strip()
        )
        return False
    _drop_stale_lock_entries(root, {j.name for j in plan.jobs()})
    log.info("DVC: %d stages recorded in dvc.lock and the cache", len(stages))
    return True


def _drop_stale_lock_entries(root: Path, stages: set[str]) -> None:
    """Remove dvc.lock entries of stages that are not in dvc.yaml (DVC itself keeps them forever)."""
    path = root / "dvc.lock"
    if not path.is_file():
        return
    lock = yaml.safe_load(path.read_text()) or {}
    stale = set(lock.get("stages", {})) - stages
    if stale:
        lock["stages"] = {k: v for k, v in lock["stages"].items() if k not in stale}
        atomic_write_text(yaml.safe_dump(lock, sort_keys=False), path)
        log.info("DVC: %d entries of stages no longer in dvc.yaml dropped from dvc.lock", len(stale))


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def after_invocation(plan: Plan, group: str, succeeded: bool) -> None:
    """What the Snakefile runs when an invocation ends."""
    from ccalign.tracking import finish_invocation

    if succeeded:
        commit_to_dvc(plan)
    finish_invocation(plan.cfg, group, "FINISHED" if succeeded else "FAILED")
