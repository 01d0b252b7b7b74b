"""``ccalign sample``: class-balanced samples of one model at one guidance scale, as one ADM-format npz.

Sample i has class ``i // per_class`` and depends only on (seed, i). The samples are cut into fixed-size
shards written atomically to ``<out stem>.shards/`` beside the output; under torchrun rank r fills shards
r, r + world_size, ... and skips those already on disk and verified, so a killed job resumes where it
stopped and any world size or batch size gives the same pixels. Rank 0 then checks every shard, streams
them into ``--out`` (``arr_0`` N×H×W×3 uint8 and ``labels``), writes ``grid.png`` beside it and removes the
shards. torch.distributed (gloo) is used only to wait for all ranks at the end.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from ccalign.pipeline import Job, Plan, Stage

HELP = "generate per_class samples of every class (resumable shards, any world size) into one samples.npz"
GRID = 8  # the sample grid is GRID classes × GRID samples
GENERIC = ("per_class", "batch_size", "shard_size", "seed", "precision", "resize_to")  # not family options


def jobs(plan: Plan) -> Iterator[Job]:
    for wildcards, labels, ckpt in plan.sample_sets():
        model = wildcards["model"]
        tokenizer = plan.tokenizer_ckpt(plan.cfg["models"][model]["tokenizer"])
        out = plan.path("sample", **wildcards)
        flags = ["--model", model, "--checkpoint", ckpt, "--tokenizer", tokenizer]
        flags += ["--guidance", wildcards["guidance"], "--out", out]
        inputs = {"checkpoint": ckpt, "tokenizer": tokenizer}
        yield plan.job("sample", wildcards, labels, inputs, flags, model=model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model name in the config's models")
    parser.add_argument("--checkpoint", required=True, type=Path, help="model weights to sample from")
    parser.add_argument(
        "--tokenizer", required=True, type=Path, help="tokenizer weights (decode codes to pixels)"
    )
    parser.add_argument(
        "--guidance",
        required=True,
        type=float,
        help="guidance scale in the family's convention (LlamaGen: 1 = guidance-free; VAR: 0)",
    )
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: sample.seed)")
    parser.add_argument("--out", required=True, type=Path, help="samples.npz to write")
    parser.add_argument(
        "--per-class", type=int, default=None, help="samples per class (default: sample.per_class)"
    )


def load(cfg: dict, args: argparse.Namespace, device) -> tuple:
    """Check the inputs, load model and tokenizer; returns (family, model, tokenizer, spec)."""
    from ccalign.config import entry
    from ccalign.families import get_family
    from ccalign.io import sha256_file
    from ccalign.sample.generate import SampleSpec

    model_cfg = entry(cfg, "models", args.model)
    for what, path in (("checkpoint", args.checkpoint), ("tokenizer checkpoint", args.tokenizer)):
        if not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
    family = get_family(model_cfg["family"])
    settings = model_cfg["sample"]
    model = family.load_model(args.checkpoint, model_cfg["args"]).to(device).eval()
    tokenizer_args = cfg["tokenizers"][model_cfg["tokenizer"]]["args"]
    tokenizer = family.load_tokenizer(args.tokenizer, tokenizer_args).to(device).eval()
    spec = SampleSpec(
        family=family.name,
        num_classes=family.num_classes(model),
        per_class=args.per_class if args.per_class is not None else settings["per_class"],
        seed=args.seed if args.seed is not None else settings["seed"],
        guidance=args.guidance,
        sampling={k: v for k, v in settings.items() if k not in GENERIC and v is not None},
        resize_to=settings["resize_to"],
        precision=settings.get("precision") or family.default_precision,
        checkpoint_sha256=sha256_file(args.checkpoint),
        tokenizer_sha256=sha256_file(args.tokenizer),
    )
    return family, model, tokenizer, spec


def main(cfg: dict, args: argparse.Namespace) -> None:
    import contextlib

    from ccalign.device import world
    from ccalign.io import output_lock

    # one job per output: its rank 0 holds the lock (a second job stops, naming the holder); the other
    # ranks write nothing before init_process_group, which waits for rank 0
    with output_lock(args.out) if world()[0] == 0 else contextlib.nullcontext():
        _sample(cfg, args)


def _sample(cfg: dict, args: argparse.Namespace) -> None:
    import datetime
    import shutil
    import time

    import torch
    import torch.distributed as dist

    from ccalign.device import resolve_device, world
    from ccalign.log import get_logger
    from ccalign.sample.run import fill_shards
    from ccalign.sample.shards import grid_indices, merge_shards, plan_shards, rank_shards, save_grid
    from ccalign.tracking import stage_run

    log = get_logger("sample")
    rank, world_size = world()
    device = resolve_device()
    family, model, tokenizer, spec = load(cfg, args, device)
    settings = cfg["models"][args.model]["sample"]
    batch_size = settings["batch_size"]
    shards = plan_shards(spec.num_samples, settings["shard_size"])
    shard_dir = args.out.with_name(f"{args.out.stem}.shards")
    log.info(
        "rank %d/%d: %d samples (%d classes × %d) in %d shards, guidance %g, sampling %s, %s, on %s",
        rank,
        world_size,
        spec.num_samples,
        spec.num_classes,
        spec.per_class,
        len(shards),
        spec.guidance,
        spec.sampling,
        spec.precision,
        device,
    )
    if world_size > 1:  # ranks wait up to a day for the slowest one at the end
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))

    tags = {
        "input.checkpoint.sha256": spec.checkpoint_sha256,
        "input.tokenizer.sha256": spec.tokenizer_sha256,
    }
    params = {
        f"run.{k}": getattr(spec, k)
        for k in ("seed", "per_class", "guidance", "sampling", "resize_to", "precision")
    }
    params.update({"run.num_samples": spec.num_samples, "run.world_size": world_size, "run.device": device})
    with stage_run(cfg, SPEC.name, args.labels, tags=tags, params=params) as run:
        t0 = time.perf_counter()
        made = fill_shards(
            family,
            model,
            tokenizer,
            spec,
            shard_dir,
            rank_shards(shards, rank, world_size),
            batch_size,
            device,
        )
        if world_size > 1:  # the only collective: images made by all ranks, which also waits for every rank
            total = torch.tensor([made])
            dist.all_reduce(total)
            made = int(total.item())
            dist.destroy_process_group()
        seconds = time.perf_counter() - t0  # until the slowest rank finished
        if made:  # throughput goes to the log and MLflow, never into the outputs
            rate = made / seconds
            run.log_metrics(
                {
                    "images_per_s": rate,
                    "s_per_image": world_size / rate,
                    "images": made,
                    "sample_seconds": seconds,
                }
            )
            log.info(
                "%d images in %.1f s: %.2f images/s, %.3f s per image per process",
                made,
                seconds,
                rate,
                world_size / rate,
            )
        if rank != 0:
            return
        # check every rank's shards before trusting them (and redo any that fail)
        fill_shards(family, model, tokenizer, spec, shard_dir, shards, batch_size, device)
        grid = merge_shards(
            shard_dir,
            shards,
            spec.labels(),
            args.out,
            keep=grid_indices(spec.num_classes, spec.per_class, GRID, GRID),
        )
        grid_path = Path(args.out).with_name("grid.png")
        save_grid(grid, min(GRID, spec.per_class), grid_path)
        run.log_artifact(grid_path)
        log.info("wrote %s (%d samples) and %s", args.out, spec.num_samples, grid_path)
    shutil.rmtree(shard_dir)


SPEC = Stage(
    name="sample",
    help=HELP,
    outputs={
        "samples": "samples/{family}/{model}/seed{seed}/{variant}/g{guidance}/samples.npz",
        "grid": "samples/{family}/{model}/seed{seed}/{variant}/g{guidance}/grid.png",
    },
    jobs=jobs,
    add_arguments=add_arguments,
    main=main,
    params=("sample", "models.{model}.args", "models.{model}.sample", "tokenizers.{tokenizer}"),
    persist=True,
)
