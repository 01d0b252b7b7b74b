"""The training loop on CPU with a tiny real LlamaGen: resume after SIGKILL, data order, schedules, errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from ccalign.families import get_family
from ccalign.train import checkpoint
from ccalign.train.data import StepSampler
from ccalign.train.loop import NonFiniteError, _finite, train
from ccalign.train.optim import LR_HOLD, lr_factor, no_decay_names, weight_decay_at
from ccalign.train.settings import TrainSettings

ROOT = Path(__file__).resolve().parent.parent
FAMILY = get_family("llamagen")
# 2 layers × 32, 2×2 latent grid, 16 codes, 3 classes (+ null row); dropout on: resuming needs the RNG state
MODEL_ARGS = dict(
    dim=32,
    n_layer=2,
    n_head=2,
    multiple_of=32,
    vocab_size=16,
    block_size=4,
    num_classes=3,
    class_dropout_prob=0.1,
    token_dropout_p=0.1,
    resid_dropout_p=0.1,
    ffn_dropout_p=0.1,
)


def tiny_data(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, MODEL_ARGS["vocab_size"], (n, MODEL_ARGS["block_size"]), generator=g)
    return TensorDataset(codes, torch.randint(0, MODEL_ARGS["num_classes"], (n,), generator=g))


def tiny_models(seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILY.build_model(MODEL_ARGS)
    reference = FAMILY.build_model(MODEL_ARGS)
    reference.load_state_dict(model.state_dict())
    return model, reference


SETTINGS = dict(
    objective="cca",
    lam=3.0,
    beta=0.5,
    uncond_ratio=0.5,
    lr=3e-3,
    warmup_steps=2,
    lr_end=0.1,
    weight_decay=0.05,
    global_batch=8,
    micro_batch=4,
    max_steps=6,
    precision="fp32",
    ema=0.9,
    log_every=2,
    ckpt_every=1,
    keep_state=True,
)

# The child trains with SETTINGS; with KILL_AT > 0 it SIGKILLs itself while writing that step's checkpoint,
# halfway through the temporary file (no clean exit, no finally blocks, a torn temp file left behind).
CHILD = textwrap.dedent("""
    import os, signal, sys
    import ccalign.train.checkpoint as checkpoint
    from ccalign.io import atomic_write
    sys.path.insert(0, {tests!r})
    from test_train_loop import SETTINGS, tiny_data, tiny_models, FAMILY
    from ccalign.train.loop import NonFiniteError, _finite, train
    from ccalign.train.settings import TrainSettings

    out, kill_at = sys.argv[1], int(sys.argv[2])
    real_save = checkpoint.atomic_save_torch

    def dying_save(obj, path):
        if obj["step"] == kill_at:
            with atomic_write(path) as f:
                f.write(b"torn" * 1000)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, path)

    checkpoint.atomic_save_torch = dying_save
    model, reference = tiny_models()
    result = train(FAMILY, model, tiny_data(), TrainSettings.create(**SETTINGS), seed=7, out=out,
                   state_dir=os.path.join(os.path.dirname(out), "state"), reference=reference)
    print("RESUMED_FROM", result.resumed_from)
