"""What the end of a Snakemake invocation records in DVC: which stages, in one ``dvc commit``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from testkit import SMOKE

from ccalign import state
from ccalign.config import load_config
from ccalign.pipeline import Plan, dvc_yaml


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> tuple[Plan, Path, list[list[str]]]:
    """A DVC-shaped folder for the smoke plan, and the commands ``commit_to_dvc`` runs (recorded, not run)."""
    plan = Plan(load_config(SMOKE), str(SMOKE))
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml(plan)))
    calls = []
    monkeypatch.setattr(
        state.subprocess,
        "run",
        lambda argv, **kw: calls.append(argv) or subprocess.CompletedProcess(argv, 0, "", ""),
    )
    return plan, tmp_path, calls


def make_outputs(plan: Plan, root: Path, skip: set[str] = frozenset()) -> None:
    for job in plan.jobs():
        if job.name not in skip:
            for out in job.outputs.values():
                (root / out).parent.mkdir(parents=True, exist_ok=True)
                (root / out).write_text(job.name)


def test_a_whole_dag_is_committed_in_one_pass_without_naming_stages(repo):
    plan, root, calls = repo
    make_outputs(plan, root)
    assert state.commit_to_dvc(plan, root)
    (argv,) = calls
    assert argv[1:] == ["commit", "--force", "--quiet"]


def test_a_partial_run_names_exactly_the_stages_whose_outputs_exist(repo):
    plan, root, calls = repo
    reports = {j.name for j in plan.jobs() if j.stage.name == "report"}
    make_outputs(plan, root, skip=reports)
    assert state.commit_to_dvc(plan, root)
    (argv,) = calls
    assert set(argv[4:]) == {j.name for j in plan.jobs()} - reports and len(argv[4:]) == len(set(argv[4:]))


def test_a_dvc_yaml_of_another_config_is_left_alone(repo):
    plan, root, calls = repo
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {}}))
    make_outputs(plan, root)
    assert not state.commit_to_dvc(plan, root) and not calls


def test_lock_entries_of_stages_no_longer_in_dvc_yaml_are_dropped(repo):
    plan, root, _ = repo
    make_outputs(plan, root)
    kept = plan.jobs()[0].name
    entry = {"cmd": "x", "outs": [{"path": "a", "md5": "0"}]}
    (root / "dvc.lock").write_text(
        yaml.safe_dump({"schema": "2.0", "stages": {kept: entry, "finetune-of-another-config": entry}})
    )
    assert state.commit_to_dvc(plan, root)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock == {"schema": "2.0", "stages": {kept: entry}}
