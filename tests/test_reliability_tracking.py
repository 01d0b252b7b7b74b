"""MLflow tracking under faults: a replay killed mid-send or failing, a record that cannot be written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import ROOT, SMOKE

from ccalign import tracking
from ccalign.config import load_config
from ccalign.tracking import replay_pending, stage_run

# Replays the pending records of a config, announcing the send and then hanging in it (to be SIGKILLed).
HANGING_REPLAY = """
import json, sys, time
from ccalign import tracking
def hang(*args):
    print("sending", flush=True)
    time.sleep(120)
tracking._log_metrics = hang
tracking.replay_pending(json.loads(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite tracking store for the module (creating its tables takes seconds)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def config(tmp_path: Path, store: str) -> dict:
    experiment = f"reliability-{tmp_path.name}"
    return load_config(SMOKE, [f"data_root={tmp_path}", f"tracking.uri={store}", f"experiment={experiment}"])


def buffered_run(cfg: dict) -> Path:
    """A stage recorded offline (deferred): its pending record."""
    with stage_run(cfg, "sample", {}, defer=True) as run:
        run.log_metrics({"images_per_s": 3.0})
    (path,) = (Path(cfg["data_root"]) / "mlflow" / "pending").glob("*.json")
    return path


def runs(cfg: dict) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg["tracking"]["uri"])
    exp = client.get_experiment_by_name(cfg["experiment"])
    return client.search_runs([exp.experiment_id]) if exp else []


def test_a_replay_killed_mid_send_is_reclaimed_and_its_run_closed(tmp_path, store):
    cfg = config(tmp_path, store)
    record = buffered_run(cfg)
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_REPLAY, json.dumps(cfg)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        assert proc.stdout.readline() == "sending\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stranded = record.with_name(f"{record.stem}.sending-{proc.pid}@{socket.gethostname()}")
    assert stranded.exists() and not record.exists()
    (opened,) = runs(cfg)
    assert opened.info.status == "RUNNING"  # what the killed replay left on the server

    assert replay_pending(cfg) == 1
    assert list(record.parent.iterdir()) == []
    by_status = {r.info.status: r for r in runs(cfg)}
    assert sorted(by_status) == ["FINISHED", "KILLED"]
    assert by_status["KILLED"].info.run_id == opened.info.run_id
    assert by_status["KILLED"].data.tags["ccalign.replayed_as"] == by_status["FINISHED"].info.run_id
    assert by_status["FINISHED"].data.metrics["images_per_s"] == 3.0


def test_a_claim_of_a_live_process_is_left_alone(tmp_path, store, monkeypatch):
    cfg = config(tmp_path, store)
    record = buffered_run(cfg)
    mine = record.with_name(f"{record.stem}.sending-{os.getpid()}@{socket.gethostname()}")
    record.rename(mine)
    assert replay_pending(cfg) == 0 and mine.exists()
    foreign = mine.with_name(f"{record.stem}.sending-{os.getpid()}@another-node")
    mine.rename(foreign)
    assert replay_pending(cfg) == 0 and foreign.exists()  # another host's claim: a live sender may hold it
    monkeypatch.setattr(tracking, "_FOREIGN_CLAIM_S", -1)  # ... until it is older than this
    assert replay_pending(cfg) == 1 and not foreign.exists()


def test_a_failed_replay_closes_the_run_it_opened_and_the_next_one_sends(tmp_path, store, monkeypatch):
    cfg = config(tmp_path, store)
    record = buffered_run(cfg)

    def broken(*args):
        raise ConnectionError("server went away")

    with monkeypatch.context() as m:
        m.setattr(tracking, "_log_metrics", broken)
        assert replay_pending(cfg) == 0
    (failed,) = runs(cfg)
    assert failed.info.status == "FAILED"
    assert json.loads(record.read_text())["replay_run_ids"] == [failed.info.run_id]
    assert replay_pending(cfg) == 1
    statuses = sorted(r.info.status for r in runs(cfg))
    assert statuses == ["FINISHED", "KILLED"]


def test_a_record_that_cannot_be_written_does_not_fail_the_stage(tmp_path, store):
    cfg = config(tmp_path, store)
    (tmp_path / "mlflow").write_text("a file where the pending folder should be")
    with stage_run(cfg, "evaluate", {}, defer=True) as run:
        run.log_metrics({"fid": 1.0})
    # and a stage that fails still reports its own error, not tracking's
    with pytest.raises(KeyError, match="the stage's own"), stage_run(cfg, "evaluate", {}, defer=True):
        raise KeyError("the stage's own")
