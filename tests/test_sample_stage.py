"""The sample stage end to end on tiny random models: determinism across world and batch sizes, resume after
SIGKILL, corrupt shards, class balance, the grid and throughput records, and clear errors."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import BASE_TARGET, run_stage

import ccalign.sample.run as sample_run
import ccalign.sample.shards as sample_shards
import ccalign.tracking as tracking
from ccalign.config import ConfigError, resolve
from ccalign.families import get_family
from ccalign.io import atomic_save_torch
from ccalign.sample.generate import SampleSpec, generate_batch

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"  # tiny valid constructor arguments of each family

# Runs the stage as the CLI does, minus MLflow (covered by the foundation tests; slow to start).
# With a delay argument, each shard write waits that long (so a test can kill the run mid-way).
DRIVER = """
import contextlib, json, sys, time
import ccalign.sample.run as run
import ccalign.tracking as tracking
from ccalign.config import resolve
from testkit import run_stage
tracking.stage_run = lambda *a, **k: contextlib.nullcontext(tracking._NullRun())
write, delay = run.write_shard, float(sys.argv.pop(1))
run.write_shard = lambda *a: (time.sleep(delay), write(*a))
run_stage("sample", resolve(json.load(open(sys.argv[1]))), *sys.argv[2:])
"""


def tiny_args(family_name: str) -> tuple[dict, dict]:
    """(model args, tokenizer args) of the family's golden fixture set."""
    g = json.loads((GOLDEN / family_name / "config.json").read_text())
    if family_name == "llamagen":
        return g["gpt_model_args"], {**g["vq_model_args"], "ch": g["vq_encoder_decoder_ch"]}
    kwargs = g["build_vae_var_kwargs"]
    tokenizer = {k: v for k, v in g["derived"]["vqvae"].items() if k != "test_mode"}
    return {**g["derived"]["var"], "V": kwargs["V"], "Cvae": kwargs["Cvae"]}, tokenizer


def tiny_models(family_name: str):
    """Random tiny model and tokenizer; weights perturbed so that samples depend on label and noise."""
    torch.manual_seed(0)  # the builders initialise from the global generator
    family = get_family(family_name)
    model_args, tokenizer_args = tiny_args(family_name)
    model, tokenizer = family.build_model(model_args), family.build_tokenizer(tokenizer_args)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # LlamaGen's output layer starts at zero
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return family, model.eval(), tokenizer.eval()


def make_setup(name: str, root: Path, per_class: int) -> dict:
    """Checkpoints of one family on disk and a config naming them (shards of 3, batch 4)."""
    family, model, tokenizer = tiny_models(name)
    family.save_model(model, root / "model.pt")
    tokenizer_state = tokenizer.state_dict()
    atomic_save_torch({"model": tokenizer_state} if name == "llamagen" else tokenizer_state, root / "tok.pt")
    model_args, tokenizer_args = tiny_args(name)
    num_classes = family.num_classes(model)
    cfg = {
        "experiment": "test-sample",
        "data_root": str(root),
        "dataset": {"name": "tiny", "source": "sklearn_digits", "num_classes": num_classes, "image_size": 8},
        "tokenizers": {"tok": {"family": name, "args": tokenizer_args}},
        "models": {"tiny": {"family": name, "tokenizer": "tok", "args": model_args, "sample": {"top_k": 16}}},
        "targets": BASE_TARGET,
        "sample": {"per_class": per_class, "batch_size": 4, "shard_size": 3, "seed": 5, "precision": "fp32"},
    }
    guidance = {"llamagen": 2.0, "var": 1.5}[name]
    return {"name": name, "root": root, "cfg": cfg, "guidance": guidance, "num_classes": num_classes}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup("llamagen", tmp_path_factory.mktemp("llamagen"), per_class=2)


def argv(setup: dict, out: Path, *extra: str) -> list[str]:
    root = setup["root"]
    return [
        "--model",
        "tiny",
        "--checkpoint",
        str(root / "model.pt"),
        "--tokenizer",
        str(root / "tok.pt"),
        "--guidance",
        str(setup["guidance"]),
        "--out",
        str(out),
        *extra,
    ]


class Recorder:
    """Stands in for the MLflow run: keeps what the stage logs."""

    def __init__(self):
        self.metrics, self.artifacts = {}, []

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(Path(path))


def run_inproc(cfg: dict, args: list[str], monkeypatch) -> Recorder:
    rec = Recorder()

    @contextmanager
    def fake_stage_run(*a, **k):
        yield rec

    monkeypatch.setattr(tracking, "stage_run", fake_stage_run)
    run_stage("sample", resolve(copy.deepcopy(cfg)), *args)
    return rec


