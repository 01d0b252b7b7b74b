"""The chassis: config validation, CLI, MLflow tracking with lineage, atomic writes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ccalign.config import ConfigError, config_hash, load_config
from ccalign.io import atomic_dir, atomic_write, load_torch, remove_stale_temps, sha256_file
from ccalign.tracking import flatten, stage_run

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "config" / "config.yaml"


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _base() -> dict:
    return yaml.safe_load(DEFAULT.read_text())


def test_default_and_paper_configs_validate():
    for name in ("config.yaml", "paper.yaml"):
        path = ROOT / "config" / name
        if name == "paper.yaml" and not path.exists():
            continue
        cfg = load_config(path)
        assert cfg["data_root"] == "data"  # default filled in from the schema
        assert cfg["sample"]["per_class"] >= 1


def test_wrong_type_names_key_and_file(tmp_path):
    cfg = _base()
    cfg["dataset"]["num_classes"] = "ten"
    path = _write(tmp_path, cfg)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "dataset.num_classes" in str(e.value) and str(path) in str(e.value)
    assert "integer" in str(e.value)


def test_unknown_key_is_named(tmp_path):
    cfg = _base()
    cfg["finetune"]["learning_rate"] = 1e-5
    with pytest.raises(ConfigError, match="unknown key 'learning_rate' under finetune"):
        load_config(_write(tmp_path, cfg))


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(DEFAULT, ["sample.per_class"])
    with pytest.raises(ConfigError, match="sample.per_class"):
        load_config(DEFAULT, ["sample.per_class=-3"])


def test_overrides_apply_and_change_hash():
    a = load_config(DEFAULT)
    b = load_config(DEFAULT, ["finetune.lr=7e-5"])
    assert b["finetune"]["lr"] == pytest.approx(7e-5)
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(load_config(DEFAULT))


def test_each_model_gets_its_resolved_sections():
    cfg = load_config(
        DEFAULT, ["models.llamagen_tiny.finetune.lr=0.5", "finetune.model_args={token_dropout_p: 0.2}"]
    )
    s = cfg["models"]["llamagen_tiny"]["finetune"]
    assert s["lr"] == 0.5 and s["beta"] == cfg["finetune"]["beta"]  # the model's own, then the top level
    assert s["model_args"] == {"class_dropout_prob": 1e-5, "token_dropout_p": 0.2}  # mappings merge by key
    assert s["grad_clip"] == 1.0 and s["micro_batch"] is None  # then the schema's defaults
    assert cfg["models"]["var_tiny"]["finetune"]["lr"] == cfg["finetune"]["lr"]
    assert cfg["models"]["var_tiny"]["sample"]["per_class"] == cfg["sample"]["per_class"]


def test_cli_help():
    for argv in (["ccalign", "--help"], [sys.executable, "-m", "ccalign", "--help"]):
        exe = argv if argv[0] != "ccalign" else [str(Path(sys.executable).parent / "ccalign"), "--help"]
        out = subprocess.run(exe, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "stage" in out.stdout


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_stage_run_records_lineage(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = load_config(DEFAULT, [f"data_root={tmp_path}", "tracking.defer=false"])
    inp = tmp_path / "input.bin"
    inp.write_bytes(b"abc")
    art = tmp_path / "artifact.txt"
    art.write_text("hello")
    labels = {"family": "llamagen", "model": "llamagen_tiny", "seed": "0", "objective": "cca", "lambda": "1"}
    with stage_run(cfg, "finetune", labels, tags={"extra": "x"}, inputs={"base": inp}) as run:
        run.log_metrics({"loss": 1.5}, step=1)
        run.log_metrics({"loss": 1.0}, step=2)
        run.log_artifact(art)
    uri = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    client, runs = _runs(uri, cfg["experiment"])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    tags = r.data.tags
    assert {k: tags[k] for k in labels} == labels and tags["stage"] == "finetune" and tags["extra"] == "x"
    assert r.info.run_name == "finetune · llamagen_tiny · cca λ=1 · seed 0"
    assert tags["slurm.job_id"] == "4242"
    assert tags["ccalign.config_hash"] == config_hash(cfg)
    assert tags["input.base.sha256"] == sha256_file(inp)
    assert "git.commit" in tags or not (ROOT / ".git").exists()
    assert r.data.params["finetune.beta"] == str(cfg["finetune"]["beta"])
    assert [m.value for m in client.get_metric_history(r.info.run_id, "loss")] == [1.5, 1.0]
    assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["artifact.txt"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_buffers_then_replays(tmp_path):
    overrides = [
        f"data_root={tmp_path}",
        f"tracking.uri=http://127.0.0.1:{_closed_port()}",
        "tracking.defer=false",
    ]
    cfg = load_config(DEFAULT, overrides)
    t0 = time.time()
    with stage_run(cfg, "sample", {}) as run:
        run.log_metrics({"images_per_s": 12.0})
    assert time.time() - t0 < 60
    pending = list((tmp_path / "mlflow" / "pending").glob("*.json"))
    assert len(pending) == 1 and "images_per_s" in pending[0].read_text()
    # The next stage that reaches a store replays the buffered run.
    cfg["tracking"]["uri"] = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    with stage_run(cfg, "evaluate", {}):
        pass
    assert not list((tmp_path / "mlflow" / "pending").glob("*.json"))
    client, runs = _runs(cfg["tracking"]["uri"], cfg["experiment"])
    stages = sorted(r.data.tags["stage"] for r in runs)
    assert stages == ["evaluate", "sample"]
    replayed = next(r for r in runs if r.data.tags["stage"] == "sample")
    assert replayed.data.metrics["images_per_s"] == 12.0


_DEFERRED_STAGE = """
import sys, time
from ccalign.config import load_config
from ccalign.tracking import stage_run
cfg = load_config(sys.argv[1], [f"data_root={sys.argv[2]}", "tracking.defer=true"])
with stage_run(cfg, sys.argv[3], {}) as run:
    run.log_metrics({"loss": 2.0}, step=1)
    time.sleep(0.05)
