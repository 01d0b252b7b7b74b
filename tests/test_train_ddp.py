"""Two CPU processes under torchrun (gloo) train like one process with the same global batch.

One process runs micro-batches of 4 with accumulation 2; two processes run one micro-batch of 4 each, so
every micro-batch, its negatives and its uncond mask are the same (StepSampler, micro_batch_generator), and
DDP's gradient average equals the accumulated mean. Only the float summation order may differ: weights and
Adam moments must agree to atol 1e-6 (on the 2-core CI CPU they are bit-identical). FSDP (FULL_SHARD) is held
to the same tolerance, its saved optimizer state included (on CPU, torch once returned every Adam moment as
the last one gathered: the resume then diverged).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from ccalign.train import checkpoint

ROOT = Path(__file__).resolve().parent.parent
CHILD = textwrap.dedent("""
    import os, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_train_loop import FAMILY, MODEL_ARGS, tiny_data
    from ccalign.train.loop import train
    from ccalign.train.settings import TrainSettings

    # no dropout and (almost) no class dropout: the processes' own RNG streams must not matter
    args = dict(MODEL_ARGS, class_dropout_prob=1e-5, token_dropout_p=0.0, resid_dropout_p=0.0,
                ffn_dropout_p=0.0)
    settings = dict(objective="cca", lam=3.0, beta=0.5, uncond_ratio=0.5, lr=3e-3, global_batch=8,
                    micro_batch=4, max_steps=4, precision="fp32", log_every=2, ckpt_every=100,
                    keep_state=True)
    for mode in sys.argv[2:]:
        torch.manual_seed(0)
        model = FAMILY.build_model(args)
        reference = FAMILY.build_model(args)
        reference.load_state_dict(model.state_dict())
        out = os.path.join(sys.argv[1], mode, "model.pt")
        run = TrainSettings.create(**settings, fsdp=mode == "fsdp")
        train(FAMILY, model, tiny_data(), run, seed=3, out=out,
              state_dir=os.path.join(sys.argv[1], mode, "state"), reference=reference)
""")


def test_two_processes_match_one(tmp_path: Path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(ROOT / "tests")))
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    multi = subprocess.Popen(
        [*torchrun, str(script), str(tmp_path), "ddp", "fsdp"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "single"],
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
    )
    _, err = multi.communicate(timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert multi.returncode == 0, err[-3000:]

    state = {
        m: torch.load(tmp_path / m / "state" / checkpoint.STATE_FILE, weights_only=True)
        for m in ("single", "ddp", "fsdp")
    }
    one = state["single"]
    assert len(one["rng"]) == 1 and len(state["ddp"]["rng"]) == 2
    for mode in ("ddp", "fsdp"):
        other = state[mode]
        assert other["step"] == one["step"] == 4
        for name, t in one["model"].items():
            assert (other["model"][name] - t).abs().max() <= 1e-6, f"{mode} {name}"
        exported = torch.load(tmp_path / mode / "model.pt", weights_only=True)["model"]
        for name, t in torch.load(tmp_path / "single" / "model.pt", weights_only=True)["model"].items():
            torch.testing.assert_close(exported[name], t, atol=1e-6, rtol=0)
    # DDP keeps the single-process optimizer layout: compare Adam's moments directly
    for i, s in one["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state["ddp"]["optimizer"]["state"][i][k], s[k], atol=1e-6, rtol=1e-4)
    # FSDP's full optimizer state names parameters, in the same group order: what a resume loads
    fsdp_optim = state["fsdp"]["optimizer"]
    for group, fsdp_group in zip(one["optimizer"]["param_groups"], fsdp_optim["param_groups"], strict=True):
        for i, name in zip(group["params"], fsdp_group["params"], strict=True):
            for k in ("exp_avg", "exp_avg_sq"):
                got = fsdp_optim["state"][name][k].reshape(one["optimizer"]["state"][i][k].shape)
                torch.testing.assert_close(
                    got, one["optimizer"]["state"][i][k], atol=1e-6, rtol=1e-4, msg=name
                )
    assert one["model"]["model.tok_embeddings.weight"].abs().sum() > 0
