"""A full disk, for real: a small tmpfs (mounted in a private mount namespace of the test's own process tree)
filled up, then every writing stage run into it through the CLI. One message naming the directory and the
bytes needed, no traceback, no partial file; once space is freed the same command finishes. A file size limit
(``ulimit -f``, EFBIG) is the other real source of refused writes, available everywhere."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import subprocess
import sys

import pytest
from testkit import (
    BASE,
    CACHE,
    CLASSIFIER,
    DATA,
    ROOT,
    SAMPLES,
    TOKENIZER,
    cli,
    error_lines,
    run_cli_jobs,
    sample_argv,
)

from ccalign.errors import DiskFullError, describe

# a private mount namespace (as an unprivileged user too, where user namespaces are allowed)
UNSHARE = ["unshare", "--mount", "--map-root-user", "--propagation", "private"]


def tmpfs_allowed() -> bool:
    probe = subprocess.run(
        [*UNSHARE, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


def sample_job(label: str, out, *extra: str) -> list:
    return cli(
        label,
        "sample",
        *("--model", "llamagen_tiny", "--checkpoint", BASE, "--tokenizer", TOKENIZER, "--guidance", "1"),
        *("--out", str(out), *extra),
    )


def evaluate_job(label: str, out, *extra: str) -> list:
    return cli(
        label,
        "evaluate",
        *("--samples", SAMPLES, "--reference", f"{DATA}/val", "--classifier", CLASSIFIER),
        *("--out", str(out), *extra),
    )


@pytest.mark.skipif(not tmpfs_allowed(), reason="no private mount namespace here (unshare --mount refused)")
def test_full_disk_is_one_message_and_the_same_command_resumes(smoke_run, tmp_path):
    root = shutil.copytree(smoke_run[0], tmp_path / "work")  # the shared run stays as it was
    disk = tmp_path / "disk"
    disk.mkdir()
    jobs = [
        ["sh", "fill", f"mount -t tmpfs -o size=1m tmpfs {disk} && {{ cat /dev/zero > {disk}/filler; }}"],
        ["sh", "full", f"test -s {disk}/filler && df -B1 --output=avail {disk} | tail -n1"],
        sample_job("sample", disk / "samples" / "samples.npz"),
        cli(
            "finetune",
            "finetune",
            *("--model", "llamagen_tiny", "--seed", "0", "--objective", "cca", "--lam", "1", "--base", BASE),
            *("--tokenizer", TOKENIZER, "--cache", CACHE, "--out", str(disk / "ft" / "model.pt")),
        ),
        cli(
            "tokenize",
            "tokenize",
            *("--tokenizer-name", "vq_tiny", "--tokenizer", TOKENIZER, "--data", DATA),
            *("--out", str(disk / "cache")),
        ),
        evaluate_job("evaluate", disk / "eval" / "metrics.json"),
        ["sh", "left", f"find {disk} -type f"],
        # the stage's work done, only its tracking record has no room: still a success
        evaluate_job("tracking", tmp_path / "eval" / "metrics.json", "--set", f"data_root={disk}/root"),
        ["sh", "free", f"rm {disk}/filler"],
        sample_job("resume", disk / "samples" / "samples.npz"),
        ["sh", "sha", f"sha256sum {disk}/samples/samples.npz"],
    ]
    results = run_cli_jobs(jobs, root, prefix=UNSHARE)
    assert results["full"]["rc"] == 0 and results["full"]["log"].split() == ["0"], results["full"]
    for label, directory in (
        ("sample", disk / "samples" / "samples.shards"),
        ("finetune", disk / "ft" / "model_state"),
        ("tokenize", disk / "cache"),
        ("evaluate", disk / "eval"),
    ):
        r = results[label]
        assert r["rc"] == 1 and "Traceback" not in r["log"], r
        (line,) = error_lines(r["log"])
        assert f"no space left on device in {directory}: writing " in line, line
        assert " needs at least " in line and " bytes" in line and "run the same command again" in line, line
    assert results["left"]["log"].split() == [f"{disk}/filler"]  # no partial file anywhere
    tracking = results["tracking"]
    assert tracking["rc"] == 0 and error_lines(tracking["log"]) == [], tracking
    assert "MLflow run of this stage not recorded: cannot write" in tracking["log"]
    assert "no space left on device" in tracking["log"].lower()
    assert (tmp_path / "eval" / "metrics.json").is_file()
    assert results["resume"]["rc"] == 0, results["resume"]
    want = hashlib.sha256((root / SAMPLES).read_bytes()).hexdigest()
    assert results["sha"]["log"].split()[0] == want  # the resumed run wrote what an undisturbed one writes


def test_a_file_size_limit_is_one_message(smoke_run, tmp_path):
    root = shutil.copytree(smoke_run[0], tmp_path / "work")
    out = tmp_path / "samples.npz"
    argv = sample_argv(root, tmp_path, out)
    proc = subprocess.run(
        [sys.executable, "-m", "ccalign", *argv],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)),
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert f"file too large in {tmp_path / 'samples.shards'}: writing shard-00000.npz needs at least" in line
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_describe_words_space_errors_anywhere_in_the_chain_and_nothing_else(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.bin"))
        except OSError as e:
            raise RuntimeError("writer failed") from e
    except RuntimeError as e:
        wrapped = e
    assert describe(wrapped).startswith(f"no space left on device in {tmp_path}: writing x.bin")
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert describe(quota).startswith("disk quota exceeded (directory unknown): a write")
    assert describe(ValueError("bad value")) is None and describe(OSError(errno.EACCES, "denied")) is None
    message = str(DiskFullError(tmp_path, target="big.npz", needed=3 * 2**30))
    assert "writing big.npz needs at least 3221225472 bytes (3 GiB)" in message
