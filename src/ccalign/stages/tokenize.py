"""Stage ``tokenize``: encode every view of every image of a folder into the sharded code cache.

Runs as one process, as ``torchrun --nproc_per_node G`` (rank r takes every G-th of the job's shards, on
``cuda:LOCAL_RANK``), and as n independent jobs (``--shard i/n`` takes shards k ≡ i mod n). Finished shards
are skipped, so any of these can be killed and started again; whichever process finds every shard present
writes ``manifest.json``. Settings: ``tokenizers.<name>.tokenize``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from ccalign.pipeline import Job, Plan, Stage

HELP = "tokenize an image folder into the sharded, verified code cache (resumable, --shard i/n, torchrun)"


def jobs(plan: Plan) -> Iterator[Job]:
    for name, tok in plan.cfg["tokenizers"].items():
        ckpt = plan.tokenizer_ckpt(name)
        out = plan.path("tokenize", tokenizer=name)
        flags = ["--tokenizer-name", name, "--tokenizer", ckpt, "--data", plan.dataset_dir()]
        flags += ["--out", out.rpartition("/")[0]]
        inputs = {**plan.dataset_inputs(), "tokenizer": ckpt}
        labels = {"tokenizer": name, "family": tok["family"]}
        yield plan.job("tokenize", {"tokenizer": name}, labels, inputs, flags)


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


def view_spec(cfg: dict, tokenizer: str):
    """``tokenizers.<name>.tokenize.views`` (default: the family's official augmentation); their image_size
    defaults to dataset.image_size."""
    from ccalign.data.views import ViewSpec
    from ccalign.families import get_family

    tcfg = cfg["tokenizers"][tokenizer]
    views = tcfg["tokenize"].get("views") or get_family(tcfg["family"]).default_views
    return ViewSpec.from_dict(views, image_size=cfg["dataset"]["image_size"])


def main(cfg: dict, args: argparse.Namespace) -> None:
    import time
    from pathlib import Path

    from ccalign.config import entry
    from ccalign.data.cache import CachePlan, extract, finalize, select_shards
    from ccalign.data.folder import list_image_folder
    from ccalign.device import resolve_device, world
    from ccalign.families import get_family
    from ccalign.io import sha256_file
    from ccalign.log import get_logger
    from ccalign.tracking import stage_run

    log = get_logger("tokenize")
    tcfg = entry(cfg, "tokenizers", args.tokenizer_name)
    settings = tcfg["tokenize"]
    family = get_family(tcfg["family"])
    device = resolve_device(args.device)
    rank, world_size = world()

    tokenizer = family.load_tokenizer(args.tokenizer, tcfg["args"]).to(device).eval()
    folder = list_image_folder(Path(args.data, args.split), cfg["dataset"]["num_classes"])
    plan = CachePlan(
        folder=folder,
        views=view_spec(cfg, args.tokenizer_name),
        shard_size=settings["shard_size"],
        family=family.name,
        vocab_size=family.codebook_size(tokenizer),
        tokenizer={"name": args.tokenizer_name, "sha256": sha256_file(args.tokenizer), "args": tcfg["args"]},
    )
    shards = select_shards(plan.num_shards, args.shard, rank, world_size)
    params = {
        "tokenize.views": plan.views.to_dict(),
        "tokenize.num_views": plan.views.num_views,
        "tokenize.job": f"{args.shard[0]}/{args.shard[1]}",
        "tokenize.world_size": world_size,
        "tokenize.device": str(device),
        **{f"tokenize.{k}": v for k, v in settings.items() if k != "views"},
    }
    with stage_run(cfg, SPEC.name, args.labels, params=params, inputs={"tokenizer": args.tokenizer}) as run:
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


SPEC = Stage(
    name="tokenize",
    help=HELP,
    outputs={"cache": "cache/{tokenizer}/manifest.json"},
    jobs=jobs,
    add_arguments=add_arguments,
    main=main,
    params=("dataset", "tokenizers.{tokenizer}"),
    folder=True,
    persist=True,
)
