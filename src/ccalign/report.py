"""Results table, FID–IS trade-off plot and sample grids from the evaluate stage's metrics files."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

COLUMNS = [
    "family",
    "model",
    "seed",
    "objective",
    "lambda",
    "guidance",
    "guided",
    "fid",
    "is",
    "precision",
    "recall",
    "sfid",
    "class_acc",
    "n_samples",
]
METRICS = ["fid", "is", "precision", "recall", "sfid", "class_acc"]
EVALUATE_KEYS = {"class_acc": "class_accuracy"}  # summary column → metrics.json key, where they differ


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
        raise ValueError(
            f"{path}: metrics file without the labels {sorted(missing)} (made by an older ccalign?)"
        )
    return m


def row(m: dict) -> dict:
    """One summary.csv row from a metrics.json record."""
    labels = m["labels"]
    out = {
        "family": labels["family"],
        "model": labels["model"],
        "seed": int(labels["seed"]),
        "objective": labels["objective"],
        "lambda": _num(labels.get("lambda")),
        "guidance": float(labels["guidance"]),
        "guided": labels["guided"] == "true",
        "n_samples": m.get("n"),
    }
    values = m.get("metrics", {})
    out.update({k: _num(values.get(EVALUATE_KEYS.get(k, k))) for k in METRICS})
    return out


def write_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                k: ("" if r[k] is None else str(r[k]).lower() if isinstance(r[k], bool) else r[k])
                for k in COLUMNS
            }
        )
    return buf.getvalue()


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and spread (sample std) over seeds of each (family, model, objective, λ, guidance)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["family"], r["model"], r["objective"], r["lambda"], r["guidance"])].append(r)
    out = []
    for (family, model, objective, lam, g), rs in groups.items():
        agg = {
            "family": family,
            "model": model,
            "objective": objective,
            "lambda": lam,
            "guidance": g,
            "guided": rs[0]["guided"],
            "seeds": len(rs),
        }
        for k in METRICS:
            vals = [r[k] for r in rs if r[k] is not None]
            agg[k] = statistics.fmean(vals) if vals else None
            agg[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(agg)
    order = {"base": 0, "cca": 1, "dpo": 2, "unlearning": 3}
    return sorted(
        out, key=lambda a: (a["family"], a["model"], order[a["objective"]], a["lambda"] or 0, a["guidance"])
    )


def _cell(a: dict, k: str) -> str:
    if a[k] is None:
        return "–"
    prec = 3 if k in ("precision", "recall", "class_acc") else 2
    s = f"{a[k]:.{prec}f}"
    return s + (f" ± {a[k + '_std']:.{prec}f}" if a.get(k + "_std") is not None else "")


def markdown(aggs: list[dict], paper: dict[str, list[dict]]) -> str:
    """Results table (mean ± std over seeds); published numbers beside ours where the config has them."""
    lines = [
        "| family | model | objective | λ | guidance | seeds | FID | IS | Precision | Recall | sFID "
        "| class acc | paper FID | paper IS |",
        "|" + "---|" * 14,
    ]
    for a in aggs:
        ref = next(
            (
                p
                for p in paper.get(a["model"], [])
                if p.get("objective") == a["objective"]
                and float(p.get("guidance", a["guidance"])) == a["guidance"]
            ),
            {},
        )
        lam = "–" if a["lambda"] is None else f"{a['lambda']:g}"
        lines.append(
            f"| {a['family']} | {a['model']} | {a['objective']} | {lam} | {a['guidance']:g} "
            f"| {a['seeds']} | "
            + " | ".join(_cell(a, k) for k in METRICS)
            + f" | {ref.get('fid', '–')} | {ref.get('is', '–')} |"
        )
    return "\n".join(lines) + "\n"


def plot_fid_is(aggs: list[dict], path: Path) -> None:
    """FID–IS trade-off per model: the base model's CFG curve against the fine-tuned models' points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({(a["family"], a["model"]) for a in aggs})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    markers = {"cca": "o", "dpo": "s", "unlearning": "^"}
    for ax, (family, model) in zip(axes[0], models, strict=True):
        mine = [a for a in aggs if a["model"] == model and a["fid"] is not None and a["is"] is not None]
        base = sorted((a for a in mine if a["objective"] == "base"), key=lambda a: a["guidance"])
        ax.plot([a["fid"] for a in base], [a["is"] for a in base], "k--", marker="x", label="base + CFG")
        for a in base:
            ax.annotate(f"s={a['guidance']:g}", (a["fid"], a["is"]), fontsize=7)
        for a in mine:
            if a["objective"] != "base" and not a["guided"]:
                ax.scatter(
                    a["fid"],
                    a["is"],
                    marker=markers[a["objective"]],
                    s=40,
                    label=f"{a['objective']} λ={a['lambda']:g}",
                )
        ax.set(title=f"{family}: {model}", xlabel="FID ↓", ylabel="IS ↑")
        ax.legend(fontsize=7)
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