""")


def start_child(tmp: Path, kill_at: int) -> subprocess.Popen:
    script = tmp / "child.py"
    script.write_text(CHILD.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # every run with the same threads: same float results
    cmd = [sys.executable, str(script), str(tmp / "model.pt"), str(kill_at)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(child: subprocess.Popen) -> tuple[int, str, str]:
    out, err = child.communicate(timeout=600)
    return child.returncode, out, err[-3000:]


def assert_identical(a, b, where: str = "") -> None:
    """Nested dicts / lists of tensors and plain values, bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_resume_after_sigkill_is_identical(tmp_path: Path):
    half = SETTINGS["max_steps"] // 2
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed.mkdir()
    straight.mkdir()

    first = start_child(killed, kill_at=half + 1)  # dies while writing checkpoint half + 1: resumes at half
    third = start_child(straight, kill_at=0)  # uninterrupted (alongside)
    code, _, err = finish(first)
    assert code == -9, err
    assert not (killed / "model.pt").exists()
    assert any(p.name.endswith(".tmp") for p in (killed / "state").iterdir())  # the torn temporary file
    assert torch.load(killed / "state" / checkpoint.STATE_FILE, weights_only=True)["step"] == half

    code, out, err = finish(start_child(killed, kill_at=0))  # the same command again
    assert code == 0 and f"RESUMED_FROM {half}" in out, err
    code, out, err = finish(third)
    assert code == 0 and "RESUMED_FROM 0" in out, err

    # model, optimizer, scaler, EMA, step, sampler position and every RNG state, bit for bit
    a, b = (torch.load(d / "state" / checkpoint.STATE_FILE, weights_only=True) for d in (killed, straight))
    for key in ("model", "optimizer", "scaler", "ema", "step", "sampler", "rng", "identity"):
        assert_identical(a[key], b[key], key)
    for name in ("model.pt", "model_ema.pt"):
        assert_identical(*(torch.load(d / name, weights_only=True) for d in (killed, straight)), name)
    for name in ("model.args.json", "model_ema.args.json"):  # the constructor arguments beside each
        assert (killed / name).read_text() == (straight / name).read_text()


def test_state_of_another_run_is_refused(tmp_path: Path):
    model, reference = tiny_models()
    settings = dict(SETTINGS, max_steps=1, ema=None)
    train(
        FAMILY,
        model,
        tiny_data(),
        TrainSettings.create(**settings),
        seed=0,
        out=tmp_path / "m.pt",
        state_dir=tmp_path / "state",
        reference=reference,
    )
    model, reference = tiny_models()
    with pytest.raises(ValueError, match="different run.*lam"):
        train(
            FAMILY,
            model,
            tiny_data(),
            TrainSettings.create(**dict(settings, lam=5.0)),
            seed=0,
            out=tmp_path / "m.pt",
            state_dir=tmp_path / "state",
            reference=reference,
        )


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_saves_the_scaler(tmp_path: Path, precision: str):
    model, reference = tiny_models()
    settings = TrainSettings.create(**dict(SETTINGS, precision=precision, max_steps=2, ckpt_every=2))
    result = train(
        FAMILY,
        model,
        tiny_data(),
        settings,
        seed=0,
        out=tmp_path / "m.pt",
        state_dir=tmp_path / "s",
        reference=reference,
    )
    state = torch.load(tmp_path / "s" / checkpoint.STATE_FILE, weights_only=True)
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(result.metrics["grad_norm"])
    if precision == "fp16":  # GradScaler on, VAR's initial scale, its state in the checkpoint
        assert result.metrics["loss_scale"] == 2.0**11 and state["scaler"]["scale"] == 2.0**11
    else:
        assert "loss_scale" not in result.metrics and state["scaler"] == {}


def test_pretrain_mle_from_scratch_learns(tmp_path: Path):
    """objective "mle": the loss falls on a dataset with one fixed sequence per class."""
    labels = torch.arange(48) % 3
    codes = torch.stack([torch.tensor([1, 5, 9, 13]), torch.tensor([2, 2, 3, 3]), torch.tensor([7, 0, 7, 0])])
    data = TensorDataset(codes[labels], labels)
    model, _ = tiny_models()
    settings = TrainSettings.create(
        objective="mle",
        lr=1e-2,
        global_batch=12,
        max_steps=12,
        precision="fp32",
        class_dropout=0.1,
        dropout=0.0,
        log_every=4,
        ckpt_every=100,
    )
    result = train(FAMILY, model, data, settings, seed=0, out=tmp_path / "m.pt", state_dir=tmp_path / "s")
    assert result.metrics["loss"] < 0.5 * math.log(MODEL_ARGS["vocab_size"])  # last 4 steps vs uniform
    assert not (tmp_path / "s").exists()  # keep_state False: the state goes once the export is written