assert not any(m == "mlflow" or m.startswith("mlflow.") for m in sys.modules), "MLflow was imported"
"""


def test_deferred_runs_skip_mlflow_and_the_sender_keeps_their_times(tmp_path):
    for stage in ("pretrain", "sample"):
        subprocess.run(
            [sys.executable, "-c", _DEFERRED_STAGE, str(DEFAULT), str(tmp_path), stage],
            check=True,
            cwd=ROOT,
            timeout=120,
        )
    pending = sorted((tmp_path / "mlflow" / "pending").glob("*.json"))
    assert len(pending) == 2 and not (tmp_path / "mlflow" / "mlflow.db").exists()
    records = {json.loads(p.read_text())["tags"]["stage"]: json.loads(p.read_text()) for p in pending}
    # a record another process has claimed (renamed) is left to it
    claimed = pending[0].with_suffix(".sending-1")
    pending[0].rename(claimed)
    cfg = load_config(DEFAULT, [f"data_root={tmp_path}"])
    with stage_run(cfg, "report", {}, defer=False):
        pass
    client, runs = _runs(f"sqlite:///{tmp_path}/mlflow/mlflow.db", cfg["experiment"])
    assert len(runs) == 2 and claimed.exists()
    claimed.rename(pending[0])
    with stage_run(cfg, "report", {}, defer=False):
        pass
    client, runs = _runs(f"sqlite:///{tmp_path}/mlflow/mlflow.db", cfg["experiment"])
    assert sorted(r.data.tags["stage"] for r in runs) == ["pretrain", "report", "report", "sample"]
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert not list((tmp_path / "mlflow" / "pending").glob("*"))
    for stage, rec in records.items():
        run = by_stage[stage]
        assert run.info.status == "FINISHED" and run.data.tags["ccalign.replayed"] == "true"
        assert (run.info.start_time, run.info.end_time) == (rec["start_ms"], rec["end_ms"])
        assert rec["end_ms"] - rec["start_ms"] >= 50
        assert run.data.metrics["loss"] == 2.0


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


_WRITER = """
import sys, time
from ccalign.io import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write(b"x" * 1024)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_atomic_write_survives_sigkill(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"old"  # the old content, never a partial file
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "bad.bin") as f:
        f.write(b"partial")
        raise RuntimeError("writer crashed")
    assert not (tmp_path / "bad.bin").exists()
    # The SIGKILLed writer's temp file is the only leftover, and a resuming stage sweeps it.
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    d = tmp_path / "cache"
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
    assert (d / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(d) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("crash")
    assert sorted(p.name for p in d.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


class Evil:
    """Any non-tensor class: a weights-only load must refuse it."""


def test_load_torch_is_weights_only(tmp_path):
    import torch

    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)
    with pytest.raises(ValueError, match="evil.pt"):
        load_torch(p)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_torch(tmp_path / "missing.pt")
