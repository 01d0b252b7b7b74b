"""``ccalign report``: summary.csv, summary.md, the FID–IS plot and sample grids, logged to MLflow."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from ccalign import report
from ccalign.io import atomic_write, atomic_write_text
from ccalign.log import get_logger
from ccalign.tracking import stage_run

HELP = "collect every metrics.json into data/report/: summary.csv, summary.md, fid_is.png, grids/"
log = get_logger("report")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", nargs="+", required=True, metavar="JSON", help="evaluate outputs to collect")
    p.add_argument(
        "--out", default="data/report", help="report directory (summary.csv is its completion file)"
    )


def main(cfg: dict, args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows = sorted(
        (report.row(p) for p in args.metrics),
        key=lambda r: (r["family"], r["model"], r["seed"], r["objective"], r["lambda"] or 0, r["guidance"]),
    )
    aggs = report.aggregate(rows)
    paper = {m: (spec.get("paper") or {}).get("rows", []) for m, spec in cfg["models"].items()}
    inputs = {f"metrics{i}": p for i, p in enumerate(args.metrics)}
    # the DAG's last job sends its own run live, and with it every run the other stages buffered
    with stage_run(cfg, "report", inputs=inputs, defer=False) as run:
        report.plot_fid_is(aggs, out / "fid_is.png")
        first_seed = min(r["seed"] for r in rows)
        for path in args.metrics:
            wc = report.parse_metrics_path(path)
            npz = report.samples_path(path)
            if int(wc["seed"]) != first_seed or not npz.is_file():
                continue
            grid = report.sample_grid(npz, cfg["report"]["grid_samples"])
            dest = out / "grids" / wc["family"] / wc["model"] / f"{wc['variant']}_g{wc['guidance']}.png"
            with atomic_write(dest) as f:
                Image.fromarray(grid).save(f, format="PNG")
            run.log_artifact(dest, f"grids/{wc['model']}")
        atomic_write_text(report.markdown(aggs, paper), out / "summary.md")
        # summary.csv last: it is the stage's completion file for Snakemake and DVC.
        atomic_write_text(report.write_csv(rows), out / "summary.csv")
        for name in ("summary.md", "fid_is.png", "summary.csv"):
            run.log_artifact(out / name)
        for a in aggs:
            key = f"{a['model']}.{a['objective']}" + (
                f".lam{a['lambda']:g}" if a["lambda"] is not None else ""
            )
            run.log_metrics(
                {f"{key}.g{a['guidance']:g}.{k}": a[k] for k in report.METRICS if a[k] is not None}
            )
    log.info("report: %d rows → %s", len(rows), out / "summary.csv")
