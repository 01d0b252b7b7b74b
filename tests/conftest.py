"""Fixtures shared by test modules (pytest runs with --import-mode=importlib: share here, not by import)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and tiny convolutions on 2 OpenMP threads crawl when the CPU
    is shared. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke config's LlamaGen chain run once through the CLI (umask 027): (working dir, results)."""
    from testkit import SMOKE_CHAIN, run_cli_jobs

    cwd = tmp_path_factory.mktemp("smoke_run")
    results = run_cli_jobs(SMOKE_CHAIN, cwd, umask=0o027)
    bad = {label: r for label, r in results.items() if r["rc"] != 0}
    assert not bad, bad
    return cwd, results
