"""Stages verify what they read: a damaged code cache or a non-finite checkpoint is one error naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from testkit import BASE, CACHE, SMOKE, TOKENIZER, cli, error_lines, run_cli_jobs

from ccalign.data.cache import MANIFEST, shard_files, verify_cache
from ccalign.data.dataset import CodeDataset
from ccalign.families import get_family
from ccalign.io import sha256_file
from ccalign.models.checkpoint import CheckpointError, load_state_dict_strict

CODES = shard_files(0)["codes"]


def rewrite_codes(cache: Path, change) -> None:
    """Change shard 0's codes with ``change(codes)`` and record the new file, as an extraction would."""
    path = cache / CODES
    codes = np.load(path)
    change(codes)
    np.save(path, codes)
    record_path = cache / shard_files(0)["record"]
    manifest = json.loads((cache / MANIFEST).read_text())
    record = json.loads(record_path.read_text())
    for entry in (record, manifest["shards"][0]):
        entry["codes_bytes"], entry["codes_sha256"] = path.stat().st_size, sha256_file(path)
    record_path.write_text(json.dumps(record))
    (cache / MANIFEST).write_text(json.dumps(manifest))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def damaged_caches(source: Path, root: Path) -> dict[str, Path]:
    """Copies of a good cache: one flipped bit, a code outside the vocabulary (recorded), a cut file."""
    caches = {name: root / name for name in ("flipped", "out_of_range", "truncated")}
    for path in caches.values():
        shutil.copytree(source, path)
    flip_last_byte(caches["flipped"] / CODES)
    vocab = json.loads((source / MANIFEST).read_text())["vocab_size"]
    rewrite_codes(caches["out_of_range"], lambda codes: codes.__setitem__((3, 0, 5), vocab + 8))
    with open(caches["truncated"] / CODES, "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    return caches


def finetune(label: str, cache: Path, base: Path, out: Path) -> list:
    return cli(
        label,
        "finetune",
        *("--model", "llamagen_tiny", "--seed", "0", "--objective", "cca", "--lam", "1", "--base", str(base)),
        *("--tokenizer", TOKENIZER, "--cache", str(cache), "--out", str(out)),
    )


def test_damaged_cache_or_nan_checkpoint_is_one_error_naming_the_file(smoke_run, tmp_path):
    root, _ = smoke_run
    caches = damaged_caches(root / CACHE, tmp_path)
    state = torch.load(root / BASE, weights_only=True)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key].view(-1)[3] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    jobs = [
        finetune(name, cache, root / BASE, tmp_path / name / "model.pt") for name, cache in caches.items()
    ]
    jobs.append(finetune("nan_base", root / CACHE, tmp_path / "nan.pt", tmp_path / "nan_base" / "model.pt"))
    jobs.append(
        cli(
            "nan_sample",
            "sample",
            *("--model", "llamagen_tiny", "--checkpoint", str(tmp_path / "nan.pt"), "--tokenizer", TOKENIZER),
            *("--guidance", "1", "--out", str(tmp_path / "nan_sample" / "samples.npz")),
        )
    )
    results = run_cli_jobs(jobs, root)
    vocab = json.loads((root / CACHE / MANIFEST).read_text())["vocab_size"]
    expected = {
        "flipped": f"{caches['flipped'] / CODES}: corrupt (sha256 differs from the recorded one)",
        "out_of_range": f"{caches['out_of_range'] / CODES}: codes span [0, {vocab + 8}], outside [0, {vocab}",
        "truncated": f"{caches['truncated'] / CODES}: truncated (",
        "nan_base": f"{tmp_path / 'nan.pt'}: tensor '{key}' holds 1 non-finite value (NaN/Inf)",
        "nan_sample": f"{tmp_path / 'nan.pt'}: tensor '{key}' holds 1 non-finite value (NaN/Inf)",
    }
    for label, text in expected.items():
        r = results[label]
        assert r["rc"] == 2 and "Traceback" not in r["log"], r
        (line,) = error_lines(r["log"])
        assert text in line, (label, line)
        assert (
            not (tmp_path / label / "model.pt").exists() and not (tmp_path / label / "samples.npz").exists()
        )
    assert "delete " in error_lines(results["flipped"]["log"])[0]  # and says how to repair the shard


def stub_cache(tmp_path: Path, shards: int = 2) -> Path:
    """A real cache of the smoke tokenizer's layout written by the cache module (random codes)."""
    from ccalign.data.cache import CachePlan, finalize, write_shard
    from ccalign.data.folder import ImageFolder
    from ccalign.data.views import ViewSpec

    folder = ImageFolder(tmp_path, ["0", "1", "2"], [(f"{i % 3}/{i}.png", i % 3) for i in range(8 * shards)])
    plan = CachePlan(folder, ViewSpec.from_dict({"mode": "center"}, 8), 8, "llamagen", {"name": "t"}, 32)
    g = np.random.default_rng(0)
    for k in range(shards):
        write_shard(
            tmp_path,
            plan,
            k,
            g.integers(0, 32, (8, 1, 16)).astype(np.uint16),
            np.arange(8, dtype=np.int16) % 3,
        )
    finalize(plan, tmp_path)
    return tmp_path


def test_verify_reports_values_outside_the_vocabulary_and_classes(tmp_path):
    cache = stub_cache(tmp_path)
    assert verify_cache(cache) == []
    rewrite_codes(cache, lambda codes: codes.__setitem__((0, 0, 0), 32))
    labels = shard_files(1)["labels"]
    np.save(cache / labels, np.array([0, 1, 2, 0, 1, 2, 0, 7], np.int16))
    record = json.loads((cache / shard_files(1)["record"]).read_text())
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest["shards"][1]["labels_sha256"] = record["labels_sha256"] = sha256_file(cache / labels)
    (cache / MANIFEST).write_text(json.dumps(manifest))
    assert verify_cache(cache) == [
        f"{CODES}: codes span [0, 32], outside [0, 32)",
        f"{labels}: labels span [0, 7], outside [0, 3)",
    ]


def test_each_process_of_a_job_checks_its_share_of_the_shards(tmp_path):
    cache = stub_cache(tmp_path, shards=3)
    flip_last_byte(cache / shard_files(1)["codes"])
    ds = CodeDataset(cache, verify=False)
    ds.verify(rank=0, world_size=2)  # shards 0 and 2
    with pytest.raises(ValueError, match=r"shard-00001\.codes\.npy: corrupt"):
        ds.verify(rank=1, world_size=2)
    with pytest.raises(ValueError, match=f"delete {cache / 'shard-00001.json'} and run `ccalign tokenize`"):
        CodeDataset(cache)  # one process: every shard


def test_finite_check_allows_the_inf_of_a_mask_buffer_not_nan_nor_inf_weights():
    args = yaml.safe_load(SMOKE.read_text())["models"]["var_tiny"]["args"]
    family = get_family("var")
    model = family.build_model(args)
    state = model.state_dict()
    assert torch.isinf(state["attn_bias_for_masking"]).any()  # VAR's block-causal mask: -inf on purpose
    load_state_dict_strict(family.build_model(args), state, "ok.pt")
    for key, value in (("attn_bias_for_masking", float("nan")), ("head.weight", float("inf"))):
        bad = {k: v.clone() for k, v in state.items()}
        bad[key].view(-1)[0] = value
        with pytest.raises(CheckpointError, match=f"bad.pt: tensor '{key}' holds 1 non-finite value"):
            load_state_dict_strict(family.build_model(args), bad, "bad.pt")
