"""``ccalign report``: summary.csv, summary.md, the FID–IS plot and sample grids, logged to MLflow.

Reads only its declared inputs: every evaluate output (``metrics.json``, whose labels say what was measured)
and the sample grids of the first training seed. As the DAG's last job it also sends the MLflow runs the other
stages buffered (``tracking.defer``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from ccalign.pipeline import Job, Plan, Stage
from ccalign.stages.sample import points

HELP = "collect every metrics.json into data/report/: summary.csv, summary.md, fid_is.png, grids/"


def jobs(plan: Plan) -> Iterator[Job]:
    sets = [wildcards for wildcards, _, _ in points(plan)]
    metrics = [plan.path("evaluate", **wc) for wc in sets]
    first_seed = min(plan.cfg["seeds"])
    grids = [plan.path("sample", "grid", **wc) for wc in sets if wc["seed"] == first_seed]
    inputs = {"metrics": metrics, "grids": grids}
    out = plan.path("report").rpartition("/")[0]
    yield plan.job("report", {}, {}, inputs, ["--out", out, "--metrics", *metrics, "--grids", *grids])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", nargs="+", required=True, metavar="JSON", help="evaluate outputs to collect")
    p.add_argument("--grids", nargs="*", default=[], metavar="PNG", help="sample grids (grid.png) to show")
    p.add_argument(
        "--out", default="data/report", help="report directory (summary.csv is its completion file)"
    )


def main(cfg: dict, args: argparse.Namespace) -> None:
    from PIL import Image

    from ccalign import report
    from ccalign.io import atomic_write, atomic_write_text
    from ccalign.log import get_logger
    from ccalign.tracking import stage_run

    out = Path(args.out)
    records = [(p, report.read_metrics(p)) for p in args.metrics]
    rows = sorted(
        (report.row(m) for _, m in records),
        key=lambda r: (r["family"], r["model"], r["seed"], r["objective"], r["lambda"] or 0, r["guidance"]),
    )
    aggs = report.aggregate(rows)
    paper = {m: (spec.get("paper") or {}).get("rows", []) for m, spec in cfg["models"].items()}
    grids = {str(Path(g).parent): g for g in args.grids}
    inputs = {f"metrics{i}": p for i, p in enumerate(args.metrics)}
    # the DAG's last job sends its own run live, and with it every run the other stages buffered
    with stage_run(cfg, SPEC.name, args.labels, inputs=inputs, defer=False) as run:
        report.plot_fid_is(aggs, out / "fid_is.png")
        for _, m in records:
            grid = grids.get(str(Path(m["samples"]).parent))
            if grid is None:
                continue
            labels = m["labels"]
            variant = labels["objective"] + (f"_lam{labels['lambda']}" if labels.get("lambda") else "")
            dest = out / "grids" / labels["family"] / labels["model"] / f"{variant}_g{labels['guidance']}.png"
            with atomic_write(dest) as f:
                Image.fromarray(report.upscale(report.read_png(grid))).save(f, format="PNG")
            run.log_artifact(dest, f"grids/{labels['model']}")
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
    get_logger("report").info("report: %d rows → %s", len(rows), out / "summary.csv")


SPEC = Stage(
    name="report",
    help=HELP,
    outputs={
        "summary": "report/summary.csv",
        "table": "report/summary.md",
        "plot": "report/fid_is.png",
        "grids": "report/grids",
    },
    jobs=jobs,
    add_arguments=add_arguments,
    main=main,
    params=("report", "models"),
    folder=True,
)
