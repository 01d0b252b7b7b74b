"""Fixtures for the integration tests: a real Slurm cluster, MLflow servers, copies of the repo.

These tests start daemons, install Debian packages when missing and run the smoke DAG several times (minutes),
so a plain ``pytest`` leaves them out: they run when a path under tests/integration is named
(``make test-integration``) or when CCALIGN_INTEGRATION=1. A test skips only when its system package cannot
be installed or started here, and says why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, mlflow_server.py

from harness import ARTIFACTS, HERE, SMOKE, base_env, require_pipeline, run, snakemake  # noqa: E402
from mlflow_server import MlflowServer  # noqa: E402
from testkit import copy_repo


def _names_us(config: pytest.Config) -> bool:
    """True when the command line names this directory or something in it."""
    cwd = Path(config.invocation_params.dir)
    for arg in config.args:
        path = (cwd / arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _names_us(config) or os.environ.get("CCALIGN_INTEGRATION") == "1":
        return
    ours = [i for i in items if HERE in i.path.parents]
    if ours:
        config.hook.pytest_deselected(items=ours)
        items[:] = [i for i in items if HERE not in i.path.parents]


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, artifacts_dir) -> SimpleNamespace:
    """The smoke DAG run once with the local profile, tracking to a real MLflow server that stays up.

    The reference run for the others: ``.ws`` (workspace), ``.server`` (MlflowServer), ``.log`` (its output).
    """
    require_pipeline()
    root = tmp_path_factory.mktemp("smoke")
    ws = copy_repo(root / "repo")
    with MlflowServer(root / "mlflow-server") as server:
        log = artifacts_dir / "smoke_local.log"
        cmd = snakemake("--profile", "workflow/profiles/local", "--configfile", SMOKE)
        p = run(cmd, ws, base_env(MLFLOW_TRACKING_URI=server.uri), log)
        print(f"smoke DAG, local profile, MLflow server: {p.seconds:.0f} s")
        yield SimpleNamespace(ws=ws, server=server, log=log)


def _cluster(tmp_path_factory, nodes: int) -> Iterator[SimpleNamespace]:
    """Start slurm_cluster.sh with ``nodes`` nodes (skip when impossible here); stop it at teardown."""
    state = tmp_path_factory.mktemp(f"slurm{nodes}")
    names = {
        "CCALIGN_SLURM_STATE": str(state),
        "CCALIGN_SLURM_PARTITION": "debug",
        "CCALIGN_SLURM_NODES": str(nodes),
    }
    env = {**os.environ, **names}
    script = str(HERE / "slurm_cluster.sh")
    t0 = time.monotonic()
    p = subprocess.run([script, "start"], env=env, capture_output=True, text=True)
    if p.returncode == 3:
        pytest.skip(f"no Slurm cluster possible here: {p.stderr.strip()}")
    assert p.returncode == 0, f"slurm_cluster.sh start failed:\n{p.stdout}\n{p.stderr}"
    print(f"slurm cluster up in {time.monotonic() - t0:.0f} s: {p.stdout.strip()}")
    yield SimpleNamespace(partition="debug", state=state, client=[script, "exec"], names=names)
    subprocess.run([script, "stop"], env=env, check=True)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> str:
    """A running single-node Slurm cluster on localhost (slurm_cluster.sh); yields its partition."""
    for cluster in _cluster(tmp_path_factory, 1):
        yield cluster.partition


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory) -> SimpleNamespace:
    """Two Slurm nodes, each in its own network namespace (slurm_cluster.sh, CCALIGN_SLURM_NODES=2).

    ``.client`` prefixes a client command (sbatch, squeue, scontrol) to run it in the cluster's login
    namespace; its environment needs ``.names`` (they name the cluster's state directory ``.state``).
    """
    yield from _cluster(tmp_path_factory, 2)


@pytest.fixture
def mlflow_server_factory(tmp_path):
    """``start(root)`` → a running MlflowServer; every server is stopped at teardown."""
    servers = []

    def start(root: Path | None = None):
        srv = MlflowServer(root or tmp_path / "mlflow-server")
        servers.append(srv)
        return srv.start()

    yield start
    for srv in servers:
        srv.stop()
