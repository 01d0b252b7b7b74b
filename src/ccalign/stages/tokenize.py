"""Stage ``tokenize``: encode every view of every image of a folder into the sharded code cache.

Runs as one process, as ``torchrun --nproc_per_node G`` (rank r takes every G-th of the job's shards, on
``cuda:LOCAL_RANK``), and as n independent jobs (``--shard i/n`` takes shards k ≡ i mod n). Finished shards
are skipped, so any of these can be killed and started again; whichever process finds every shard present
writes ``manifest.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from ccalign.config import entry
from ccalign.data.cache import CachePlan, extract, finalize, select_shards
from ccalign.data.folder import list_image_folder
from ccalign.data.views import ViewSpec
from ccalign.device import resolve_device
from ccalign.families import get_family
from ccalign.io import sha256_file
from ccalign.log import get_logger
from ccalign.tracking import stage_run

HELP = "tokenize an image folder into the sharded, verified code cache (resumable, --shard i/n, torchrun)"

# cfg.tokenizers[name].tokenize: extraction settings, and `views` (see ccalign.data.views)
DEFAULTS = {"batch_size": 64, "shard_size": 4096, "num_workers": 0}

log = get_logger("tokenize")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer checkpoint")
    parser.add_argument(
        "--tokenizer-name",
        required=True,
        metavar="NAME",
        help="entry of cfg.tokenizers (family, args, views)",
    )
    parser.add_argument("--family", metavar="NAME", help="model family; must match the tokenizer's config")
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset root: DIR/<split>/<class>/*")
    parser.add_argument("--split", default="train", help="sub-folder of --data to tokenize (default train)")
    parser.add_argument("--out", required=True, metavar="DIR", help="cache directory")
    parser.add_argument(
        "--shard",
        type=parse_shard,
        default=(0, 1),
        metavar="i/n",
        help="this job's share of the shards (default 0/1: all)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:N"
    )


def tokenizer_settings(cfg: dict, name: str, family: str | None = None) -> dict:
    """``cfg.tokenizers[name]`` checked against the requested family."""
    tcfg = entry(cfg, "tokenizers", name)
    if family is not None and family != tcfg["family"]:
        raise ValueError(f"--family {family} but tokenizers.{name}.family is {tcfg['family']}")
    return tcfg


def checked_settings(given: dict | None, defaults: dict, where: str) -> dict:
    """``defaults`` overridden by ``given``; a key that is not a known setting is an error."""
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **(given or {})}


def tokenize_settings(tcfg: dict, name: str) -> dict:
    """``tokenizers.<name>.tokenize``: extraction settings plus ``views``."""
    return checked_settings(tcfg.get("tokenize"), {**DEFAULTS, "views": None}, f"tokenizers.{name}.tokenize")


def view_spec(cfg: dict, tcfg: dict) -> ViewSpec:
    """``tokenize.views`` of the tokenizer (default: its family's official augmentation); its image_size
    defaults to dataset.image_size."""
    default = {"mode": "tencrop"} if tcfg["family"] == "llamagen" else {"mode": "random", "count": 1}
    views = (tcfg.get("tokenize") or {}).get("views") or default
    return ViewSpec.from_dict(views, image_size=cfg["dataset"].get("image_size"))


def tokenizer_vocab_size(tokenizer: torch.nn.Module) -> int:
    """Codebook size: rows of ``quantize.embedding.weight`` (the official key of both families)."""
    return tokenizer.state_dict()["quantize.embedding.weight"].shape[0]


def main(cfg: dict, args: argparse.Namespace) -> None:
    tcfg = tokenizer_settings(cfg, args.tokenizer_name, args.family)
    settings = tokenize_settings(tcfg, args.tokenizer_name)
    family = get_family(tcfg["family"])
    device = resolve_device(args.device)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    tokenizer = family.load_tokenizer(args.tokenizer, tcfg.get("args") or {}).to(device).eval()
    folder = list_image_folder(Path(args.data, args.split), cfg["dataset"]["num_classes"])
    plan = CachePlan(
        folder=folder,
        views=view_spec(cfg, tcfg),
        shard_size=settings["shard_size"],
        family=family.name,
        vocab_size=tokenizer_vocab_size(tokenizer),
        tokenizer={
            "name": args.tokenizer_name,
            "sha256": sha256_file(args.tokenizer),
            "args": tcfg.get("args") or {},
        },
    )
    shards = select_shards(plan.num_shards, args.shard, rank, world)
    params = {
        "tokenize.views": plan.views.to_dict(),
        "tokenize.num_views": plan.views.num_views,
        "tokenize.job": f"{args.shard[0]}/{args.shard[1]}",
        "tokenize.world_size": world,
        "tokenize.device": str(device),
        **{f"tokenize.{k}": v for k, v in settings.items() if k != "views"},
    }
    with stage_run(
        cfg,
        stage="tokenize",
        params=params,
        tags={"ccalign.tokenizer": args.tokenizer_name},
        inputs={"tokenizer": args.tokenizer},
    ) as run:
        t0 = time.perf_counter()
        counts = extract(
            plan,
            args.out,
            lambda x: family.encode(tokenizer, x),
            shards,
            batch_size=settings["batch_size"],
            device=device,
            num_workers=settings["num_workers"],
        )
        seconds = time.perf_counter() - t0
        run.log_metrics({**counts, "seconds": seconds, "images_per_s": counts["images"] / max(seconds, 1e-9)})
        manifest = finalize(plan, args.out)
        if manifest is not None:
            run.log_metrics({"num_images": manifest["num_images"], "seq_len": manifest["seq_len"]})
            log.info(
                "cache %s complete: %d images × %d views × %d codes in %d shards",
                args.out,
                manifest["num_images"],
                manifest["num_views"],
                manifest["seq_len"],
                len(manifest["shards"]),
            )
