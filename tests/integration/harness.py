"""Helpers for the integration tests (module ``harness``: conftest puts this directory on sys.path)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from testkit import one_family

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV_BIN = Path(sys.executable).parent
ARTIFACTS = HERE / "artifacts"  # screenshots and logs kept after the run (gitignored)
SMOKE = "config/smoke.yaml"


# -- environment and workspace -------------------------------------------------------------------------------
def base_env(**extra: str) -> dict[str, str]:
    """Environment for pipeline subprocesses: the venv first on PATH, no telemetry, no stray tracking URI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "CCALIGN_RUN_GROUP"))}
    env.update(
        PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def keep_one_family(ws: Path, family: str = "llamagen") -> str:
    """Rewrite the workspace's smoke config to ``family``'s models and tokenizers only (half the jobs)."""
    cfg = one_family(yaml.safe_load((ws / SMOKE).read_text()), family)
    (ws / SMOKE).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return family


def require_pipeline() -> None:
    missing = [p for p in ("Snakefile", SMOKE) if not (REPO / p).exists()]
    if missing:
        pytest.fail(f"the pipeline is not there yet: missing {', '.join(missing)}")


def run(
    cmd: list[str], cwd: Path, env: dict, log: Path, timeout: float = 1800
) -> subprocess.CompletedProcess:
    """Run ``cmd``; its output goes to ``log`` (and the tail into the assertion message on failure)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as fh:
        p = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    p.seconds = time.monotonic() - t0
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{tail(log)}"
    return p


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def snakemake(*args: str) -> list[str]:
    return [str(VENV_BIN / "snakemake"), *args]


def read_summary(ws: Path) -> list[dict[str, str]]:
    """Rows of every target's summary.csv (data/report/<target>/) under the smoke config's data root, each
    sample set once."""
    cfg = yaml.safe_load((ws / SMOKE).read_text())
    paths = sorted((ws / cfg.get("data_root", "data") / "report").glob("*/summary.csv"))
    assert paths, f"no report under {ws}"
    rows = {}
    for path in paths:
        with open(path, newline="") as fh:
            rows |= {(r["model"], r["seed"], r["variant"], r["guidance"]): r for r in csv.DictReader(fh)}
    return list(rows.values())


def slurm_test_profile(ws: Path, partition: str) -> Path:
    """workflow/profiles/slurm with slurm_overlay.yaml on top, written into the workspace."""
    profile = yaml.safe_load((ws / "workflow/profiles/slurm/config.yaml").read_text())
    overlay = yaml.safe_load((HERE / "slurm_overlay.yaml").read_text())
    for key, value in overlay.items():
        if isinstance(value, dict):
            profile[key] = {**profile.get(key, {}), **value}
        else:
            profile[key] = value
    profile["default-resources"]["slurm_partition"] = partition
    dest = ws / "profiles-test" / "slurm"
    dest.mkdir(parents=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


# Timing columns differ between runs; everything else is a function of the config and its seeds.
TIMING = {"images_per_s"}


def comparable(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """summary.csv rows without the timing columns, in a fixed order."""
    return sorted(
        ({k: v for k, v in r.items() if k not in TIMING} for r in rows), key=lambda r: sorted(r.items())
    )


def apt_install(package: str, *binaries: str) -> str:
    """The first of ``binaries`` on PATH, else install Debian's ``package``; skip when it cannot be."""

    def found() -> str | None:
        return next(filter(None, map(shutil.which, binaries)), None)

    if found():
        return found()
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{binaries[0]} missing and apt-get unavailable (needs root on Debian)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "--no-install-recommends", "-y", package]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0 or not found():
        pytest.skip(f"apt-get install {package} failed: {p.stderr.strip()[-500:]}")
    return found()


def job_counts(log: Path) -> dict[str, int]:
    """Snakemake's "Job stats" table of a run (rule → jobs), without the ``all`` target rule."""
    text = Path(log).read_text()
    table = text[text.index("Job stats:") :].splitlines()[3:]
    counts = {}
    for line in table:
        rule, n = line.split()
        if rule == "total":
            break
        counts[rule] = int(n)
    counts.pop("all", None)
    return counts


# -- MLflow REST API (127.0.0.1 only) ------------------------------------------------------------------------
def rest(uri: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    """GET ``endpoint`` with ``query``, or POST ``body`` as JSON; the decoded JSON answer."""
    assert uri.startswith("http://127.0.0.1:"), uri
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def experiment_id(uri: str, name: str) -> str:
    return rest(uri, "experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]


def search_runs(uri: str, exp_id: str) -> list[dict]:
    """Every run of the experiment (all pages), each with ``tags``/``params``/``metrics`` as plain dicts."""
    runs, token = [], None
    while True:
        body = {"experiment_ids": [exp_id], "max_results": 1000, **({"page_token": token} if token else {})}
        page = rest(uri, "runs/search", body)
        for r in page.get("runs", []):
            data = r.get("data", {})
            runs.append(
                {
                    "info": r["info"],
                    "tags": {t["key"]: t["value"] for t in data.get("tags", [])},
                    "params": {p["key"]: p["value"] for p in data.get("params", [])},
                    "metrics": {m["key"]: m["value"] for m in data.get("metrics", [])},
                }
            )
        token = page.get("next_page_token")
        if not token:
            return runs


def list_artifacts(uri: str, run_id: str, path: str = "") -> list[str]:
    """Paths of every artifact file of a run, recursively."""
    files = []
    for f in rest(uri, "artifacts/list", run_id=run_id, **({"path": path} if path else {})).get("files", []):
        files.extend(list_artifacts(uri, run_id, f["path"]) if f["is_dir"] else [f["path"]])
    return files


def get_artifact(uri: str, run_id: str, path: str) -> bytes:
    query = urllib.parse.urlencode({"run_id": run_id, "path": path})
    with urllib.request.urlopen(f"{uri}/get-artifact?{query}", timeout=30) as r:
        return r.read()
