"""DVC with a local remote: commit the smoke outputs, push, wipe cache and outputs, pull, status clean."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from harness import SMOKE, VENV_BIN, base_env, run

pytestmark = pytest.mark.slow


def dvc(ws: Path, env: dict, log: Path, *args: str) -> str:
    run([str(VENV_BIN / "dvc"), *args], ws, env, log)
    return log.read_text()


def digests(ws: Path, outs: list[str]) -> dict[str, str]:
    """sha256 of every file under the pipeline's outputs, by path."""
    files = [p for o in outs for p in ([ws / o] if (ws / o).is_file() else sorted((ws / o).rglob("*")))]
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def test_push_wipe_pull_restores_every_output(smoke_run, tmp_path, artifacts_dir):
    """The smoke run's outputs, committed to DVC (no second run), survive a round trip through the remote."""
    ws = tmp_path / "repo"
    shutil.copytree(smoke_run.ws, ws, symlinks=True, ignore=shutil.ignore_patterns(".snakemake"))
    env = base_env()
    logs = artifacts_dir / "dvc"
    # dvc.yaml for the smoke config, generated from the same plan as the Snakefile.
    gen = [str(VENV_BIN / "ccalign"), "plan", "--dvc", "--config", SMOKE]
    dvc_yaml = subprocess.run(gen, cwd=ws, env=env, capture_output=True, text=True, check=True).stdout
    (ws / "dvc.yaml").write_text(dvc_yaml)
    git = ["git", "-c", "user.name=ccalign-test", "-c", "user.email=test@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "smoke"]):
        run([*git, *args], ws, env, logs / "git.log")
    remote = tmp_path / "remote"
    dvc(ws, env, logs / "remote.log", "remote", "add", "--local", "--default", "ittest", str(remote))

    # Record what Snakemake produced as the pipeline's state (dvc.lock), as `dvc repro` would have.
    dvc(ws, env, logs / "commit.log", "commit", "--force")
    assert "up to date" in dvc(ws, env, logs / "status_committed.log", "status")
    stages = yaml.safe_load(dvc_yaml)["stages"].values()
    outs = [next(iter(o)) if isinstance(o, dict) else o for st in stages for o in st.get("outs", [])]
    before = digests(ws, outs)
    assert before, "the pipeline produced no files"

    dvc(ws, env, logs / "push.log", "push")
    assert "in sync" in dvc(ws, env, logs / "status_cloud.log", "status", "--cloud")

    # A fresh clone has what git tracks and nothing else: wipe the cache and every git-ignored output.
    shutil.rmtree(ws / ".dvc" / "cache")
    ignored = [o for o in outs if subprocess.run(["git", "check-ignore", "-q", o], cwd=ws).returncode == 0]
    for o in ignored:
        (shutil.rmtree if (ws / o).is_dir() else Path.unlink)(ws / o)
    assert "deleted" in dvc(ws, env, logs / "status_wiped.log", "status")

    dvc(ws, env, logs / "pull.log", "pull")
    after = digests(ws, outs)
    lost = sorted(set(before) - set(after))
    assert not lost, f"{len(lost)} outputs in neither git nor the DVC remote (cache: false?), e.g. {lost[:3]}"
    assert after == before
    assert "up to date" in dvc(ws, env, logs / "status.log", "status")
