"""One target's report: its results table beside the paper's numbers, its FID–IS figure and sample grids.

Reads only evaluate outputs (``metrics.json``: the labels say which model, variant and guidance scale each
measures). A table row is one sample set of the target, mean ± std over training seeds; every published
column (FID, IS, sFID, Precision, Recall) shows the paper's value and Δ = ours − paper where the config lists
one, and a published row the config does not run is shown as "not run".
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

METRICS = ["fid", "is", "sfid", "precision", "recall", "class_acc"]
PUBLISHED = ["fid", "is", "sfid", "precision", "recall"]  # what the paper's tables report
NAMES = {"fid": "FID", "is": "IS", "sfid": "sFID", "precision": "Precision", "recall": "Recall",
         "class_acc": "class acc"}  # fmt: skip
EVALUATE_KEYS = {"class_acc": "class_accuracy"}  # column → metrics.json key, where they differ
CSV_COLUMNS = ["family", "model", "seed", "variant", "objective", "lambda", "guidance", "guided", *METRICS,
               "n_samples"]  # fmt: skip
NOTES = [
    "FID and sFID against the reference batch's stored statistics (ADM protocol); IS over consecutive splits "
    "of 5,000 samples after a fixed shuffle (ADM splits the file in order).",
    "Precision / Recall: k-NN manifolds with k = 3 over exact float32 distances; ADM computes the distances "
    "in float16 (measured: about +0.002).",
]


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def read_metrics(path: str | Path) -> dict:
    """One evaluate output (metrics.json): its labels say which model, variant and guidance it measures."""
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable metrics file ({e})") from e
    missing = {"family", "model", "seed", "objective", "guidance", "guided"} - set(m.get("labels") or {})
    if missing:
        raise ValueError(f"{path}: metrics file without the labels {sorted(missing)} (an older ccalign's?)")
    return m


def variant_name(labels: dict) -> str:
    """The variant as in paths (``cca_lam300``, ``cca_lam1_beta0.1``) from a job's labels."""
    if labels["objective"] == "base":
        return "base"
    extra = "".join(
        f"_{short}{labels[k]}" for k, short in (("beta", "beta"), ("uncond_ratio", "u")) if k in labels
    )
    return f"{labels['objective']}_lam{labels['lambda']}{extra}"


def row(m: dict) -> dict:
    """One summary.csv row (one sample set of one training seed) from a metrics.json record."""
    labels = m["labels"]
    out = {
        "family": labels["family"],
        "model": labels["model"],
        "seed": int(labels["seed"]),
        "variant": variant_name(labels),
        "objective": labels["objective"],
        "lambda": _num(labels.get("lambda")),
        "guidance": float(labels["guidance"]),
        "guided": labels["guided"] == "true",
        "n_samples": m.get("n"),
    }
    values = m.get("metrics", {})
    return out | {k: _num(values.get(EVALUATE_KEYS.get(k, k))) for k in METRICS}


def write_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                k: "" if r[k] is None else str(r[k]).lower() if isinstance(r[k], bool) else r[k]
                for k in CSV_COLUMNS
            }
        )
    return buf.getvalue()


def aggregate(rows: list[dict]) -> dict[tuple[str, str, float], dict]:
    """(model, variant, guidance) → mean and sample std over seeds of every metric, and the seed count."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["variant"], r["guidance"])].append(r)
    out = {}
    for key, rs in groups.items():
        agg = {
            k: rs[0][k] for k in ("family", "model", "variant", "objective", "lambda", "guidance", "guided")
        }
        agg["seeds"] = len(rs)
        for k in METRICS:
            vals = [r[k] for r in rs if r[k] is not None]
            agg[k] = statistics.fmean(vals) if vals else None
            agg[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out[key] = agg
    return out


def table(sets: list[tuple[str, str, float]], aggs: dict, paper: list[dict]) -> list[dict]:
    """The target's rows in its own order: one per sample set, then a "not run" row for every published cell
    the config does not run. ``paper``: rows {model, variant, guidance, fid, ...} published for the target."""
    published = {(p["model"], p["variant"], p["guidance"]): p for p in paper}
    rows = []
    for key in sets:
        agg = aggs.get(key)
        rows.append(
            {"model": key[0], "variant": key[1], "guidance": key[2], "ours": agg, "paper": published.get(key)}
        )
    done = {k for k in sets if aggs.get(k)}
    rows += [
        {"model": k[0], "variant": k[1], "guidance": k[2], "ours": None, "paper": p}
        for k, p in published.items()
        if k not in done and k not in sets
    ]
    return rows


def _fmt(k: str, x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if k in ("precision", "recall", "class_acc") else f"{x:.2f}"


def cells(r: dict, with_paper: list[str]) -> list[str]:
    """Our value (± std) per metric; the paper's value and Δ for the published ones."""
    ours, paper, out = r["ours"], r["paper"] or {}, []
    for k in METRICS:
        if ours is None:
            out.append("not run" if k == "fid" else "")
        else:
            std = ours.get(k + "_std")
            out.append(_fmt(k, ours[k]) + (f" ± {_fmt(k, std)}" if std is not None else ""))
        if k in with_paper:
            p = paper.get(k)
            delta = ours[k] - p if ours and ours[k] is not None and p is not None else None
            out += [_fmt(k, p), "" if delta is None else f"{delta:+.3g}"]
    return out


