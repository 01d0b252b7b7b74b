"""The report stage on synthetic metrics files: one page per target, the paper's cells with Δ, "not run" rows
for published cells the config does not run, the figure, upscaled grids; no torch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from testkit import run_stage

from ccalign import report
from ccalign.config import load_config
from ccalign.pipeline import Plan

ROOT = Path(__file__).resolve().parents[1]


def fake_outputs(plan: Plan, target: str, root: Path, skip: set[str] = frozenset()) -> list[str]:
    """metrics.json (and grid.png) for every sample set of ``target`` as evaluate / sample write them; the
    metrics grow with the set's position so every row differs."""
    metrics = []
    for job in (j for j in plan.needed([target]) if j.stage.name == "evaluate"):
        if job.labels.get("objective") in skip:
            continue
        k = len(metrics)
        labels = dict(job.labels) | {"guided": str(float(job.labels["guidance"]) not in (0.0, 1.0)).lower()}
        samples = Path(job.inputs["samples"])
        values = {"fid": 10.0 + k, "is": 100.0 + k, "sfid": 5.0, "precision": 0.7, "recall": 0.6}
        record = {"labels": labels, "metrics": values, "n": 50, "samples": str(samples)}
        Path(job.output).parent.mkdir(parents=True, exist_ok=True)
        Path(job.output).write_text(json.dumps(record))
        samples.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((66, 130, 3), 40 + k % 200, np.uint8)).save(samples.with_name("grid.png"))
        metrics.append(job.output)
    return metrics


@pytest.fixture
def paper_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "config" / "paper.yaml", ["tracking.defer=true"])
    return cfg, Plan(cfg, "config/paper.yaml", weights_manifest=str(ROOT / "config" / "weights.yaml"))


def report_args(plan: Plan, target: str) -> list[str]:
    job = plan.find("report", {"target": target})
    args = job.args[job.args.index("--target") :]
    return [a for a in args if a not in ("--labels", "--record")]


def test_table3_shows_every_published_cell_with_its_delta(paper_plan):
    cfg, plan = paper_plan
    fake_outputs(plan, "table3", Path())
    run_stage("report", cfg, *report_args(plan, "table3"))
    out = Path("data/report/table3")
    md = (out / "summary.md").read_text()
    rows = [
        line for line in md.splitlines() if line.startswith("| llamagen_L") or line.startswith("| var_d24")
    ]
    assert len(rows) == 8  # base, dpo, unlearning, cca × 2 models
    header = md.splitlines()[4]
    for name in ("FID", "IS", "sFID", "Precision", "Recall"):
        assert f"| paper {name} | Δ |" in header
    (cca,) = [r for r in rows if r.startswith("| llamagen_L | cca_lam300 |")]
    cells = [c.strip() for c in cca.split("|")[1:-1]]
    fid, paper_fid, delta = cells[4:7]
    assert paper_fid == "3.43" and float(delta) == pytest.approx(float(fid) - 3.43, abs=0.01)
    assert "not run" not in md
    html = (out / "summary.html").read_text()
    assert "<table>" in html and "3.43" in html and "fid_is.png" in html and "grids/" in html
    assert (out / "fid_is.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grids = sorted((out / "grids").rglob("*.png"))
    assert len(grids) == 8 and all(min(Image.open(g).size) >= 512 for g in grids)  # upscaled to be seen
    with open(out / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 8


def test_a_published_row_without_a_run_is_a_not_run_row(paper_plan):
    cfg, plan = paper_plan
    fake_outputs(plan, "table3", Path(), skip={"dpo"})
    metrics = [
        j.output for j in plan.needed(["table3"]) if j.stage.name == "evaluate" and Path(j.output).exists()
    ]
    args = report_args(plan, "table3")
    args = args[: args.index("--metrics") + 1] + metrics + args[args.index("--grids") :]
    run_stage("report", cfg, *args)
    md = Path("data/report/table3/summary.md").read_text()
    dpo = [line for line in md.splitlines() if "| dpo_lam1 |" in line]
    assert len(dpo) == 2 and all("not run" in line and "61.69" in line or "7.53" in line for line in dpo)


def test_every_figure_target_gets_a_plot_with_its_curves(paper_plan):
    cfg, plan = paper_plan
    for target in ("fig4", "fig5", "fig6"):
        fake_outputs(plan, target, Path())
        run_stage("report", cfg, *report_args(plan, target))
        assert Path(f"data/report/{target}/fid_is.png").stat().st_size > 10_000
    sets = [(m, v.name, g) for m, v, g in plan.target_sets("fig4")]
    rows = [
        report.row(json.loads(Path(j.output).read_text()))
        for j in plan.needed(["fig4"])
        if j.stage.name == "evaluate"
    ]
    lines = report.series(
        [(v, g) for m, v, g in sets if m == "llamagen_L"], report.aggregate(rows), "llamagen_L"
    )
    kinds = {label: what for label, what, _ in lines}
    assert kinds == {"base, guidance sweep": "guidance", "cca λ sweep at guidance 1": "lambda"}


def test_report_stage_imports_no_torch(tmp_path):
    probe = "import sys, ccalign.report, ccalign.stages.report; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT).returncode == 0