def spawn(
    cfg: dict, args: list[str], tmp: Path, rank: int = 0, world_size: int = 1, port: int = 0, delay: float = 0
) -> subprocess.Popen:
    cfg_path = tmp / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parent),
    }
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(delay), str(cfg_path), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["arr_0"], data["labels"]


def count_writes(monkeypatch) -> list[int]:
    written = []
    real = sample_run.write_shard

    def counting(shard_dir, shard, *a):
        written.append(shard.index)
        real(shard_dir, shard, *a)

    monkeypatch.setattr(sample_run, "write_shard", counting)
    return written


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted single-process run (batch 4); its output and what it logged."""
    out = setup["root"] / "ref" / "samples.npz"
    with pytest.MonkeyPatch.context() as mp:
        rec = run_inproc(setup["cfg"], argv(setup, out), mp)
    return {"out": out, "rec": rec, "arrays": load(out)}


def test_class_balanced_adm_npz_grid_and_throughput(setup, reference):
    arr, labels = reference["arrays"]
    n, per_class = setup["num_classes"] * 2, 2
    assert arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[0] == n and arr.shape[3] == 3
    assert labels.tolist() == [i // per_class for i in range(n)]
    assert len({arr[i].tobytes() for i in range(n)}) == n  # no duplicated images from a reused seed
    out = reference["out"]
    assert not out.with_name("samples.shards").exists()  # shards are removed once merged
    # no throughput file: timings go to the log and MLflow, never into outputs
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid.png", "samples.npz"]
    grid = Image.open(out.with_name("grid.png"))
    rows, cols, side = min(8, setup["num_classes"]), per_class, max(arr.shape[1], 64)
    assert grid.size == (cols * (side + 2) + 2, rows * (side + 2) + 2)
    rec = reference["rec"]
    assert rec.artifacts == [out.with_name("grid.png")]
    assert rec.metrics["images"] == n and rec.metrics["images_per_s"] > 0
    assert rec.metrics["s_per_image"] == pytest.approx(1 / rec.metrics["images_per_s"])


def test_a_sample_does_not_depend_on_its_batch():
    family, model, tokenizer = tiny_models("llamagen")
    spec = SampleSpec(
        family="llamagen",
        num_classes=family.num_classes(model),
        per_class=2,
        seed=3,
        guidance=2.0,
        sampling=dict(family.default_sampling),
    )
    together = generate_batch(family, model, tokenizer, spec, range(2, 6), "cpu")
    split = [generate_batch(family, model, tokenizer, spec, idx, "cpu") for idx in (range(2, 4), [4], [5])]
    assert np.array_equal(together, np.concatenate(split))
    other_seed = generate_batch(family, model, tokenizer, replace(spec, seed=4), range(2, 6), "cpu")
    assert not np.array_equal(other_seed, together)


def test_var_stage_equals_one_batch_generation(tmp_path, monkeypatch):
    var = make_setup("var", tmp_path, per_class=1)
    out = tmp_path / "samples.npz"
    run_inproc(var["cfg"], argv(var, out), monkeypatch)
    arr, labels = load(out)
    family = get_family("var")
    model_args, tokenizer_args = tiny_args("var")
    model = family.load_model(tmp_path / "model.pt", model_args)
    tokenizer = family.load_tokenizer(tmp_path / "tok.pt", tokenizer_args)
    sampling = {**family.default_sampling, "top_k": 16}
    spec = SampleSpec(
        family="var",
        num_classes=var["num_classes"],
        per_class=1,
        seed=5,
        guidance=var["guidance"],
        sampling=sampling,
    )
    direct = generate_batch(family, model, tokenizer, spec, range(var["num_classes"]), "cpu")  # one batch
    assert arr.shape == direct.shape and arr.shape[0] == var["num_classes"]
    assert np.array_equal(arr, direct) and labels.tolist() == list(range(var["num_classes"]))


def test_two_processes_with_batch_3_match_one_process_with_batch_4(setup, reference, tmp_path):
    cfg = copy.deepcopy(setup["cfg"])
    cfg["sample"]["batch_size"] = 3
    out = tmp_path / "samples.npz"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [spawn(cfg, argv(setup, out), tmp_path, rank, 2, port) for rank in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    rank1 = len(range(1, len(range(0, setup["num_classes"] * 2, 3)), 2))  # shards 1, 3, 5, ...
    assert f"{rank1} of {rank1} shards to generate" in logs[1]
    arr, labels = load(out)
    assert np.array_equal(arr, reference["arrays"][0]) and np.array_equal(labels, reference["arrays"][1])


def test_batch_size_auto_picks_a_batch_on_cpu_and_gives_the_same_samples(
    setup, reference, tmp_path, monkeypatch
):
    cfg = copy.deepcopy(setup["cfg"])
    cfg["sample"]["batch_size"] = "auto"
    out = tmp_path / "samples.npz"
    chosen, auto = [], sample_run.auto_batch_size
    monkeypatch.setattr(
        sample_run, "auto_batch_size", lambda *a, **k: chosen.append(auto(*a, **k)) or chosen[-1]
    )
    run_inproc(cfg, argv(setup, out), monkeypatch)
    assert chosen == [3]  # once per job; one batch per shard of 3
    arr, labels = load(out)
    assert np.array_equal(arr, reference["arrays"][0]) and np.array_equal(labels, reference["arrays"][1])


def test_resume_after_sigkill_equals_uninterrupted_run(setup, reference, tmp_path, monkeypatch):
    out = tmp_path / "samples.npz"
    shard_dir = tmp_path / "samples.shards"
    proc = spawn(setup["cfg"], argv(setup, out), tmp_path, delay=0.3)
    deadline = time.time() + 120
    while not (shard_dir / "shard-00000.json").exists():
        assert proc.poll() is None and time.time() < deadline, "first shard never appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    num_shards = len(range(0, setup["num_classes"] * 2, 3))
    done = len(list(shard_dir.glob("shard-*.json")))
    assert 1 <= done < num_shards  # killed mid-run

    written = count_writes(monkeypatch)
    run_inproc(setup["cfg"], argv(setup, out), monkeypatch)
    assert len(written) == num_shards - done and len(set(written)) == len(written)  # finished shards kept
    arr, labels = load(out)
    assert np.array_equal(arr, reference["arrays"][0]) and np.array_equal(labels, reference["arrays"][1])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_or_incomplete_shards_are_redone(setup, reference, tmp_path, monkeypatch):
    out = tmp_path / "samples.npz"
    shard_dir = tmp_path / "samples.shards"

    def stop(*a, **k):
        raise RuntimeError("stopped before the merge")

    with monkeypatch.context() as mp:  # leave every shard on disk
        mp.setattr(sample_shards, "merge_shards", stop)
        with pytest.raises(RuntimeError, match="stopped"):
            run_inproc(setup["cfg"], argv(setup, out), mp)
    npz1 = shard_dir / "shard-00001.npz"
    data = bytearray(npz1.read_bytes())
    data[len(data) // 2] ^= 0x01  # bit rot: same size, other content
    npz1.write_bytes(bytes(data))
    npz2 = shard_dir / "shard-00002.npz"
    npz2.write_bytes(npz2.read_bytes()[:-100])  # truncated
    (shard_dir / "shard-00003.json").unlink()  # killed between the npz and its record
    (shard_dir / "shard-00004.json").write_text('{"start": 12')  # unreadable record

    written = count_writes(monkeypatch)
    run_inproc(setup["cfg"], argv(setup, out), monkeypatch)
    assert sorted(written) == [1, 2, 3, 4]
    assert np.array_equal(load(out)[0], reference["arrays"][0])


def test_per_class_flag_and_resize(setup, tmp_path, monkeypatch):
    cfg = copy.deepcopy(setup["cfg"])
    cfg["models"]["tiny"]["sample"]["resize_to"] = 4
    out = tmp_path / "samples.npz"
    run_inproc(cfg, argv(setup, out, "--per-class", "1", "--seed", "9"), monkeypatch)
    arr, labels = load(out)
    assert arr.shape == (setup["num_classes"], 4, 4, 3) and labels.tolist() == list(
        range(setup["num_classes"])
    )


def test_clear_errors(setup, tmp_path, monkeypatch):
    out = tmp_path / "samples.npz"
    args = argv(setup, out)
    with pytest.raises(ConfigError, match=r"model 'nope' is not in the config's models: \['tiny'\]"):
        run_inproc(setup["cfg"], ["--model", "nope", *args[2:]], monkeypatch)
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: {missing}"):
        run_inproc(setup["cfg"], [*args[:2], "--checkpoint", str(missing), *args[4:]], monkeypatch)
    with pytest.raises(FileNotFoundError, match=f"tokenizer checkpoint not found: {missing}"):
        run_inproc(setup["cfg"], [*args[:4], "--tokenizer", str(missing), *args[6:]], monkeypatch)
    assert not out.exists()