def header(with_paper: list[str]) -> list[str]:
    cols = ["model", "variant", "guidance", "seeds"]
    for k in METRICS:
        cols.append(NAMES[k])
        if k in with_paper:
            cols += [f"paper {NAMES[k]}", "Δ"]
    return cols


def published_columns(rows: list[dict]) -> list[str]:
    return [k for k in PUBLISHED if any((r["paper"] or {}).get(k) is not None for r in rows)]


def markdown(title: str, description: str, rows: list[dict]) -> str:
    with_paper = published_columns(rows)
    cols = header(with_paper)
    lines = [f"# {title}", "", description, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        seeds = str(r["ours"]["seeds"]) if r["ours"] else "–"
        lead = [r["model"], r["variant"], f"{r['guidance']:g}", seeds]
        lines.append("| " + " | ".join(lead + cells(r, with_paper)) + " |")
    lines += ["", "![FID–IS](fid_is.png)", "", *[f"- {n}" for n in NOTES]]
    return "\n".join(lines) + "\n"


def html_page(title: str, description: str, rows: list[dict], grids: list[str]) -> str:
    """The same table as :func:`markdown`, the figure and the sample grids, as one HTML page."""
    with_paper = published_columns(rows)
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in header(with_paper))
    body = []
    for r in rows:
        lead = [r["model"], r["variant"], f"{r['guidance']:g}", str(r["ours"]["seeds"]) if r["ours"] else "–"]
        body.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in lead + cells(r, with_paper)) + "</tr>")
    figures = "".join(
        f'<figure><img src="{esc(g)}"><figcaption>{esc(g)}</figcaption></figure>' for g in grids
    )
    notes = "".join(f"<li>{esc(n)}</li>" for n in NOTES)
    style = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style>"
        f"</head><body><h1>{esc(title)}</h1><p>{esc(description)}</p><table><tr>{head}</tr>{''.join(body)}"
        f"</table><h2>FID–IS</h2><img src='fid_is.png'><ul>{notes}</ul><h2>Samples</h2>{figures}"
        "</body></html>\n"
    )


def series(model_sets: list[tuple[str, float]], aggs: dict, model: str) -> list[tuple[str, str, list[dict]]]:
    """The lines of one model's panel, as (label, what varies: "guidance" or "lambda", points): each variant
    over its guidance scales (a CFG curve); variants that differ only in λ, at one guidance scale, over λ (a
    λ sweep); a lone point stays a point."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for variant, g in model_sets:
        if (agg := aggs.get((model, variant, g))) and agg["fid"] is not None and agg["is"] is not None:
            by_variant[variant].append(agg)
    lines, sweeps = [], defaultdict(list)
    for variant, points in by_variant.items():
        if len(points) > 1:
            lines.append((f"{variant}, guidance sweep", "guidance", points))
        else:
            sweeps[(re.sub(r"_lam[^_]+", "", variant), points[0]["guidance"])].append(points[0])
    for (kind, g), points in sweeps.items():
        points.sort(key=lambda p: p["lambda"] or 0)
        what = "lambda" if len(points) > 1 else "guidance"
        lines.append((f"{kind}{' λ sweep' if len(points) > 1 else ''} at guidance {g:g}", what, points))
    return lines


def plot(sets: list[tuple[str, str, float]], aggs: dict, path: Path) -> None:
    """FID–IS per model: CFG curves, λ sweeps and single points, each point annotated with its s or λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(m for m, _, _ in sets))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for label, what, points in series([(v, g) for m, v, g in sets if m == model], aggs, model):
            ax.plot([p["fid"] for p in points], [p["is"] for p in points], marker="o", label=label)
            for p in points:
                tag = f"s={p['guidance']:g}" if what == "guidance" else f"λ={p['lambda']:g}"
                ax.annotate(tag, (p["fid"], p["is"]), fontsize=6)
        ax.set(title=model, xlabel="FID ↓", ylabel="IS ↑")
        ax.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    from ccalign.io import atomic_write

    with atomic_write(path) as f:
        f.write(buf.getvalue())


def read_png(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def upscale(image: np.ndarray, min_side: int = 512) -> np.ndarray:
    """Nearest-neighbour upscale by the smallest integer factor that makes the shorter side ≥ ``min_side``
    (8-pixel digits stay crisp squares; large grids are left as they are)."""
    factor = max(1, -(-min_side // min(image.shape[:2])))
    return image.repeat(factor, axis=0).repeat(factor, axis=1)
