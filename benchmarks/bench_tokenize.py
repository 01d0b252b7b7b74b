"""Code cache vs LlamaGen's official extraction layout: bytes, files and extraction speed.

1. Storage at the paper's LlamaGen geometry (384 px, VQ-16 → 576 codes, two ten-crop ranges → 20 views):
   our uint16 shards vs the official per-image int64 ``.npy`` pair per crop range, written for real.
2. CPU extraction with the embedded tokenizers (8×8 digits, nine shifts per image): our batched, sharded
   extraction vs the official loop (one image per encode call, two ``np.save`` per image).
3. ``--device cuda``: VQ-16 at 384 px, 20 ten-crop views per image, images/s per GPU, batched vs batch 1.

    python benchmarks/bench_tokenize.py [--images 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine
from PIL import Image

from ccalign.data.cache import CachePlan, extract, finalize, select_shards, write_shard
from ccalign.data.digits import load_digits_uint8
from ccalign.data.folder import ImageFolder, list_image_folder
from ccalign.data.views import ViewSpec, make_views, to_model_input
from ccalign.families import get_family
from ccalign.io import atomic_write_text

IMAGENET_TRAIN = 1_281_167
SHARD_SIZE = 4096
EMBEDDED = {
    "llamagen": dict(
        codebook_size=128,
        codebook_embed_dim=8,
        encoder_ch_mult=[1, 1],
        decoder_ch_mult=[1, 1],
        z_channels=16,
        ch=32,
    ),
    "var": dict(vocab_size=128, z_channels=8, ch=32, ch_mult=[1, 1], v_patch_nums=[1, 2, 3, 4]),
}
VQ16 = dict(
    codebook_size=16384,
    codebook_embed_dim=8,
    encoder_ch_mult=[1, 1, 2, 2, 4],
    decoder_ch_mult=[1, 1, 2, 2, 4],
    z_channels=256,
    ch=128,
)


def disk_usage(paths: list[Path]) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the files."""
    st = [p.stat() for p in paths]
    return sum(s.st_size for s in st), sum(s.st_blocks * 512 for s in st)