def test_compiled_block_stack_trains_like_eager(tmp_path: Path):
    """compile: true compiles each transformer block in place (CPU: inductor's C++ backend): the same
    metrics as eager within float32 rounding (no dropout: its random streams differ once compiled), and an
    export with the eager model's parameter names."""
    results = {}
    for compiled in (False, True):
        model, reference = tiny_models()
        overrides = dict(compile=compiled, dropout=0.0, ema=None, max_steps=4)
        settings = TrainSettings.create(**{**SETTINGS, **overrides})
        out = tmp_path / str(compiled) / "model.pt"
        result = train(
            FAMILY,
            model,
            tiny_data(),
            settings,
            seed=7,
            out=out,
            state_dir=out.parent / "s",
            reference=reference,
        )
        results[compiled] = result.metrics, torch.load(out, weights_only=True)["model"]
    (eager, eager_weights), (compiled, compiled_weights) = results[False], results[True]
    for k in ("loss", "grad_norm", "margin"):
        assert compiled[k] == pytest.approx(eager[k], rel=1e-5, abs=1e-6), k
    assert compiled_weights.keys() == eager_weights.keys()


# ------------------------------------------------------------------------------------------------ non-finite


def poisoned(first_step: int, seed: int):
    """Tiny models whose code 15 embeds to NaN, and data that feeds code 15 first at (0-based) step
    ``first_step``, in one image only: steps before it are finite, that step's loss is NaN."""
    data = tiny_data()
    codes = data.tensors[0] % 15  # no 15 anywhere
    batches = list(
        StepSampler(len(codes), global_batch=8, micro_batch=4, rank=0, world_size=1, seed=seed, stop_step=6)
    )
    codes[batches[2 * first_step][0], 0] = 15  # an input position (the last code is only a target)
    model, reference = tiny_models()
    with torch.no_grad():
        for m in (model, reference):
            m.tok_embeddings.weight[15] = float("nan")
    return model, reference, TensorDataset(codes, data.tensors[1])


def test_nonfinite_loss_stops_before_the_update(tmp_path: Path):
    model, reference, data = poisoned(first_step=2, seed=7)
    with pytest.raises(NonFiniteError, match=r"step 3: loss nan.*the checkpoint of step 2 stays"):
        train(
            FAMILY,
            model,
            data,
            TrainSettings.create(**SETTINGS),
            seed=7,
            out=tmp_path / "model.pt",
            state_dir=tmp_path / "state",
            reference=reference,
        )
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "model_ema.pt").exists()
    state = torch.load(tmp_path / "state" / checkpoint.STATE_FILE, weights_only=True)
    assert state["step"] == 2  # the last good step
    weights = state["model"]  # of the TeacherForcing wrapper: "model." + the model's names
    assert all(torch.isfinite(v).all() for k, v in weights.items() if k != "model.tok_embeddings.weight")
    assert torch.isfinite(weights["model.tok_embeddings.weight"][:15]).all()
    assert torch.isfinite(model.output.weight).all()  # the NaN step never reached the weights


def test_skip_nonfinite_skips_the_step_and_finishes(tmp_path: Path):
    model, reference, data = poisoned(first_step=2, seed=7)
    result = train(
        FAMILY,
        model,
        data,
        TrainSettings.create(**dict(SETTINGS, skip_nonfinite=True)),
        seed=7,
        out=tmp_path / "model.pt",
        state_dir=tmp_path / "state",
        reference=reference,
    )
    assert result.steps == 6 and result.metrics["skipped_steps"] == 1
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(result.metrics["grad_norm"])
    exported = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    assert torch.isfinite(exported["output.weight"]).all()


def test_fp16_overflow_is_the_scalers_business():
    loss, inf = torch.tensor(0.7), torch.tensor(float("inf"))
    assert _finite(loss, inf, scaled=True)  # the GradScaler skips that step and lowers its scale
    assert not _finite(loss, inf, scaled=False)
    assert not _finite(torch.tensor(float("nan")), torch.tensor(1.0), scaled=True)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "data", "match"),
    [
        (dict(objective="ppo"), None, "unknown objective 'ppo'"),
        (dict(lam=-1.0), None, "lambda must be >= 0"),
        ({}, TensorDataset(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long)), "empty"),
        ({}, TensorDataset(torch.full((16, 4), 20), torch.zeros(16, dtype=torch.long)), "vocabulary of 16"),
        (
            {},
            TensorDataset(torch.zeros(16, 9, dtype=torch.long), torch.zeros(16, dtype=torch.long)),
            r"\(4,\)",
        ),
    ],
    ids=["objective", "lambda", "empty", "vocab", "seq_len"],
)
def test_bad_input_is_one_clear_error(tmp_path: Path, kwargs, data, match):
    model, reference = tiny_models()
    with pytest.raises(ValueError, match=match):
        settings = TrainSettings.create(**dict(SETTINGS, **kwargs))
        train(
            FAMILY,
            model,
            data if data is not None else tiny_data(),
            settings,
            seed=0,
            out=tmp_path / "m.pt",
            state_dir=tmp_path / "s",
            reference=reference,
        )


