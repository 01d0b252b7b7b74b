"""``ccalign report``: one target's page (a table or figure of the paper): summary.csv, summary.md and
summary.html with the paper's numbers beside ours, the FID–IS figure and the sample grids, logged to MLflow.

Reads only its declared inputs: the evaluate outputs of the target's sample sets (``metrics.json``, whose
labels say what was measured) and the sample grids of the first training seed. It also sends the MLflow runs
the other stages buffered (``tracking.defer``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from ccalign.pipeline import Job, Plan, Stage

HELP = "one target's report (a table or figure of the paper): tables beside the paper, FID–IS plot, grids"


def jobs(plan: Plan) -> Iterator[Job]:
    first_seed = min(plan.cfg["seeds"])
    for target in plan.targets:
        metrics, grids = [], []
        for model, variant, g in plan.target_sets(target):
            for seed in plan.cfg["seeds"]:
                wildcards, _ = plan.sample_set(model, seed, variant, g)
                metrics.append(plan.path("evaluate", **wildcards))
                if seed == first_seed:
                    grids.append(plan.path("sample", "grid", **wildcards))
        out = plan.path("report", target=target).rpartition("/")[0]
        flags = ["--target", target, "--out", out, "--metrics", *metrics, "--grids", *grids]
        inputs = {"metrics": metrics, "grids": grids}
        yield plan.job("report", {"target": target}, {"target": target}, inputs, flags)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="name of the config's target this page is")
    p.add_argument("--metrics", nargs="+", required=True, metavar="JSON", help="evaluate outputs to collect")
    p.add_argument("--grids", nargs="*", default=[], metavar="PNG", help="sample grids (grid.png) to show")
    p.add_argument("--out", required=True, help="report directory (summary.csv is its completion file)")


def paper_rows(cfg: dict, target: str) -> list[dict]:
    """The published rows of ``target``, keyed like the sample sets: (model, variant name, guidance)."""
    from ccalign.pipeline import expand_variant, guidance_scale

    rows = []
    for model, m in cfg["models"].items():
        for p in m.get("paper") or []:
            if p["table"] == target:
                (variant,) = expand_variant(p["variant"], m.get("variants") or {})
                guidance = guidance_scale(cfg, model, p["guidance"])
                rows.append({**p, "model": model, "variant": variant.name, "guidance": guidance})
    return rows


def main(cfg: dict, args: argparse.Namespace) -> None:
    from PIL import Image

    from ccalign import report
    from ccalign.config import entry
    from ccalign.io import atomic_write, atomic_write_text
    from ccalign.log import get_logger
    from ccalign.pipeline import target_sets
    from ccalign.tracking import stage_run

    t = entry(cfg, "targets", args.target)
    out = Path(args.out)
    records = [report.read_metrics(p) for p in args.metrics]
    rows = sorted(
        (report.row(m) for m in records),
        key=lambda r: (r["family"], r["model"], r["seed"], r["variant"], r["guidance"]),
    )
    aggs = report.aggregate(rows)
    sets = [(m, v.name, g) for m, v, g in target_sets(cfg, args.target)]
    table = report.table(sets, aggs, paper_rows(cfg, args.target))
    title = args.target  # the description follows as the first paragraph
    grids = {str(Path(g).parent): g for g in args.grids}
    # the DAG's last jobs send their own run live, and with it every run the other stages buffered
    with stage_run(cfg, SPEC.name, args.labels, defer=False) as run:
        report.plot(sets, aggs, out / "fid_is.png")
        shown = []
        for m in records:
            if (grid := grids.get(str(Path(m["samples"]).parent))) is None:
                continue
            labels = m["labels"]
            name = f"grids/{labels['model']}/{report.variant_name(labels)}_g{labels['guidance']}.png"
            with atomic_write(out / name) as f:
                Image.fromarray(report.upscale(report.read_png(grid))).save(f, format="PNG")
            run.log_artifact(out / name, str(Path(name).parent))
            shown.append(name)
        atomic_write_text(report.markdown(title, t["description"], table), out / "summary.md")
        atomic_write_text(
            report.html_page(title, t["description"], table, sorted(shown)), out / "summary.html"
        )
        # summary.csv last: it is the stage's completion file for Snakemake and DVC.
        atomic_write_text(report.write_csv(rows), out / "summary.csv")
        for name in ("summary.md", "summary.html", "fid_is.png", "summary.csv"):
            run.log_artifact(out / name)
        run.log_table({k: [r[k] for r in rows] for k in report.CSV_COLUMNS}, f"{args.target}.json")
        for a in aggs.values():
            key = f"{a['model']}.{a['variant']}.g{a['guidance']:g}"
            run.log_metrics({f"{key}.{k}": a[k] for k in report.METRICS if a[k] is not None})
    get_logger("report").info("report %s: %d sets → %s", args.target, len(aggs), out / "summary.html")


SPEC = Stage(
    name="report",
    help=HELP,
    outputs={
        "summary": "report/{target}/summary.csv",
        "table": "report/{target}/summary.md",
        "page": "report/{target}/summary.html",
        "plot": "report/{target}/fid_is.png",
        "grids": "report/{target}/grids",
    },
    jobs=jobs,
    add_arguments=add_arguments,
    main=main,
    params=("targets", "models"),
)
