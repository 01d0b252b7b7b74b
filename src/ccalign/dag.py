"""``ccalign-dag [snakemake arguments]``: the DAG, so that a crashed or preempted run resumes by rerunning it.

Every argument goes to ``snakemake``. Before starting it, on the working directory (``-d``/``--directory``
or the current one):

- it refuses (exit 75) while anything of another run is alive: a ``ccalign-dag`` run (it holds an flock on
  ``.snakemake/ccalign-dag.lock`` for as long as its Snakemake lives), a plain ``snakemake`` process of
  this host working here, jobs of a killed run still running on this host, or Snakemake's Slurm jobs
  submitted from here still queued or running (``squeue``);
- otherwise it removes the lock a killed run left in ``.snakemake/locks/`` (what ``snakemake --unlock``
  does) and says whose it was. Snakemake then reruns the jobs the killed run left incomplete (the profiles
  set ``rerun-incomplete``) and those stages resume from their checkpoints.

"Alive" means what this host can see: Snakemake's main process runs where it was started (on a cluster, a
login node; its jobs run elsewhere and are found through ``squeue``). A run started on another host cannot
be checked from here, so while the lock file names another host and Snakemake's lock exists, ccalign-dag
refuses and says where to look.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LOCK_FILE = "ccalign-dag.lock"  # in .snakemake/: flock held by the running Snakemake, JSON record inside
ENV_DIR = "CCALIGN_DAG_DIR"  # exported to Snakemake and so to every job it starts: marks them as ours
REFUSED = 75  # EX_TEMPFAIL: try again once the other run has ended


class Refused(Exception):
    """Another run is alive on this working directory (the message says which and what to do)."""


@dataclass
class Proc:
    pid: int
    argv: list[str]

    def __str__(self) -> str:
        cmd = " ".join(self.argv)
        return f"pid {self.pid} ({cmd[:117] + '...' if len(cmd) > 120 else cmd})"


def workdir(args: list[str], cwd: str | Path = ".") -> Path:
    """Snakemake's working directory for ``args`` started in ``cwd``: ``-d``/``--directory``, else ``cwd``."""
    for i, a in enumerate(args):
        if a in ("-d", "--directory") and i + 1 < len(args):
            return (Path(cwd) / args[i + 1]).resolve()
        if a.startswith("--directory="):
            return (Path(cwd) / a.split("=", 1)[1]).resolve()
    return Path(cwd).resolve()


def _is_snakemake(argv: list[str]) -> bool:
    """``snakemake ...``, ``python .../snakemake ...`` or ``python -m snakemake ...``."""
    return any(os.path.basename(a) == "snakemake" for a in argv[:2]) or argv[1:3] == ["-m", "snakemake"]


