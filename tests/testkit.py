"""What several test modules share (importable as ``testkit``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

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


# ------------------------------------------------------------- the CLI on the smoke config, in one process

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "config" / "smoke.yaml"

# Runs ``ccalign`` CLI invocations (``ccalign.cli.main``, what the console script calls) one after the other
# in one process, with what each logged. A job is ["cli", label, argv] or ["sh", label, command]; results go
# to a JSON file after every job: label, rc, log (the CLI's stderr; a traceback if main raised), sh output.
DRIVER = r"""
import io, json, logging, subprocess, sys, traceback
from ccalign.cli import main
from ccalign.log import get_logger
get_logger()
handler = logging.getLogger("ccalign").handlers[0]  # the CLI's stderr handler
results = []
for kind, label, what in json.load(open(sys.argv[1])):
    if kind == "sh":
        out = subprocess.run(what, shell=True, capture_output=True, text=True)
        results.append({"label": label, "rc": out.returncode, "log": out.stdout + out.stderr})
    else:
        buf = io.StringIO()
        handler.setStream(buf)
        try:
            rc = main(what)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc = "raised"
            buf.write(traceback.format_exc())
        results.append({"label": label, "rc": rc, "log": buf.getvalue()})
    json.dump(results, open(sys.argv[2], "w"))
"""


def run_cli_jobs(jobs: list, cwd: Path, prefix: list[str] = (), umask: int | None = None) -> dict[str, dict]:
    """Run ``jobs`` (see DRIVER) in a fresh Python process in ``cwd`` (``prefix``: e.g. an ``unshare``
    command line); returns label → {"rc", "log"}."""
    cwd.mkdir(parents=True, exist_ok=True)
    spec, result = cwd / ".jobs.json", cwd / ".results.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", DRIVER, str(spec), str(result)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["label"]: r for r in json.loads(result.read_text())}
    spec.unlink()
    result.unlink()
    return results


def cli(label: str, stage: str, *args: str) -> list:
    """A job of ``run_cli_jobs``: ``ccalign <stage> --config smoke.yaml --set tracking.defer=true <args>``."""
    return ["cli", label, [stage, "--config", str(SMOKE), "--set", "tracking.defer=true", *args]]


# The smoke experiment's LlamaGen chain, paths relative to the working directory.
TOKENIZER = "data/tokenizers/vq_tiny/tokenizer.pt"
CACHE = "data/cache/vq_tiny"
CLASSIFIER = "data/classifier/classifier.pt"
BASE = "data/pretrain/model.pt"
SAMPLES = "data/samples/samples.npz"
SMOKE_CHAIN = [
    cli("prepare-data", "prepare-data", "--out", "data/raw/digits"),
    cli(
        "train-tokenizer",
        "train-tokenizer",
        "--name",
        "vq_tiny",
        "--data",
        "data/raw/digits",
        "--out",
        TOKENIZER,
    ),
    cli(
        "tokenize",
        "tokenize",
        *(
            "--tokenizer-name",
            "vq_tiny",
            "--tokenizer",
            TOKENIZER,
            "--data",
            "data/raw/digits",
            "--out",
            CACHE,
        ),
    ),
    cli(
        "train-classifier",
        "train-classifier",
        *("--data", "data/raw/digits/train", "--val", "data/raw/digits/val", "--out", CLASSIFIER),
    ),
    cli(
        "pretrain",
        "pretrain",
        *(
            "--model",
            "llamagen_tiny",
            "--seed",
            "0",
            "--tokenizer",
            TOKENIZER,
            "--cache",
            CACHE,
            "--out",
            BASE,
        ),
    ),
    cli(
        "finetune",
        "finetune",
        *("--model", "llamagen_tiny", "--seed", "0", "--objective", "cca", "--lam", "1", "--base", BASE),
        *("--tokenizer", TOKENIZER, "--cache", CACHE, "--out", "data/finetune/model.pt"),
    ),
    cli(
        "sample",
        "sample",
        *("--model", "llamagen_tiny", "--checkpoint", BASE, "--tokenizer", TOKENIZER),
        *("--guidance", "1", "--out", SAMPLES),
    ),
    cli(
        "evaluate",
        "evaluate",
        *("--samples", SAMPLES, "--reference", "data/raw/digits/val", "--classifier", CLASSIFIER),
        *("--out", "data/eval/metrics.json"),
    ),
]


def error_lines(log: str) -> list[str]:
    """The lines a stage logged at ERROR level."""
    return [line for line in log.splitlines() if " ERROR " in line]
