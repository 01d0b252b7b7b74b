"""The MLflow UI in headless Chromium: the smoke DAG's invocation run with its job runs as children; the
screenshot is kept as an artifact."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from harness import SMOKE, apt_install, experiment_id, search_runs

from ccalign.config import load_config

pytestmark = pytest.mark.slow

FLAGS = [
    "--headless",
    "--no-sandbox",  # running as root in a container
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=30000",  # let the single-page app fetch and render the runs table
]


def chromium(browser: str, profile: Path, url: str, *args: str) -> str:
    cmd = [browser, *FLAGS, f"--user-data-dir={profile}", *args, url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_the_ui_shows_the_invocation_with_its_job_runs(smoke_run, tmp_path, artifacts_dir):
    """Experiment page: the invocation's parent run (its job runs nested under it); the parent's page: its job
    runs as child runs; a job run's page: its parent and its metrics."""
    browser = apt_install("chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    uri = smoke_run.server.uri
    exp = experiment_id(uri, load_config(smoke_run.ws / SMOKE).get("experiment", "ccalign"))
    runs = search_runs(uri, exp)
    (parent,) = [r for r in runs if r["tags"].get("ccalign.role") == "invocation"]
    children = [r for r in runs if r is not parent]
    base = f"{uri}/#/experiments/{exp}/runs"

    # A window tall enough that the tables render every row (they only draw the visible ones).
    dom = chromium(browser, tmp_path / "profile-dom", base, "--window-size=1600,4000", "--dump-dom")
    assert parent["info"]["run_name"] in dom, dom[:2000]
    assert re.search(rf"<strong>{len(runs)}</strong>\s*matching runs", dom), "run count not shown"

    page = chromium(
        browser,
        tmp_path / "profile-parent",
        f"{base}/{parent['info']['run_id']}",
        "--window-size=1600,6000",
        "--dump-dom",
    )
    (artifacts_dir / "mlflow_ui_parent.html").write_text(page)  # to inspect when this fails
    assert "Child runs" in page
    # The page lists the first 10 child runs, then a "Load more" link.
    shown = [r["info"]["run_name"] for r in children if r["info"]["run_name"] in page]
    assert len(shown) == min(len(children), 10), f"{len(shown)} of {len(children)} child runs listed"
    assert (len(children) > 10) == ("Load more" in page)

    evaluate = next(r for r in children if r["tags"].get("stage") == "evaluate")
    page = chromium(
        browser,
        tmp_path / "profile-child",
        f"{base}/{evaluate['info']['run_id']}",
        "--window-size=1600,4000",
        "--dump-dom",
    )
    assert "Parent run" in page and parent["info"]["run_name"] in page and "fid" in page

    shot = artifacts_dir / "mlflow_ui_runs.png"
    shot.unlink(missing_ok=True)
    chromium(browser, tmp_path / "profile-png", base, "--window-size=1600,1000", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
