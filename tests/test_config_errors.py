"""Every bad config is one line naming the file (or the --set argument) and the key, through the CLI and
through Snakemake alike: never a traceback, never a schema dump."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE = ROOT / "config" / "smoke.yaml"


def edited(change) -> str:
    cfg = yaml.safe_load(SMOKE.read_text())
    change(cfg)
    return yaml.safe_dump(cfg, sort_keys=False)


def _at(cfg: dict, path: str) -> tuple[dict, str]:
    """(the mapping that holds the dotted ``path``, its last key)."""
    *parents, last = path.split(".")
    for p in parents:
        cfg = cfg[p]
    return cfg, last


def setitem(path: str, value):
    def change(cfg):
        node, key = _at(cfg, path)
        node[key] = value

    return change


def delitem(path: str):
    def change(cfg):
        node, key = _at(cfg, path)
        del node[key]

    return change


def only_llamagen(cfg: dict) -> None:
    for target in cfg["targets"].values():
        target["models"] = ["llamagen_tiny"]
        target["sets"] = [s for s in target["sets"] if "llamagen_tiny" in s.get("models", target["models"])]


# name → (config text, what the one line must name besides the file)
CASES = {
    "unknown top-level key": (
        edited(setitem("sampling", {"per_class": 3})),
        "unknown key 'sampling' under <top level>",
    ),
    "unknown nested key": (
        edited(setitem("finetune.learning_rate", 1e-5)),
        "unknown key 'learning_rate' under finetune",
    ),
    "wrong type": (edited(setitem("sample.per_class", "many")), "sample.per_class"),
    "out of range": (edited(setitem("finetune.uncond_ratio", 2)), "finetune.uncond_ratio"),
    "missing required": (edited(delitem("dataset.num_classes")), "'num_classes' is a required property"),
    "unknown tokenizer": (
        edited(setitem("models.llamagen_tiny.tokenizer", "vq_huge")),
        "models.llamagen_tiny.tokenizer: 'vq_huge'",
    ),
    "tokenizer of another family": (
        edited(setitem("models.llamagen_tiny.tokenizer", "msvq_tiny")),
        "is a var tokenizer",
    ),
    "unknown family": (
        edited(setitem("models.llamagen_tiny.family", "dalle")),
        "unknown model family 'dalle'",
    ),
    "unknown variant": (
        edited(setitem("targets.table2.sets", [{"variant": "cca_big", "guidance": ["free"]}])),
        "has no variant 'cca_big'",
    ),
    "empty sets": (edited(setitem("targets.table2.sets", [])), "targets.table2.sets"),
    "model without jobs": (edited(only_llamagen), "no target uses them"),
    "duplicate key": ("experiment: a\ndataset: {}\nexperiment: b\n", "duplicate key 'experiment'"),
}
# Snakemake reads a --configfile itself before the Snakefile runs: for these it prints its own two lines
OWN_READER = {
    "syntax error": ("experiment: [a\n", ":2:1: not valid YAML"),
    "not a mapping": ("- a\n- b\n", "the top level must be a mapping"),
}


def one_line(out: subprocess.CompletedProcess) -> str:
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Traceback" not in text, text[-2000:]
    lines = [
        line
        for line in text.splitlines()
        if "ccalign" in line and ("ERROR" in line or line.startswith("ccalign:"))
    ]
    assert len(lines) == 1, text[-2000:]
    assert "additionalProperties" not in text and "$defs" not in text  # no schema dump
    return lines[0]


@pytest.mark.parametrize("case", [*CASES, *OWN_READER])
def test_through_the_cli(case, tmp_path):
    text, expected = {**CASES, **OWN_READER}[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = subprocess.run(
        [str(BIN / "ccalign"), "plan", "--config", str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    line = one_line(out)
    assert str(bad) in line and expected in line, line


@pytest.mark.parametrize("case", list(CASES))
def test_through_snakemake(case, tmp_path):
    text, expected = CASES[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    out = subprocess.run(
        [str(BIN / "snakemake"), "-n", "--configfile", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    line = one_line(out)
    assert os.path.relpath(bad, ROOT) in line and expected in line, line


@pytest.mark.parametrize(
    "item, expected",
    [
        ("finetune.betas=[0.9", "not a valid YAML value"),
        ("finetune.uncond_ratio=2", "finetune.uncond_ratio"),
        ("sample=3", "sample"),
        ("sample.per_class", "expected key=value"),
    ],
)
def test_a_bad_set_is_blamed_on_the_set_argument(item, expected):
    out = subprocess.run(
        [str(BIN / "ccalign"), "plan", "--config", str(SMOKE), "--set", item],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    line = one_line(out)
    assert f"--set {item!r}" in line and expected in line and "smoke.yaml" not in line, line


@pytest.mark.parametrize("case", list(OWN_READER))
def test_through_the_dag_command_even_what_snakemake_reads_itself(case, tmp_path):
    text, expected = OWN_READER[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "ccalign.dag", "-n", "--configfile", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    line = one_line(out)
    assert str(bad) in line and expected in line, line
