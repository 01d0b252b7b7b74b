"""Sample-stage throughput: guidance-free vs CFG, our deterministic sharded path vs the official-style loop.

"stage" runs ``ccalign sample`` in-process (MLflow off) on randomly initialised checkpoints: per-sample
counter noise, the fast decode path (CUDA graphs on GPU), decoder batches of a fixed size, atomic shards with
checksums, the streamed merge into samples.npz and the grid. Its generation rate is what the stage logs as
images_per_s; "end to end" also counts loading, hashing, merging and the grid. "naive" is the official
samplers' loop: one generator per batch, the plain eager decode loop, one decoder call per batch, all images
kept in memory and saved with np.savez at the end. Both use the config's batch size, the same labels and the
same sampling options.

    python benchmarks/bench_sample.py                                      # CPU, the embedded tiny models
    python benchmarks/bench_sample.py --device cuda --config config/paper.yaml \
        --models llamagen_L var_d16                                       # GPT-L and VAR-d16, 50k samples

Writes the Markdown table to benchmarks/results/bench_sample.md (or --out).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from machine import machine

import ccalign.stages.sample as stage
from ccalign.config import load_config
from ccalign.families import get_family
from ccalign.io import atomic_save_torch, atomic_write_text
from ccalign.sample.generate import DECODE_BATCH, to_uint8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Recorder:
    """Takes the place of the stage's MLflow run and keeps its metrics."""

    def __init__(self):
        self.metrics = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, path, artifact_path=None):
        pass


def save_random_checkpoints(cfg: dict, name: str, root: Path) -> tuple[Path, Path]:
    """Random-init model and tokenizer of config model ``name``, saved in the official layouts."""
    model_cfg = cfg["models"][name]
    family = get_family(model_cfg["family"])
    torch.manual_seed(0)
    family.save_model(family.build_model(model_cfg["args"]), root / "model.pt")
    tokenizer = family.build_tokenizer(cfg["tokenizers"][model_cfg["tokenizer"]]["args"])
    state = {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()}
    atomic_save_torch({"model": state} if family.name == "llamagen" else state, root / "tok.pt")
    return root / "model.pt", root / "tok.pt"


def run_stage(
    cfg: dict,
    name: str,
    ckpt: Path,
    tok: Path,
    guidance: float,
    per_class: int,
    out: Path,
    device: torch.device,
) -> dict:
    rec = Recorder()

    @contextmanager
    def recording_run(*a, **k):
        yield rec

    # the stage resolves its device itself (ccalign.device.resolve_device); pin it to the benchmark's
    stage.stage_run, stage.resolve_device = recording_run, lambda name="auto": device
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    flags = {
        "--model": name,
        "--checkpoint": ckpt,
        "--tokenizer": tok,
        "--guidance": guidance,
        "--out": out,
        "--per-class": per_class,
    }
    args = parser.parse_args([str(x) for flag in flags.items() for x in flag])
    sync(device)
    t0 = time.perf_counter()
    stage.main(cfg, args)
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "n": rec.metrics["images"],
        "gen_img_s": rec.metrics["images_per_s"],
        "e2e_img_s": rec.metrics["images"] / seconds,
    }


