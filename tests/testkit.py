"""What several test modules share (importable as ``testkit``: pytest puts tests/ on sys.path).

Comparisons against reference values (the golden fixtures above all) go through ``close``: float32 rounding
error of a computed tensor grows with the magnitude of the whole computation, not with each element's own
magnitude (an element near zero computed from large terms carries the large terms' error), so the bound is
normwise: |actual − expected| ≤ atol + rtol·max(1, scale) for every element, scale = max|expected|.
Indices (codes, greedy tokens, decisions) are compared exactly only where the reference's margin exceeds
what float32 noise can move: ``NearTies`` records the positions where it does not and reports them as a skip
naming file, key, position and margin, after every other check of the test ran.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ccalign.align.losses import preference_loss
from ccalign.cli import build_parser
from ccalign.config import load_config
from ccalign.pipeline import Plan, stages

# float32 noise of a network's output relative to max(1, its magnitude). Evidence (fixture READMEs and sets
# made with the same generator): the official float32 encoder features are ~2e-5 from float64 at
# magnitude ~5.5 (3.6e-6 relative); ours differ from the official outputs by at most ~5e-6 relative, at 1
# and 2 threads; a ×1.001 change of one first- or last-layer weight moves them by ≥ 5e-5 relative.
FP32 = 1e-5
# rounding of a few float32 operations on exact inputs (log-softmax, sums, loss formulas): ~8 ulp.
OPS = 1e-6


# the smallest target a test config needs (the schema asks for one)
BASE_TARGET = {
    "base": {"description": "the base models", "sets": [{"variant": "base", "guidance": ["free"]}]}
}


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


def bound(
    expected,
    *,
    rtol: float | Tensor = FP32,
    scale: float | Tensor | None = None,
    atol: float | Tensor = 0.0,
) -> Tensor:
    """The allowed |Δ| per element: atol + rtol·max(1, scale). scale defaults to max|expected|; tensors
    broadcast against ``expected`` (a per-row magnitude, a per-step noise amplification)."""
    expected = torch.as_tensor(expected).double()
    if scale is None:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
    scale = torch.as_tensor(scale, dtype=torch.float64).clamp(min=1.0)
    rtol, atol = torch.as_tensor(rtol, dtype=torch.float64), torch.as_tensor(atol, dtype=torch.float64)
    return (atol + rtol * scale).expand_as(expected)


def close(
    actual,
    expected,
    *,
    rtol: float | Tensor = FP32,
    scale: float | Tensor | None = None,
    atol: float | Tensor = 0.0,
    what: str = "",
) -> None:
    """Assert |actual − expected| ≤ ``bound(expected, ...)`` everywhere (same shape); rtol=0, atol=0 demands
    equality. The message names ``what``, the worst element, its bound and the reference magnitude."""
    a, e = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if not e.numel():
        return
    allowed = bound(e, rtol=rtol, scale=scale, atol=atol)
    excess = (a - e).abs() - allowed
    if excess.isnan().any() or (excess > 0).any():
        i = int(excess.nan_to_num(float("inf")).flatten().argmax())
        at = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), e.shape))
        raise AssertionError(
            f"{what}: |Δ| = {(a - e).abs().flatten()[i]:.3g} > allowed {allowed.flatten()[i]:.3g} at {at} "
            f"(actual {a.flatten()[i]:.8g}, expected {e.flatten()[i]:.8g}, max|expected| "
            f"{float(e.abs().max()):.4g}); {int((excess > 0).sum())} of {e.numel()} elements exceed"
        )


def top2_margin(scores: Tensor) -> Tensor:
    """Best minus second-best score along the last dim (float64): how far an argmax is from a tie."""
    top = scores.double().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def code_margins(
    z: Tensor, codebook: Tensor, z_bound: float, *, normalize: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest-code margins of latents z (N, C) against codebook (K, C): (margin, noise, nearest distance).

    margin = d₂ − d₁ of the two smallest squared distances (float64), searched on the unit sphere when
    ``normalize`` (both sides L2-normalised, as LlamaGen's quantizer). noise = how far an elementwise
    latent error |δz| ≤ z_bound moves the margin, to first order: d₂ − d₁ = 2ẑ·(e₁ − e₂) + ‖e₂‖² − ‖e₁‖²
    moves by 2·δẑ·(e₁ − e₂), and δẑ = (I − ẑẑᵀ)·δz/‖z‖ when normalising (δz itself otherwise); the
    codebook is loaded exactly. The argmin is defined where margin > noise.
    """
    z, codebook = z.detach().double(), codebook.detach().double()
    if normalize:
        norm = z.norm(dim=1, keepdim=True)
        z, codebook = z / norm, F.normalize(codebook, dim=1)
    d = (z[:, None, :] - codebook[None]).square().sum(-1)  # (N, K)
    two = d.topk(2, dim=1, largest=False)
    w = codebook[two.indices[:, 0]] - codebook[two.indices[:, 1]]  # (N, C): the margin's gradient / 2
    if normalize:  # project out the radial direction, which normalisation removes
        w = (w - z * (z * w).sum(1, keepdim=True)) / norm
    return two.values[:, 1] - two.values[:, 0], 2 * z_bound * w.abs().sum(1), two.values[:, 0]


