"""What several test modules share (importable as ``testkit``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import argparse

import torch

from ccalign.cli import build_parser
from ccalign.pipeline import stages


def stage_args(name: str, *argv) -> argparse.Namespace:
    """The flags of stage ``name`` as the CLI parses them (no labels, no record unless given)."""
    command = stages()[name].command
    return build_parser(command).parse_args([command, *map(str, argv)])


def run_stage(name: str, cfg: dict, *argv) -> None:
    """Stage ``name``'s work on a resolved ``cfg``, with its flags parsed by the CLI."""
    stages()[name].main(cfg, stage_args(name, *argv))


def tiny_tokenizers() -> dict[str, dict]:
    """Args of tiny tokenizers of the real classes per family (8×8 images → 4×4 latent grid); a new copy."""
    return {
        "llamagen": dict(
            codebook_size=64,
            codebook_embed_dim=8,
            encoder_ch_mult=[1, 1],
            decoder_ch_mult=[1, 1],
            z_channels=16,
            ch=32,
        ),
        "var": dict(vocab_size=64, z_channels=8, ch=32, ch_mult=[1, 1], v_patch_nums=[1, 2, 4]),
    }


def close(actual, expected, *, atol: float = 0.0, rtol: float = 1e-5, what: str = "") -> None:
    """``torch.testing.assert_close`` of both sides as float32 tensors; ``what`` prefixes the message."""
    torch.testing.assert_close(
        torch.as_tensor(actual).float(),
        torch.as_tensor(expected).float(),
        atol=atol,
        rtol=rtol,
        msg=lambda m: f"{what}: {m}",
    )
