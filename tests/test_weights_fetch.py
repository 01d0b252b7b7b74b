"""Downloads against a local HTTP server on 127.0.0.1: plain URLs (pooch) and a minimal Hugging Face Hub
(the ``resolve`` endpoint huggingface_hub talks to). Never touches the internet."""

import argparse
import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from testkit import ROOT, smoke_argv

import ccalign.tracking as tracking
from ccalign.stages import fetch as fetch_stage
from ccalign.weights import (
    Artifact,
    ChecksumError,
    FetchError,
    OfflineError,
    ResumableDownloader,
    fetch,
    read_lock,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 1 << 14  # write granularity of both downloaders in these tests
GOOD = bytes(range(256)) * 1200  # 300 KiB: many chunks, so a cut leaves a real partial file
BAD = GOOD[:-1] + b"\x00"
CUT = len(GOOD) // 3  # the server hangs up after this many bytes
KEPT = CUT // CHUNK * CHUNK  # what a downloader has written when the connection breaks


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(ResumableDownloader, "chunk_size", CHUNK)
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Handler(BaseHTTPRequestHandler):
    """Serves ``state.files`` (path -> bytes) with Ranges; ``/<repo>/resolve/<rev>/<file>`` as the Hub."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self.serve(body=False)

    def do_GET(self):
        self.serve(body=True)

    def serve(self, body: bool):
        st = self.server.state
        path = self.path.split("?")[0]
        st.seen.append((self.command, path, self.headers.get("Range")))
        extra = {}
        hub = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if hub:
            path = f"{hub['repo']}/{hub['file']}"
            extra = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha(st.files[path])}"'} if path in st.files else {}
        data = st.files.get(path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and st.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
        self.send_response(206 if start else 200)
        for k, v in extra.items():
            self.send_header(k, v)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return
        if path in st.drop_once and self.command == "GET":
            st.drop_once.discard(path)
            self.wfile.write(data[start : start + CUT])  # then hang up mid-file
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@contextmanager
def serve(files: dict[str, bytes], drop_once=(), ranges=True):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.state = argparse.Namespace(files=dict(files), drop_once=set(drop_once), ranges=ranges, seen=[])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def url_artifact(url: str, sha256: str | None = sha(GOOD), size: int | None = len(GOOD)) -> Artifact:
    return Artifact(key="ref", file="eval/ref.npz", size=size, sha256=sha256, url=url)


def hf_artifact(revision: str | None = COMMIT, sha256: str | None = sha(GOOD)) -> Artifact:
    return Artifact(
        key="ckpt",
        file="llamagen/ckpt.pt",
        size=len(GOOD),
        sha256=sha256,
        hf_repo="org/repo",
        revision=revision,
        path="sub/ckpt.pt",
    )


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


FAST = {"backoff": 0.0, "timeout": 5.0}


# ------------------------------------------------------------------------------------------------- URLs


def test_url_good_file_is_verified_placed_and_locked(tmp_path):
    with serve({"/ref.npz": GOOD}) as (st, base):
        got = fetch(url_artifact(f"{base}/ref.npz"), tmp_path, **FAST)
        assert got.path.read_bytes() == GOOD and got.sha256 == sha(GOOD) and got.action == "fetched"
        assert read_lock(tmp_path / "weights.lock.json")["ref"]["sha256"] == sha(GOOD)
        again = fetch(url_artifact(f"{base}/ref.npz"), tmp_path, **FAST)
    assert again.action == "present"
    assert [s for s in st.seen if s[0] == "GET"] == [("GET", "/ref.npz", None)]  # no second download


def test_url_checksum_mismatch_is_named_and_leaves_nothing(tmp_path):
    with serve({"/ref.npz": BAD}) as (_, base), pytest.raises(ChecksumError) as e:
        fetch(url_artifact(f"{base}/ref.npz"), tmp_path, **FAST)
    msg = str(e.value)
    assert "'ref'" in msg and sha(GOOD) in msg and sha(BAD) in msg
    assert files_under(tmp_path) == []  # no final file, no partial, no temp, no lock entry


def test_url_size_mismatch_is_caught_before_the_final_name(tmp_path):
    with (
        serve({"/ref.npz": GOOD + b"x"}) as (_, base),
        pytest.raises(ChecksumError, match=f"size mismatch .* expected {len(GOOD)}, got {len(GOOD) + 1}"),
    ):
        fetch(url_artifact(f"{base}/ref.npz", sha256=None), tmp_path, **FAST)
    assert files_under(tmp_path) == []


def test_url_interrupted_download_resumes_with_range(tmp_path):
    with serve({"/ref.npz": GOOD}, drop_once={"/ref.npz"}) as (st, base):
        got = fetch(url_artifact(f"{base}/ref.npz"), tmp_path, retries=2, **FAST)
    gets = [s for s in st.seen if s[0] == "GET"]
    assert gets[0] == ("GET", "/ref.npz", None)
    assert gets[1] == ("GET", "/ref.npz", f"bytes={KEPT}-")  # resumed where the cut left it
    assert got.path.read_bytes() == GOOD and got.sha256 == sha(GOOD)
    assert files_under(tmp_path) == [".weights.lock.json.flock", "eval/ref.npz", "weights.lock.json"]


def test_url_partial_survives_a_failed_run_and_the_next_run_resumes(tmp_path):
    with serve({"/ref.npz": GOOD}, drop_once={"/ref.npz"}) as (st, base):
        a = url_artifact(f"{base}/ref.npz")
        with pytest.raises(
            FetchError, match=f"artifact 'ref': cannot download {base}/ref.npz: connection broken"
        ):
            fetch(a, tmp_path, retries=1, **FAST)
        assert not (tmp_path / "eval/ref.npz").exists()
        assert (tmp_path / "eval/.ref.npz.part").stat().st_size == KEPT
        got = fetch(a, tmp_path, retries=1, **FAST)
    assert st.seen[-1] == ("GET", "/ref.npz", f"bytes={KEPT}-")
    assert got.path.read_bytes() == GOOD


def test_url_server_without_range_support_restarts_cleanly(tmp_path):
    with serve({"/ref.npz": GOOD}, drop_once={"/ref.npz"}, ranges=False) as (st, base):
        got = fetch(url_artifact(f"{base}/ref.npz"), tmp_path, retries=2, **FAST)
    assert st.seen[-1][2] == f"bytes={KEPT}-"  # asked to resume, got the whole file (200) instead
    assert got.path.read_bytes() == GOOD


def test_unknown_hash_is_recorded_then_enforced(tmp_path):
    with serve({"/ref.npz": GOOD}) as (st, base):
        a = url_artifact(f"{base}/ref.npz", sha256=None, size=None)
        got = fetch(a, tmp_path, **FAST)
        assert got.unpinned == ("size", "sha256")
        assert read_lock(tmp_path / "weights.lock.json")["ref"] == {
            "file": "eval/ref.npz",
            "origin": f"{base}/ref.npz",
            "revision": None,
            "size": len(GOOD),
            "sha256": sha(GOOD),
        }
        st.files["/ref.npz"] = BAD  # upstream silently changes
        (tmp_path / "eval/ref.npz").unlink()
        with pytest.raises(ChecksumError, match=f"expected {sha(GOOD)}, got {sha(BAD)}"):
            fetch(a, tmp_path, **FAST)
    assert not (tmp_path / "eval/ref.npz").exists()


def test_a_new_pin_in_the_manifest_overrides_the_lock(tmp_path):
    new = GOOD + b"v2"
    with serve({"/ref.npz": GOOD}) as (st, base):
        fetch(url_artifact(f"{base}/ref.npz", sha256=None, size=None), tmp_path, **FAST)
        st.files["/ref.npz"] = new  # upstream publishes v2 and the user pins its hash (size left null)
        got = fetch(url_artifact(f"{base}/ref.npz", sha256=sha(new), size=None), tmp_path, **FAST)
    assert got.action == "fetched" and got.path.read_bytes() == new
    assert read_lock(tmp_path / "weights.lock.json")["ref"]["size"] == len(new)


def test_corrupted_present_file_is_fetched_again(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval/ref.npz").write_bytes(BAD)
    with serve({"/ref.npz": GOOD}) as (_, base):
        with pytest.raises(ChecksumError, match=f"got {sha(BAD)}$"):  # offline: reported, left alone
            fetch(url_artifact(f"{base}/ref.npz"), tmp_path, offline=True, **FAST)
        assert (tmp_path / "eval/ref.npz").read_bytes() == BAD
        got = fetch(url_artifact(f"{base}/ref.npz"), tmp_path, **FAST)
    assert got.action == "fetched" and got.path.read_bytes() == GOOD


def test_offline_url_present_works_and_missing_is_a_clear_error(tmp_path):
    with serve({"/ref.npz": GOOD}) as (st, base):
        a = url_artifact(f"{base}/ref.npz")
        fetch(a, tmp_path, **FAST)
        n = len(st.seen)
        assert fetch(a, tmp_path, offline=True, **FAST).action == "present"
        assert len(st.seen) == n  # offline never touched the server
        with pytest.raises(OfflineError, match="artifact 'ref': offline mode is on"):
            fetch(a, tmp_path / "elsewhere", offline=True, **FAST)
        assert len(st.seen) == n


# --------------------------------------------------------------------------------------- Hugging Face


def test_hf_download_pinned_revision(tmp_path):
    with serve({"org/repo/sub/ckpt.pt": GOOD}) as (st, base):
        got = fetch(hf_artifact(), tmp_path / "w", cache_dir=str(tmp_path / "hf"), endpoint=base)
    assert got.path.read_bytes() == GOOD and got.revision == COMMIT and got.unpinned == ()
    assert ("HEAD", f"/org/repo/resolve/{COMMIT}/sub/ckpt.pt", None) in st.seen
    assert read_lock(tmp_path / "w/weights.lock.json")["ckpt"]["origin"] == "hf://model/org/repo/sub/ckpt.pt"


def test_hf_unpinned_revision_is_resolved_once_and_reused(tmp_path):
    a = hf_artifact(revision=None)
    with serve({"org/repo/sub/ckpt.pt": GOOD}) as (st, base):
        got = fetch(a, tmp_path / "w", cache_dir=str(tmp_path / "hf"), endpoint=base)
        assert got.revision == COMMIT and got.unpinned == ("revision",)
        assert ("HEAD", "/org/repo/resolve/main/sub/ckpt.pt", None) in st.seen
        (tmp_path / "w/llamagen/ckpt.pt").unlink()
        st.seen.clear()
        fetch(a, tmp_path / "w", cache_dir=str(tmp_path / "hf2"), endpoint=base)
    assert ("HEAD", f"/org/repo/resolve/{COMMIT}/sub/ckpt.pt", None) in st.seen  # the locked commit, not main


def test_hf_checksum_mismatch_leaves_nothing_and_evicts_the_cache(tmp_path):
    with serve({"org/repo/sub/ckpt.pt": BAD}) as (_, base), pytest.raises(ChecksumError) as e:
        fetch(hf_artifact(), tmp_path / "w", cache_dir=str(tmp_path / "hf"), endpoint=base)
    assert "'ckpt'" in str(e.value) and sha(GOOD) in str(e.value) and sha(BAD) in str(e.value)
    assert not (tmp_path / "w/llamagen/ckpt.pt").exists()
    assert [f for f in files_under(tmp_path / "hf") if "/blobs/" in f or "/snapshots/" in f] == []


def test_hf_interrupted_download_resumes_with_range(tmp_path):
    with serve({"org/repo/sub/ckpt.pt": GOOD}, drop_once={"org/repo/sub/ckpt.pt"}) as (st, base):
        got = fetch(hf_artifact(), tmp_path / "w", cache_dir=str(tmp_path / "hf"), endpoint=base)
    assert [s[2] for s in st.seen if s[0] == "GET"] == [None, f"bytes={KEPT}-"]  # huggingface_hub resumed
    assert got.path.read_bytes() == GOOD and got.sha256 == sha(GOOD)


def test_hf_offline_uses_the_cache_and_missing_is_a_clear_error(tmp_path):
    kw = {"cache_dir": str(tmp_path / "hf")}
    with serve({"org/repo/sub/ckpt.pt": GOOD}) as (_, base):
        fetch(hf_artifact(), tmp_path / "w1", endpoint=base, **kw)
    # Server gone: a fresh weights folder is filled from the HF cache alone.
    got = fetch(hf_artifact(), tmp_path / "w2", offline=True, **kw)
    assert got.action == "fetched" and got.path.read_bytes() == GOOD
    with pytest.raises(
        OfflineError, match="artifact 'ckpt': offline mode is on .* not in the Hugging Face cache"
    ):
        fetch(hf_artifact(), tmp_path / "w3", offline=True, cache_dir=str(tmp_path / "empty"))
    assert not (tmp_path / "w3/llamagen/ckpt.pt").exists()


# ----------------------------------------------------------------------------------------------- stage


def test_stage_fetches_what_the_config_needs_one_run_each(tmp_path, monkeypatch):
    runs = []

    @contextmanager
    def fake_stage_run(cfg, stage, labels, tags=None, params=None, inputs=None):
        rec = {"stage": stage, "tags": {**labels, **tags}, "params": dict(params), "metrics": {}}

        class Run:
            def set_tags(self, t):
                rec["tags"].update(t)

            def log_params(self, p):
                rec["params"].update(p)

            def log_metrics(self, m, step=None):
                rec["metrics"].update(m)

        runs.append(rec)
        yield Run()

    monkeypatch.setattr(tracking, "stage_run", fake_stage_run)
    manifest = tmp_path / "weights.yaml"
    dest = tmp_path / "weights"
    with serve({"/ref.npz": GOOD, "/other.npz": BAD}) as (st, base):
        entry = "{{file: eval/{0}.npz, source: {{url: '{1}/{0}.npz'}}, size: null, sha256: null}}"
        manifest.write_text(
            f"artifacts:\n  ref: {entry.format('ref', base)}\n  other: {entry.format('other', base)}\n"
        )
        args = argparse.Namespace(
            manifest=str(manifest),
            only=None,
            all=False,
            dest=str(dest),
            lock=None,
            cache_dir=None,
            offline=False,
            labels={},
        )
        fetch_stage.main({"evaluate": {"reference": str(dest / "eval/ref.npz")}}, args)
    assert files_under(dest) == [
        ".weights.lock.json.flock",
        "eval/ref.npz",
        "weights.lock.json",
    ]  # "other" is not referred to
    assert [r["tags"]["artifact"] for r in runs] == ["ref"]
    assert runs[0]["stage"] == "fetch" and runs[0]["tags"]["sha256"] == sha(GOOD)
    assert runs[0]["tags"]["origin"] == f"{base}/ref.npz" and runs[0]["params"]["fetched.size"] == len(GOOD)
    assert runs[0]["params"]["artifact.sha256"] == "null" and "artifact.revision" not in runs[0]["params"]
    with pytest.raises(ValueError, match=r"unknown artifact\(s\) \['nope'\]"):
        fetch_stage.main({}, argparse.Namespace(**{**vars(args), "only": ["nope"]}))


# ------------------------------------------------------------------------------------------ faults


def test_a_changed_pin_keeps_the_verified_file_until_its_replacement_verifies(tmp_path):
    new = GOOD + b"v2"
    with serve({"/ref.npz": GOOD}) as (st, base):
        fetch(url_artifact(f"{base}/ref.npz"), tmp_path, **FAST)
        typo = url_artifact(
            f"{base}/ref.npz", sha256=sha(new), size=None
        )  # the server still has the old file
        with pytest.raises(ChecksumError, match="download discarded"):
            fetch(typo, tmp_path, **FAST)
        assert (tmp_path / "eval/ref.npz").read_bytes() == GOOD  # the verified file is still there
        assert files_under(tmp_path) == [".weights.lock.json.flock", "eval/ref.npz", "weights.lock.json"]
        st.files["/ref.npz"] = new  # now the replacement exists and verifies: it takes the place
        assert fetch(typo, tmp_path, **FAST).path.read_bytes() == new


def test_http_404_is_one_error_naming_artifact_and_url_without_retry_or_leftovers(tmp_path):
    with serve({}) as (st, base), pytest.raises(FetchError) as e:
        fetch(url_artifact(f"{base}/ref.npz"), tmp_path, retries=3, **FAST)
    assert str(e.value) == f"artifact 'ref': cannot download {base}/ref.npz: HTTP 404 Not Found"
    assert [s for s in st.seen if s[0] == "GET"] == [("GET", "/ref.npz", None)]  # a 404 is not retried
    assert files_under(tmp_path) == []  # no 0-byte .part


def test_connection_refused_is_named_and_a_present_file_is_kept(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/ref.npz"  # closed once the block ends
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval/ref.npz").write_bytes(BAD)  # a damaged copy, to be replaced
    with pytest.raises(FetchError) as e:
        fetch(url_artifact(url), tmp_path, retries=2, **FAST)
    kept = f"{tmp_path}/eval/ref.npz is left as it was"
    assert str(e.value) == f"artifact 'ref': cannot download {url}: connection refused; {kept}"
    assert files_under(tmp_path) == ["eval/ref.npz"]


def test_hub_404_names_the_artifact_and_the_resolve_url(tmp_path):
    with serve({}) as (_, base), pytest.raises(FetchError) as e:
        fetch(hf_artifact(), tmp_path / "w", cache_dir=str(tmp_path / "hf"), endpoint=base)
    url = f"{base}/org/repo/resolve/{COMMIT}/sub/ckpt.pt"
    assert str(e.value) == f"artifact 'ckpt': cannot download {url}: HTTP 404 Not Found"
    assert not (tmp_path / "w/llamagen/ckpt.pt").exists()


def test_fetch_stage_404_is_one_line_on_stderr(tmp_path):
    manifest = tmp_path / "weights.yaml"
    with serve({}) as (_, base):
        entry = f"{{file: eval/ref.npz, source: {{url: '{base}/ref.npz'}}, size: null, sha256: null}}"
        manifest.write_text(f"artifacts:\n  ref: {entry}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "ccalign", *smoke_argv("fetch", "--set", f"data_root={tmp_path}")]
            + ["--manifest", str(manifest), "--only", "ref"]
            + ["--dest", str(tmp_path / "w")],
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"artifact 'ref': cannot download {base}/ref.npz: HTTP 404 Not Found"
    )