class NearTies:
    """Exact index checks where they are defined; near-ties collected and reported as one skip at the end.

    ``exact`` asserts equality wherever ``margin > noise`` and records the other positions (file, key,
    position, margin, noise) instead. Call ``report()`` as the test's last statement: it skips, naming every
    near-tie, when there was one — after all the test's other assertions passed.
    """

    def __init__(self, fixture_set) -> None:
        self.where = f"{Path(fixture_set).parent.name}/{Path(fixture_set).name}"
        self.found: list[str] = []

    def exact(
        self, actual: Tensor, expected: Tensor, margin: Tensor, noise: Tensor | float, what: str
    ) -> Tensor:
        """Assert actual == expected where margin > noise (same shapes); returns the defined mask."""
        actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
        assert actual.shape == expected.shape, (
            f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        )
        noise = torch.as_tensor(noise, dtype=torch.float64).expand_as(margin)
        defined = margin.double() > noise
        wrong = defined & (actual != expected)
        if wrong.any():
            at = tuple(int(i) for i in wrong.nonzero()[0])
            raise AssertionError(
                f"{what}: {int(wrong.sum())} of {int(defined.sum())} defined indices differ, first at {at}: "
                f"{actual[at].item()} != expected {expected[at].item()} (margin {margin[at]:.3g} > noise "
                f"{noise[at]:.3g})"
            )
        for at in map(tuple, (~defined).nonzero().tolist()):
            self.found.append(f"{what} at {at}: margin {margin[at]:.3g} <= float32 noise {noise[at]:.3g}")
        return defined

    def exact_sampled(
        self,
        actual: Tensor,
        expected: Tensor,
        margin: Tensor,
        noise: Tensor,
        what: str,
        steps: Tensor | None = None,
    ) -> Tensor:
        """``exact`` for sampled sequences (B, T) whose step s depends on the tokens of steps < s.

        ``steps`` (T,) is each position's sampling step (default: its index). A near-tie that came out
        differently makes the rest of its row incomparable: those positions are recorded as one near-tie
        entry, not checked. Returns the (B,) mask of rows compared in full.
        """
        steps = torch.arange(actual.shape[1]) if steps is None else steps
        noise = torch.as_tensor(noise, dtype=torch.float64).expand_as(margin)
        flipped = (margin.double() <= noise) & (actual != expected)
        first = torch.where(flipped, steps.expand_as(flipped), int(steps.max()) + 1).min(1).values  # (B,)
        later = steps[None] > first[:, None]
        # later positions: nothing to compare (expected vs itself, margin +inf), reported below instead
        self.exact(
            torch.where(later, expected, actual),
            expected,
            margin.double().masked_fill(later, torch.inf),
            noise,
            what,
        )
        for b in flipped.any(1).nonzero()[:, 0].tolist():
            self.found.append(
                f"{what} row {b}: steps after {int(first[b])} not comparable (that near-tie flipped)"
            )
        return ~flipped.any(1)

    def exact_decisions(
        self,
        gap_pos: Tensor,
        gap_neg: Tensor,
        ref_pos: Tensor,
        ref_neg: Tensor,
        gap_noise: float,
        what: str,
        tied: Tensor | None = None,
    ) -> Tensor:
        """The per-row decisions gap⁺ > gap⁻ (the ``acc`` diagnostic) against the reference's, exact where the
        reference's |gap⁺ − gap⁻| exceeds twice the gaps' noise. Rows ``tied`` by construction (the same
        label on both sides) are equal in exact arithmetic: rounding decides them, they are left out (no
        near-tie). Returns the mask of rows compared."""
        ours, ref = gap_pos > gap_neg, ref_pos > ref_neg
        margin = (ref_pos - ref_neg).double().abs()
        if tied is not None:
            ours, margin = torch.where(tied, ref, ours), margin.masked_fill(tied, torch.inf)
        return self.exact(ours, ref, margin, 2 * gap_noise, what) & (True if tied is None else ~tied)

    def report(self) -> None:
        if self.found:
            found = "; ".join(self.found)
            pytest.skip(
                f"{self.where}: near-ties left out of the exact checks (every other check passed): {found}"
            )