def read_proc(pid: int) -> tuple[list[str], str | None, dict[str, str]]:
    """(argv, working directory, environment) of ``pid``; parts that cannot be read are empty."""
    base = Path("/proc", str(pid))
    argv = (base / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    try:
        cwd = os.readlink(base / "cwd")
    except OSError:
        cwd = None
    try:
        raw = (base / "environ").read_bytes().decode(errors="replace").split("\0")
        env = dict(x.split("=", 1) for x in raw if "=" in x)
    except OSError:  # another user's process
        env = {}
    return argv, cwd, env


def live_processes(root: Path) -> tuple[list[Proc], list[Proc]]:
    """(Snakemake main processes, jobs of a ccalign-dag run) of this host working on ``root``."""
    mains, jobs = [], []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv, cwd, env = read_proc(int(entry.name))
        except OSError:  # exited meanwhile
            continue
        if not argv:  # kernel thread or zombie
            continue
        ours = env.get(ENV_DIR) == str(root)
        if _is_snakemake(argv) and "slurm-jobstep" not in argv:
            if ours or (cwd is not None and workdir(argv, cwd) == root):
                mains.append(Proc(int(entry.name), argv))
        elif ours:
            jobs.append(Proc(int(entry.name), argv))
    return mains, jobs


def slurm_jobs(root: Path) -> list[str]:
    """Ids of this user's unfinished Slurm jobs that Snakemake submitted from ``root`` (none if no Slurm)."""
    if shutil.which("squeue") is None:
        return []
    try:
        out = subprocess.run(
            ["squeue", "--me", "--noheader", "--format=%i|%Z|%k"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        out = subprocess.CompletedProcess([], 1, "", str(e))
    if out.returncode != 0:  # e.g. Slurm's client without a cluster: one line, then go on
        why = (out.stderr.strip().splitlines() or ["no message"])[-1]
        print(f"ccalign-dag: Slurm's queue not checked ({why})", file=sys.stderr)
        return []
    ids = []
    for line in out.stdout.splitlines():
        job, _, rest = line.partition("|")
        where, _, comment = rest.partition("|")
        if where == str(root) and comment.startswith("rule_"):  # the Slurm executor's --comment
            ids.append(job.strip())
    return ids


def _record(fh) -> dict:
    fh.seek(0)
    try:
        return json.loads(fh.read() or "{}")
    except json.JSONDecodeError:
        return {}


def _describe(rec: dict) -> str:
    return f"pid {rec.get('pid', '?')} on {rec.get('host', '?')}, started {rec.get('started', '?')}"


def prepare(args: list[str]) -> tuple[IO[str], Path]:
    """Check that no other run is alive and remove a stale Snakemake lock: (held lock file, working dir).

    Raises :class:`Refused` when another run is alive.
    """
    root = workdir(args)
    state = root / ".snakemake"
    state.mkdir(parents=True, exist_ok=True)
    fh = open(state / LOCK_FILE, "a+")  # noqa: SIM115 -- held (and inherited by Snakemake) until it exits
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        rec = _record(fh)
        fh.close()
        raise Refused(
            f"a run is live on {root}: {_describe(rec)}: {' '.join(rec.get('argv', []))}\n"
            f"Wait for it to finish, or stop it (kill -INT {rec.get('pid', 'PID')}: Snakemake cancels its "
            "jobs), then run the same command again. Never --unlock a live run."
        ) from None
    except OSError as e:  # a file system without flock: the checks below still run
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"ccalign-dag: {state} does not support flock; checking processes only", file=sys.stderr)
    try:
        _check_and_unlock(root, previous=_record(fh))
    except Refused:
        fh.close()
        raise
    fh.seek(0)
    fh.truncate()
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    fh.write(json.dumps({**rec, "argv": args}))
    fh.flush()
    return fh, root


def _check_and_unlock(root: Path, previous: dict) -> None:
    """Refuse while a process, job or Slurm job of another run is alive; else remove Snakemake's lock."""
    host = socket.gethostname()
    mains, jobs = live_processes(root)
    if mains:
        raise Refused(
            f"Snakemake is live on {root}: {', '.join(map(str, mains))}\n"
            f"Wait for it to finish, or stop it (kill -INT {mains[0].pid}), then run the same command again."
        )
    if jobs:
        pids = " ".join(str(p.pid) for p in jobs)
        raise Refused(
            f"jobs of a run that is no longer live are still running on {root}: "
            f"{'; '.join(map(str, jobs))}\n"
            f"Snakemake reruns unfinished jobs anyway, and they resume from their checkpoints: stop them "
            f"(kill {pids}), then run the same command again."
        )
    queued = slurm_jobs(root)
    if queued:
        raise Refused(
            f"Slurm jobs that Snakemake submitted from {root} are still queued or running: "
            f"{', '.join(queued)}\n"
            "Either a run on another host is live (leave it), or they belong to a killed run: cancel them "
            f"(scancel {' '.join(queued)}); the stages resume from their checkpoints when rerun."
        )
    locks = root / ".snakemake" / "locks"
    if locks.exists():
        if previous.get("host", host) != host:
            raise Refused(
                f"the last run on {root} was started on {previous['host']} ({_describe(previous)}), which "
                "this host cannot check. Run the same command there; if that run is gone for good, remove "
                f"{locks} and run it again here."
            )
        shutil.rmtree(locks)
        whose = f" ({_describe(previous)})" if previous else ""
        print(
            f"ccalign-dag: removed Snakemake's lock left by a run that is no longer live{whose}; "
            "unfinished jobs rerun and resume from their checkpoints",
            file=sys.stderr,
        )


def snakemake_executable() -> str:
    """The ``snakemake`` beside this Python (the same environment), else the one on PATH."""
    beside = Path(sys.executable).parent / "snakemake"
    found = str(beside) if beside.is_file() else shutil.which("snakemake")
    if found is None:
        sys.exit("ccalign-dag: snakemake not found (install the package with `make run` or pip install -e .)")
    return found


def configfiles(args: list[str]) -> list[str]:
    """The files given to ``--configfile`` / ``--configfiles`` (every word up to the next option)."""
    files, taking = [], False
    for a in args:
        if a.startswith("-"):
            taking = a in ("--configfile", "--configfiles")
        elif taking:
            files.append(a)
    return files


def main(argv: list[str] | None = None) -> int:
    from ccalign.config import ConfigError, read_yaml

    args = sys.argv[1:] if argv is None else argv
    exe = snakemake_executable()
    try:  # Snakemake reads these itself before the Snakefile, and names neither file nor line on an error
        for f in configfiles(args):
            read_yaml(f)
    except ConfigError as e:
        print(f"ccalign: {e}", file=sys.stderr)
        return 2
    try:
        fh, root = prepare(args)
    except Refused as e:
        print(f"ccalign-dag: refusing to start: {e}", file=sys.stderr)
        return REFUSED
    os.set_inheritable(fh.fileno(), True)  # Snakemake (same pid after exec) holds the flock until it exits
    os.environ[ENV_DIR] = str(root)
    os.execv(exe, [exe, *args])


if __name__ == "__main__":
    sys.exit(main())