def test_cache_manifest_mismatch_is_refused(tmp_path: Path):
    class Cache(TensorDataset):
        vocab_size, seq_len, num_classes = 32, 4, 3  # the cache's manifest says another tokenizer

    model, reference = tiny_models()
    with pytest.raises(ValueError, match="vocab_size = 32 does not match the model's vocab_size = 16"):
        train(
            FAMILY,
            model,
            Cache(*tiny_data().tensors),
            TrainSettings.create(**SETTINGS),
            seed=0,
            out=tmp_path / "m.pt",
            state_dir=tmp_path / "s",
            reference=reference,
        )


# ------------------------------------------------------------------------------------------------ pieces


def test_sampler_micro_batches_do_not_depend_on_world_size():
    kw = dict(global_batch=12, micro_batch=3, seed=5, start_step=0, stop_step=7)
    one = list(StepSampler(40, rank=0, world_size=1, **kw))  # 4 micro-batches per step
    two = [list(StepSampler(40, rank=r, world_size=2, **kw)) for r in range(2)]  # 2 each
    for step in range(7):
        assert one[4 * step : 4 * step + 2] == two[0][2 * step : 2 * step + 2]
        assert one[4 * step + 2 : 4 * step + 4] == two[1][2 * step : 2 * step + 2]
    flat = [i for mb in one[:12] for i in mb]  # epoch 0 = steps 0..2: a permutation prefix, no repeats
    assert len(set(flat)) == len(flat) == 36
    resumed = list(StepSampler(40, rank=0, world_size=1, **dict(kw, start_step=4)))
    assert resumed == one[16:]


def test_lr_and_weight_decay_schedules():
    # LlamaGen: constant; VAR 'lin0': warm-up from wp0, hold, then linear to wpe at the last step
    assert [lr_factor(s, 100, warmup=0, warmup_start=0.005, lr_end=1.0) for s in (0, 50, 99)] == [1.0] * 3
    f = [lr_factor(s, 100, warmup=10, warmup_start=0.005, lr_end=0.01) for s in range(100)]
    assert f[0] == 0.005 and f[5] == pytest.approx(0.005 + 0.995 * 0.5) and f[10] == 1.0
    assert f[10 + int(LR_HOLD * 89)] == 1.0 and f[99] == pytest.approx(0.01) and f[60] > f[80] > f[99]
    assert weight_decay_at(0, 100, 0.05, None) == 0.05 == weight_decay_at(99, 100, 0.05, None)
    assert weight_decay_at(0, 100, 0.05, 0.08) == pytest.approx(0.05)
    assert weight_decay_at(99, 100, 0.05, 0.08) == pytest.approx(0.08)


def test_no_decay_groups_follow_the_official_rules():
    model, _ = tiny_models()
    names = no_decay_names(model, get_family("llamagen").no_decay_keys)
    assert names == {n for n, p in model.named_parameters() if p.ndim < 2}  # the RMSNorm weights
    assert "norm.weight" in names and "tok_embeddings.weight" not in names
    var = get_family("var").build_model(dict(depth=2, V=16, Cvae=4, num_classes=3, patch_nums=[1, 2]))
    names = no_decay_names(var, get_family("var").no_decay_keys)
    for n, p in var.named_parameters():
        exempt = (
            p.ndim < 2
            or n.endswith("bias")
            or any(k in n for k in ("pos_1LC", "pos_start", "lvl_embed", "scale_mul"))
        )
        assert (n in names) == exempt, n
    assert {"pos_1LC", "lvl_embed.weight"} <= names
