"""What stages write: byte-identical for identical inputs, the umask's permissions, one writer per output."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import (
    CACHE,
    CLASSIFIER,
    FINETUNED,
    METRICS,
    ROOT,
    SAMPLES,
    SMOKE_CHAIN,
    error_lines,
    run_cli_jobs,
    sample_argv,
)

import ccalign.io as io_module
from ccalign.errors import OutputBusyError
from ccalign.io import atomic_dir, atomic_save_torch, atomic_write, atomic_write_json, output_lock


def digests(root: Path) -> dict[str, str]:
    """sha256 of every output file under ``root``; not the buffered MLflow records nor the sample stage's
    throughput sidecar (telemetry, on its way out of the artifacts)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "mlflow" not in p.parts
    }


def test_two_runs_of_the_chain_write_identical_bytes(smoke_run, tmp_path):
    first, _ = smoke_run
    results = run_cli_jobs(SMOKE_CHAIN, tmp_path / "again", umask=0o027)
    assert all(r["rc"] == 0 for r in results.values()), results
    a, b = digests(first), digests(tmp_path / "again")
    assert len(a) > 100 and {CLASSIFIER, METRICS, FINETUNED, SAMPLES, f"{CACHE}/manifest.json"} <= a.keys()
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_outputs_get_the_umask_permissions(smoke_run):
    root, _ = smoke_run
    files = [p for p in (root / "data").rglob("*") if p.is_file()]
    dirs = [p for p in (root / "data").rglob("*") if p.is_dir()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o640}  # group-readable under umask 027
    assert {stat.S_IMODE(p.stat().st_mode) for p in dirs} == {0o750}
    assert not [p for p in root.rglob("*") if p.name.endswith((".tmp", ".lock"))]


@pytest.mark.parametrize("umask", [0o027, 0o002, 0o077])
def test_atomic_writers_create_files_with_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "raw.bin") as f:
            f.write(b"x")
        atomic_write_json({"a": 1}, tmp_path / "a.json")
        atomic_save_torch({"w": torch.zeros(3)}, tmp_path / "w.pt")
        with atomic_dir(tmp_path / "folder") as d:
            (d / "inside.txt").write_text("y")
    finally:
        os.umask(old)
    for name in ("raw.bin", "a.json", "w.pt", "folder/inside.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o777 & ~umask


# ------------------------------------------------------------------------------------ one writer per output

HOLD = """
import sys, time
from ccalign.io import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def hold_lock(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def test_output_lock_names_a_live_holder_and_dies_with_it(tmp_path):
    out = tmp_path / "model.pt"
    proc = hold_lock(out)
    try:
        with (
            pytest.raises(OutputBusyError, match=f"pid {proc.pid} on host {socket.gethostname()}"),
            output_lock(out),
        ):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with output_lock(out):  # the kernel released the killed holder's lock
        assert (tmp_path / ".model.pt.lock").exists()
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock


def test_output_lock_can_wait_for_the_holder(tmp_path):
    out, order = tmp_path / "x", []

    def second():
        with output_lock(out, wait=True):
            order.append("second")

    with output_lock(out):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)
        order.append("first released")
    waiter.join(timeout=10)
    assert order == ["first released", "second"]


def test_output_lock_on_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    warnings = []
    monkeypatch.setattr(io_module.log, "warning", lambda msg, *args: warnings.append(msg % args))
    with output_lock(tmp_path / "out.npz"):
        ran = True
    assert ran and len(warnings) == 1 and "nothing stops a second writer" in warnings[0]
    assert list(tmp_path.iterdir()) == []


# A sampler whose shard writes wait for the file argv[1] to exist: it is at work until the test says go.
HELD_SAMPLE = """
import os, sys, time
import ccalign.sample.run as run
from ccalign.cli import main
go, write = sys.argv.pop(1), run.write_shard
def held(*a):
    while not os.path.exists(go):
        time.sleep(0.02)
    write(*a)
run.write_shard = held
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_sampler_on_the_same_output_stops_naming_the_first(smoke_run, tmp_path):
    root, _ = smoke_run
    out = tmp_path / "samples.npz"
    argv = sample_argv(root, tmp_path, out)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    go = tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", HELD_SAMPLE, str(go), *argv], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while not (tmp_path / ".samples.npz.lock").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "ccalign", *argv], env=env, capture_output=True, text=True, timeout=120
        )
        assert first.poll() is None  # the second one did not wait for the first
    finally:
        go.touch()
        first_log = first.communicate(timeout=120)[1]
    go.unlink()
    assert second.returncode == 1 and "Traceback" not in second.stderr
    (line,) = error_lines(second.stderr)
    assert (
        f"{out} is being written by another process (pid {first.pid} on host {socket.gethostname()})" in line
    )
    assert first.returncode == 0, first_log
    with np.load(out) as got, np.load(root / SAMPLES) as want:  # the first one finished undisturbed
        assert np.array_equal(got["arr_0"], want["arr_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "mlflow", "samples.npz"]