@torch.no_grad()
def run_naive(
    cfg: dict,
    name: str,
    ckpt: Path,
    tok: Path,
    guidance: float,
    per_class: int,
    out: Path,
    device: torch.device,
    limit: int | None = None,
) -> dict:
    """The official samplers' loop: one generator for the batch, one decoder call, np.savez at the end.

    ``limit``: only the first ``limit`` samples (the warm-up batch)."""
    model_cfg = cfg["models"][name]
    family = get_family(model_cfg["family"])
    model = family.load_model(ckpt, model_cfg["args"]).to(device).eval()
    tokenizer = (
        family.load_tokenizer(tok, cfg["tokenizers"][model_cfg["tokenizer"]]["args"]).to(device).eval()
    )
    sampling, resize_to = stage.sampling_options(family, model_cfg)
    n, batch = family.num_classes(model) * per_class, cfg["sample"]["batch_size"]
    n = n if limit is None else min(n, limit)
    gen = torch.Generator().manual_seed(0)
    sync(device)
    t0 = time.perf_counter()
    images = []
    for start in range(0, n, batch):
        labels = torch.arange(start, min(start + batch, n), device=device) // per_class
        codes = family.generate(model, tokenizer, labels, guidance=guidance, sampling=sampling, generator=gen)
        images.append(to_uint8(family.name, family.decode(tokenizer, codes), resize_to))
    np.savez(out, arr_0=np.concatenate(images), labels=np.arange(n) // per_class)
    sync(device)
    return {"gen_img_s": n / (time.perf_counter() - t0)}


def bench_model(cfg: dict, name: str, args, device: torch.device) -> list[dict]:
    model_cfg = cfg["models"][name]
    scales = (model_cfg.get("guidance") or {}).get("base") or []
    if len(scales) < 2:
        raise SystemExit(f"model {name!r} needs guidance.base [guidance-free, ..., CFG] in the config")
    per_class = args.per_class or cfg["sample"]["per_class"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt, tok = save_random_checkpoints(cfg, name, root)
        # one-time costs (allocator, kernel selection): one batch, guidance-free and guided
        for guidance in (scales[0], scales[-1]):
            limit = cfg["sample"]["batch_size"]
            run_naive(cfg, name, ckpt, tok, guidance, 1, root / "warmup.npz", device, limit=limit)
        for label, guidance in (("guidance-free", scales[0]), (f"CFG {scales[-1]:g}", scales[-1])):
            ours = run_stage(
                cfg, name, ckpt, tok, guidance, per_class, root / f"g{guidance}" / "samples.npz", device
            )
            naive = run_naive(cfg, name, ckpt, tok, guidance, per_class, root / "naive.npz", device)
            rows.append({"model": name, "mode": label, **ours, "naive_img_s": naive["gen_img_s"]})
            rate, e2e, naive_rate = ours["gen_img_s"], ours["e2e_img_s"], naive["gen_img_s"]
            print(f"{name} {label}: stage {rate:.2f} images/s ({e2e:.2f} end to end), naive {naive_rate:.2f}")
    return rows


def table(rows: list[dict], cfg: dict, args) -> str:
    lines = [
        "| model | guidance | samples | stage images/s | stage s/image | stage end to end images/s "
        "| naive images/s | stage / naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['n']} | {r['gen_img_s']:.2f} | {1 / r['gen_img_s']:.4f} | "
            f"{r['e2e_img_s']:.2f} | {r['naive_img_s']:.2f} | {r['gen_img_s'] / r['naive_img_s']:.2f}x |"
        )
    lines += ["", "| model | guidance-free / CFG throughput (stage) |", "|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        free, guided = (r["gen_img_s"] for r in rows if r["model"] == model)
        lines.append(f"| {model} | {free / guided:.2f}x |")
    overrides = "".join(f", `--set {o}`" for o in args.overrides)
    setup = (
        f"Machine: {machine()}. Device `{args.device}`, config `{args.config}`{overrides}, batch "
        f"{cfg['sample']['batch_size']}, shards of {cfg['sample']['shard_size']}, one run per row after a "
        "warm-up batch; random-init weights."
    )
    notes = (
        "stage images/s: the generation phase as the stage logs it to MLflow (per-sample counter noise, the "
        f"fast decode path, decoder calls of a fixed {DECODE_BATCH} rows, atomic shards with sha256); end to "
        "end adds loading, hashing, the merge and the grid. naive: one generator, the eager decode loop and "
        "one decoder call per batch, np.savez at the end (the official samplers' loop; not deterministic "
        "across batch or world sizes)."
    )
    return "\n".join(["# bench_sample", "", setup, "", *lines, "", notes, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument(
        "--models", nargs="+", default=["llamagen_tiny", "var_tiny"], help="model names in the config"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, as the CLI's --set",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--per-class", type=int, default=None, help="samples per class (default: sample.per_class)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_sample.md"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    rows = [r for name in args.models for r in bench_model(cfg, name, args, device)]
    md = table(rows, cfg, args)
    print(md)
    atomic_write_text(md, args.out)


if __name__ == "__main__":
    main()