# ------------------------------------------------------------------------------------------------------------
# the official CCA trainers' per-sample log-probs and logged diagnostics (both families use the same keys)

LOGP_KEYS = ("img_logps", "negative_img_logps", "img_ref_logps", "negative_img_ref_logps")


def logp_bound(max_abs_logits: float, num_tokens: int, rtol: float) -> float:
    """Noise of a sequence log-prob Σ_t log_softmax(logits_t)[target_t]: each term x_t − logsumexp(x) carries
    at most twice the logits' noise rtol·max(1, max|logits|)."""
    return 2 * rtol * num_tokens * max(1.0, max_abs_logits)


def check_logps(logp: Tensor, ref_logp: Tensor, ref: dict, lp_noise: float, what: str) -> None:
    """(2B,) policy and reference log-probs of a [positive; negative] batch, and their gaps."""
    B = logp.shape[0] // 2
    logp, ref_logp = logp.detach(), ref_logp.detach()
    gap = logp - ref_logp
    ours = [logp[:B], logp[B:], ref_logp[:B], ref_logp[B:]]
    for key, got in zip(LOGP_KEYS, ours, strict=True):
        close(got, ref[key], rtol=0, atol=lp_noise, what=f"{what} {key}")
    close(gap[:B], ref["img_logp_gap"], rtol=0, atol=2 * lp_noise, what=f"{what} img_logp_gap")
    close(
        gap[B:], ref["negative_img_logp_gap"], rtol=0, atol=2 * lp_noise, what=f"{what} negative_img_logp_gap"
    )


def check_preference(
    loss: Tensor,
    metrics: dict,
    ref: dict,
    lp_noise: float,
    what: str,
    *,
    loss_key: str = "loss",
    loss_rtol: float = FP32,
    **kw,
) -> None:
    """A preference loss and its diagnostics against the official values in ``ref``.

    The loss carries the log-probs' noise propagated through the objective's gradient at the official
    log-probs (first order: Σ|∂loss/∂logp|·lp_noise) plus its own rounding, loss_rtol·max(1, |loss|);
    ``kw`` are the ``preference_loss`` arguments. The margin and rewards are means of gaps; the official
    "sft losses" (token-mean cross-entropies, present with label_smooth = 0) carry lp_noise / num_tokens.
    """
    lps = torch.cat([ref[k] for k in LOGP_KEYS]).double().requires_grad_(True)
    B = lps.shape[0] // 4
    (grad,) = torch.autograd.grad(preference_loss(logp=lps[: 2 * B], ref_logp=lps[2 * B :], **kw)[0], lps)
    propagated = float(grad.abs().sum()) * lp_noise
    close(loss.detach(), ref[loss_key], rtol=loss_rtol, atol=propagated, what=f"{what} {loss_key}")
    close(metrics["margin"], ref["reward_margin"], rtol=0, atol=4 * lp_noise, what=f"{what} reward_margin")
    for key, ref_gap in [("reward_pos", ref["img_logp_gap"]), ("reward_neg", ref["negative_img_logp_gap"])]:
        close(metrics[key], ref_gap.mean(), rtol=0, atol=2 * lp_noise, what=f"{what} {key}")
    if "sftloss" in ref:
        sft = dict(
            sftloss="nll_pos",
            shuffle_sftloss="nll_neg",
            ref_sftloss="ref_nll_pos",
            ref_shuffle_sftloss="ref_nll_neg",
        )
        for key, ours in sft.items():
            close(metrics[ours], ref[key], rtol=0, atol=lp_noise / kw["num_tokens"], what=f"{what} {key}")


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