def bench_storage(tmp: Path, n: int) -> list[str]:
    views, seq_len, ranges = 20, 576, 2
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16384, (n, views, seq_len))
    labels = rng.integers(0, 1000, n)
    # official: per crop range, codes/{i}.npy (1, 10, 576) int64 and labels/{i}.npy (1,) int64
    off = []
    for r in range(ranges):
        for kind in ("codes", "labels"):
            (tmp / "official" / f"range{r}" / kind).mkdir(parents=True)
        for i in range(n):
            for kind, arr in (
                ("codes", codes[i : i + 1, 10 * r : 10 * (r + 1)]),
                ("labels", labels[i : i + 1]),
            ):
                path = tmp / "official" / f"range{r}" / kind / f"{i}.npy"
                np.save(path, arr)
                off.append(path)
    # ours: one shard of n images (uint16 codes, int16 labels, a JSON record) + the manifest
    folder = ImageFolder(tmp, [str(c) for c in range(1000)], [(f"{i}.png", int(labels[i])) for i in range(n)])
    plan = CachePlan(
        folder=folder,
        views=ViewSpec.from_dict({"mode": "tencrop"}, 384),
        shard_size=n,
        family="llamagen",
        vocab_size=16384,
        tokenizer={"name": "VQ-16", "sha256": "0" * 64, "args": {}},
    )
    write_shard(tmp / "ours", plan, 0, codes.astype(np.uint16), labels.astype(np.int16))
    finalize(plan, tmp / "ours")
    ours = sorted((tmp / "ours").iterdir())
    (oa, oal), (ua, ual) = disk_usage(off), disk_usage(ours)
    files_off = 2 * ranges * IMAGENET_TRAIN
    files_ours = 3 * -(-IMAGENET_TRAIN // SHARD_SIZE) + 1
    return [
        f"### Storage: LlamaGen 384 px, {views} views × {seq_len} codes per image ({n} images written)",
        "",
        "| layout | bytes/image (apparent) | bytes/image (allocated) | files (ImageNet) | ImageNet size |",
        "|---|---|---|---|---|",
        f"| official `extract_codes_c2i.py` (int64, 2 files per image per crop range) | {oa / n:,.0f} | "
        f"{oal / n:,.0f} | {files_off:,} | {oal / n * IMAGENET_TRAIN / 1e9:,.1f} GB |",
        f"| ccalign shards (uint16 + int16, {SHARD_SIZE} images/shard) | {ua / n:,.0f} | {ual / n:,.0f} | "
        f"{files_ours:,} | {ual / n * IMAGENET_TRAIN / 1e9:,.1f} GB |",
        f"| **ratio** | **{ua / oa:.3f}×** | **{ual / oal:.3f}×** | **1/{files_off / files_ours:,.0f}** | |",
        "",
    ]


def digits_folder(root: Path, n: int) -> ImageFolder:
    images, labels = load_digits_uint8()
    for i in range(n):
        path = root / str(labels[i]) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(path)
    return list_image_folder(root)


def official_loop(folder: ImageFolder, spec: ViewSpec, encode, out: Path, device) -> None:
    """The official extraction: one image per encode call, one codes and one labels .npy per image.

    All views go in one call, where the official script makes one pass per crop range: this favours it."""
    (out / "codes").mkdir(parents=True)
    (out / "labels").mkdir(parents=True)
    with torch.inference_mode():
        for i in range(len(folder)):
            x = to_model_input(torch.from_numpy(make_views(folder.load(i), spec, i)).to(device))
            codes = encode(x).view(1, spec.num_views, -1).cpu().numpy()
            np.save(out / "codes" / f"{i}.npy", codes)
            np.save(out / "labels" / f"{i}.npy", np.array([folder.label(i)]))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_extraction(
    tmp: Path,
    folder: ImageFolder,
    spec: ViewSpec,
    family_name: str,
    args: dict,
    device: str,
    batch_size: int,
    num_workers: int,
    title: str,
) -> list[str]:
    torch.manual_seed(0)
    family = get_family(family_name)
    tok = family.build_tokenizer(args).to(device).eval()
    plan = CachePlan(
        folder=folder,
        views=spec,
        shard_size=SHARD_SIZE,
        family=family_name,
        vocab_size=tok.state_dict()["quantize.embedding.weight"].shape[0],
        tokenizer={"name": title, "sha256": "0" * 64, "args": args},
    )
    encode = lambda x: family.encode(tok, x)  # noqa: E731
    with torch.inference_mode():  # warm-up (allocator, kernel selection)
        encode(to_model_input(torch.from_numpy(make_views(folder.load(0), spec)).to(device)))
    t_naive = timed(lambda: official_loop(folder, spec, encode, tmp / f"naive-{title}", device))
    t_ours = timed(
        lambda: extract(
            plan,
            tmp / f"ours-{title}",
            encode,
            select_shards(plan.num_shards),
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
        )
    )
    n = len(folder)
    return [
        f"| {title} | {spec.num_views} | {n / t_naive:,.1f} | {n / t_ours:,.1f} | {t_naive / t_ours:.1f}× |"
    ]


def synthetic_folder(root: Path, n: int) -> ImageFolder:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"n{i % 10:08d}" / f"{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
    return list_image_folder(root)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="images per extraction benchmark")
    p.add_argument("--storage-images", type=int, default=1024, help="images written in the storage benchmark")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the VQ-16 384 px ten-crop benchmark")
    p.add_argument(
        "--batch",
        type=int,
        default=4,
        help="GPU: images per encode call, x20 views (8 run out of memory on an 80 GB H100 in float32)",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_tokenize.md"))
    args = p.parse_args()

    lines = [
        "## bench_tokenize: code cache vs the official extraction layout",
        "",
        f"Machine: {machine()}",
        "",
    ]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lines += bench_storage(tmp / "storage", args.storage_images)
        lines += [
            f"### Extraction on {args.device} (images/s; same tokenizer, views and images in both)",
            "",
            "| tokenizer / setting | views/image | official loop (batch 1, 2 files/image) | ccalign "
            "(batched, sharded) | speed-up |",
            "|---|---|---|---|---|",
        ]
        if args.device == "cpu":
            folder = digits_folder(tmp / "digits", args.images)
            shifts = ViewSpec.from_dict({"mode": "shifts", "pad": 1}, 8)
            for name, tok_args in EMBEDDED.items():
                lines += bench_extraction(
                    tmp,
                    folder,
                    shifts,
                    name,
                    tok_args,
                    "cpu",
                    64,
                    0,
                    f"embedded {name} tokenizer, 8×8 digits, nine shifts",
                )
        else:
            folder = synthetic_folder(tmp / "imagenet", args.images)
            tencrop = ViewSpec.from_dict({"mode": "tencrop", "crop_ranges": [1.1, 1.05]}, 384)
            lines += bench_extraction(
                tmp,
                folder,
                tencrop,
                "llamagen",
                VQ16,
                args.device,
                args.batch,
                min(8, os.cpu_count() or 1),
                f"VQ-16, 384 px, ten-crop × 2 ranges, batch {args.batch} images",
            )
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(text, args.out)


if __name__ == "__main__":
    main()