def copy_repo(dest: Path) -> Path:
    """The working tree as git sees it (tracked + untracked, not ignored), without data/ contents."""
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for f in filter(None, (x.decode() for x in files)):
        src = ROOT / f
        if src.is_file():  # a path git lists may be deleted in the working tree
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def one_family(cfg: dict, family: str) -> dict:
    """``cfg`` (a smoke-like config) reduced to ``family``'s models and tokenizers: half the jobs. Target sets
    of the other family's models only are dropped."""
    for section in ("models", "tokenizers"):
        cfg[section] = {k: v for k, v in cfg[section].items() if v["family"] == family}
    kept = set(cfg["models"])
    for target in cfg["targets"].values():
        target["sets"] = [s for s in target["sets"] if set(s.get("models", kept)) & kept]
    return cfg


DEFER = ("--set", "tracking.defer=true")  # the stage buffers its MLflow run (no server in unit tests)


def smoke_argv(stage: str, *args: str) -> list[str]:
    """``ccalign`` arguments: ``<stage> --config smoke.yaml --set tracking.defer=true <args>``."""
    return [stage, "--config", str(SMOKE), *DEFER, *args]


def cli(label: str, stage: str, *args: str) -> list:
    """A job of ``run_cli_jobs``: ``smoke_argv(stage, *args)``."""
    return ["cli", label, smoke_argv(stage, *args)]


# The smoke experiment's LlamaGen chain: jobs of its Plan (the argv Snakemake and DVC run, paths relative
# to the working directory), labelled by stage; a test of the chain runs what the DAG runs.
_JOBS = {j.name: j for j in Plan(load_config(SMOKE), str(SMOKE)).jobs()}
CHAIN = {
    "prepare-data": _JOBS["prepare_data-digits"],
    "train-tokenizer": _JOBS["train_tokenizer-vq_tiny"],
    "tokenize": _JOBS["tokenize-vq_tiny"],
    "train-classifier": _JOBS["train_classifier-digits"],
    "pretrain": _JOBS["pretrain-llamagen-llamagen_tiny-0"],
    "finetune": _JOBS["finetune-llamagen-llamagen_tiny-0-cca_lam1"],
    "sample": _JOBS["sample-llamagen-llamagen_tiny-0-base-1"],  # the base model, guidance-free
    "evaluate": _JOBS["evaluate-llamagen-llamagen_tiny-0-base-1"],
}
DATA = str(Path(CHAIN["prepare-data"].output).parent)
TOKENIZER = CHAIN["train-tokenizer"].output
CACHE = str(Path(CHAIN["tokenize"].output).parent)
CLASSIFIER = CHAIN["train-classifier"].output
BASE = CHAIN["pretrain"].output
FINETUNED = CHAIN["finetune"].output
SAMPLES = CHAIN["sample"].output
METRICS = CHAIN["evaluate"].output
SMOKE_CHAIN = [["cli", label, [*j.args[1:], *DEFER]] for label, j in CHAIN.items()]


def sample_argv(root: Path, data_root: Path, out: Path) -> list[str]:
    """``ccalign`` arguments sampling the chain's base model (in ``root``), guidance-free, to ``out``."""
    args = (
        "--model",
        "llamagen_tiny",
        "--checkpoint",
        str(root / BASE),
        "--tokenizer",
        str(root / TOKENIZER),
    )
    return smoke_argv(
        "sample", "--set", f"data_root={data_root}", *args, "--guidance", "1", "--out", str(out)
    )


def error_lines(log: str) -> list[str]:
    """The lines a stage logged at ERROR level."""
    return [line for line in log.splitlines() if " ERROR " in line]
