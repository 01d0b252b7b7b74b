"""The DAG as declared: every job's command parses, the rules match the stage declarations, dvc.yaml is the
plan's, --config values reach the jobs, code dependencies come from imports, torch-free stages stay so."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ccalign.cli import build_parser
from ccalign.config import load_config
from ccalign.families import get_family
from ccalign.pipeline import Plan, code_files, dvc_yaml, fmt, record_path, snakemake_plan, stages
from ccalign.tracking import run_name

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
CONFIGS = ["config/smoke.yaml", "config/config.yaml", "config/paper.yaml"]


def _smk(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "snakemake"), *args], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=300
    )


def plan_of(configfile: str) -> Plan:
    return Plan(load_config(ROOT / configfile), configfile)


def cli_argv(args: list[str]) -> list[str]:
    """The ccalign part of a job's command (after torchrun / srun launchers)."""
    return args[args.index("ccalign") + 1 :] if "ccalign" in args else args[1:]


@pytest.mark.parametrize("configfile", CONFIGS)
def test_every_job_parses_with_the_cli_and_names_its_files(configfile):
    plan = plan_of(configfile)
    jobs = plan.jobs()
    assert jobs and len({j.name for j in jobs}) == len(jobs)
    for job in jobs:
        argv = cli_argv(job.args)
        args = build_parser(argv[0]).parse_args(argv)  # a renamed flag fails here, not in a slow DAG run
        assert args._stage is job.stage and args.record == job.outputs["record"]
        assert args.labels == job.labels and args.config == [configfile]
        values = {str(v) for v in vars(args).values() if not isinstance(v, list | dict)}
        values |= {str(x) for v in vars(args).values() if isinstance(v, list) for x in v}
        values.discard(args.record)  # every product's folder holds the record: it proves nothing
        # what the stage writes and reads: each path, or a folder above it or inside its folder, is passed
        for path in (job.output, *job.input_files):
            folder = str(Path(path).parent)
            passed = any(v == path or path.startswith(v + "/") or v.startswith(folder + "/") for v in values)
            assert passed, (job.name, path)


@pytest.mark.parametrize("configfile", CONFIGS)
def test_jobs_come_after_the_jobs_they_read_from(configfile):
    seen: set[str] = set()
    producers = {p: j for j in plan_of(configfile).jobs() for p in j.outputs.values()}
    for job in plan_of(configfile).jobs():
        assert all(p in seen for p in job.input_files if p in producers), job.name
        seen |= set(job.outputs.values())


@pytest.mark.parametrize("configfile", CONFIGS)
def test_every_job_has_its_own_run_name(configfile):
    """MLflow run names tell jobs apart (e.g. CCA and CCA+CFG at the same λ differ in β)."""
    names = [run_name(j.stage.name, j.labels) for j in plan_of(configfile).jobs()]
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)[:4]


def _rules() -> dict[str, dict[str, dict[str, str]]]:
    """Rule name → {"input": {name: text}, "output": {name: pattern}} read from workflow/rules/*.smk."""
    rules = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for name, body in re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", smk.read_text(), re.M | re.S):
            sections = {}
            for section in ("input", "output"):
                block = re.search(rf"^    {section}:\n((?:        .*\n)+)", body, re.M)
                entries = re.findall(
                    r"^        (\w+)=(.*?)(?=^        \w+=|\Z)", block.group(1) if block else "", re.M | re.S
                )
                patterns = [re.search(r'data\("([^"]*)"\)', v) for _, v in entries]  # an output's path
                sections[section] = {
                    k: m.group(1) if m else v.strip() for (k, v), m in zip(entries, patterns, strict=True)
                }
            rules[name] = sections
    return rules


def test_every_stage_is_one_rule_whose_outputs_are_the_declared_ones():
    rules = _rules()
    assert set(rules) == set(stages())
    for name, spec in stages().items():
        declared = {**spec.outputs, "record": record_path(next(iter(spec.outputs.values())))}
        assert rules[name]["output"] == declared, name
    for configfile in CONFIGS:  # the rule names every input any job of the stage has
        for job in plan_of(configfile).jobs():
            assert set(job.inputs) <= set(rules[job.stage.name]["input"]), (job.name, sorted(job.inputs))


def test_committed_dvc_yaml_matches_the_plan():
    committed = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert committed == dvc_yaml(plan_of("config/config.yaml")), (
        "dvc.yaml is stale: ccalign plan --dvc > dvc.yaml"
    )


def test_dvc_and_snakemake_run_the_same_commands_on_the_same_files():
    out = _smk("-n", "--forceall", "--printshellcmds")
    assert out.returncode == 0, out.stderr
    smk_cmds = {
        line.split(" ccalign ", 1)[1].split(" > ")[0]
        for line in (out.stdout + out.stderr).splitlines()
        if line.startswith("Shell command:") and " ccalign " in line
    }
    stages_ = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    dvc_cmds = {s["cmd"].split("ccalign ", 1)[1] for s in stages_.values()}
    assert smk_cmds and smk_cmds == dvc_cmds
    dvc_outs = {next(iter(o)) if isinstance(o, dict) else o for s in stages_.values() for o in s["outs"]}
    for job in plan_of("config/config.yaml").jobs():
        for path in job.outputs.values():
            assert any(path == o or path.startswith(o + "/") for o in dvc_outs), path


def test_snakemake_lint_is_clean():
    out = _smk("--lint")
    assert out.returncode == 0, out.stdout + out.stderr


def test_paper_dry_run_on_slurm_gives_every_finetune_job_its_gpus():
    out = _smk("-n", "--profile", "workflow/profiles/slurm", "--configfile", "config/paper.yaml")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    cfg = load_config(ROOT / "config/paper.yaml")
    blocks = [b for b in text.split("\n\n") if "rule finetune:" in b or "localrule finetune:" in b]
    assert len(blocks) == sum(j.stage.name == "finetune" for j in plan_of("config/paper.yaml").jobs())
    for m, spec in cfg["models"].items():
        res = spec["resources"]["finetune"]
        for block in (b for b in blocks if f"/{m}/" in b):
            assert f"gres=gpu:{res['gpus']}" in block and "runtime=" in block and "mem_mb=" in block
            assert f"nodes={res['nodes']}" in block
        assert (res["nodes"] > 1) == (m in ("llamagen_XXL", "llamagen_3B"))


def _readme_target_jobs() -> dict[str, dict[str, int]]:
    """README "Reproducing the paper": jobs per stage of each paper target, as its table states them."""
    text = (ROOT / "README.md").read_text()
    stages = re.search(r"^\| target \| paper \| jobs \(([\w /]+)\) \|", text, re.M).group(1).split(" / ")
    rows = re.findall(r"^\| `(\w+)` \| [^|]* \| ([\d / ]+) \|", text, re.M)
    return {t: dict(zip(stages, map(int, counts.split(" / ")), strict=True)) for t, counts in rows}


PAPER_TARGETS = _readme_target_jobs()


def test_the_readme_table_lists_every_paper_target():
    assert set(PAPER_TARGETS) == set(load_config(ROOT / "config/paper.yaml")["targets"])


@pytest.mark.parametrize("target", sorted(PAPER_TARGETS))
def test_each_paper_target_is_a_rule_with_exactly_its_jobs(target):
    out = _smk("-n", target, "--configfile", "config/paper.yaml")
    assert out.returncode == 0, out.stderr
    stats = {
        m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", out.stdout.split("Job stats:")[1], re.M)
    }
    stats.pop("total")
    assert stats == {**PAPER_TARGETS[target], target: 1}


def test_paper_targets_share_their_jobs_and_use_the_official_settings():
    plan = plan_of("config/paper.yaml")
    every = plan.needed(plan.targets)
    assert len(every) == len(plan.jobs()) < sum(len(plan.needed([t])) for t in plan.targets)  # shared once
    official = {
        "llamagen_B": 2.0,
        "llamagen_L": 2.0,
        "llamagen_XL": 1.75,
        "llamagen_XXL": 1.75,
        "llamagen_3B": 1.65,
    }
    official |= {
        m: 1.5 for m in ("var_d16", "var_d20", "var_d24", "var_d30")
    }  # LlamaGen GETTING_STARTED, VAR
    guided = {
        (m, g) for m, v, g in plan.target_sets("table2") if v.objective == "base" and g not in (0.0, 1.0)
    }
    assert guided == set(official.items())
    samples = [j for j in plan.jobs() if j.stage.name == "sample"]
    for job in samples:  # the official sampling precision per family
        argv = cli_argv(job.args)
        cfg = load_config(build_parser(argv[0]).parse_args(argv).config)
        want = {"llamagen": "bf16", "var": "fp16"}[job.labels["family"]]
        assert cfg["models"][job.labels["model"]]["sample"].get("precision") in (None, want)
    assert {get_family(f).default_precision for f in ("llamagen", "var")} == {"bf16", "fp16"}


def test_config_values_reach_every_job_typed():
    """`snakemake --config` values (nested ones arrive as strings) become typed --set overrides."""
    plan = snakemake_plan(
        ["config/smoke.yaml"],
        {
            "sample": {"per_class": "3"},
            "finetune": {"lr": "3e-5", "betas": ["0.8", "0.9"]},
            "experiment": "x",
        },
    )
    assert plan.cfg["sample"]["per_class"] == 3 and plan.cfg["experiment"] == "x"
    assert plan.cfg["models"]["llamagen_tiny"]["finetune"]["betas"] == [0.8, 0.9]
    job = next(j for j in plan.jobs() if j.stage.name == "finetune")
    argv = cli_argv(job.args)
    args = build_parser(argv[0]).parse_args(argv)
    again = load_config(args.config, args.overrides)  # what the job itself resolves
    assert again["models"]["llamagen_tiny"]["finetune"] == plan.cfg["models"]["llamagen_tiny"]["finetune"]
    assert again["finetune"]["lr"] == 3e-5 and again["experiment"] == "x"


def test_two_configfiles_are_merged_for_the_plan_and_every_job(tmp_path):
    extra = tmp_path / "more.yaml"
    extra.write_text("sample:\n  per_class: 4\n")
    plan = snakemake_plan(["config/smoke.yaml", str(extra)], {})
    job = plan.jobs()[0]
    argv = cli_argv(job.args)
    args = build_parser(argv[0]).parse_args(argv)
    assert args.config == ["config/smoke.yaml", str(extra)]
    assert (
        load_config(args.config, args.overrides)["sample"]["per_class"]
        == 4
        == plan.cfg["sample"]["per_class"]
    )


def test_lambda_change_touches_only_downstream_jobs():
    cfg = load_config(ROOT / "config" / "config.yaml")
    before = {j.name: j for j in Plan(cfg, "c").jobs()}
    cfg["models"]["llamagen_tiny"]["variants"]["cca"]["lam"] = 2.5
    after = {j.name: j for j in Plan(cfg, "c").jobs()}
    new = set(after) - set(before)
    assert new and all("llamagen_tiny" in n and "cca_lam2p5" in n for n in new)
    assert {after[n].stage.name for n in new} == {"finetune", "sample", "evaluate"}
    assert fmt(2.5) in after[sorted(new)[0]].output
    gone = set(before) - set(after)  # λ 3 stays: fig4 and fig5 sweep it by value
    assert not any("cca_lam3" in n for n in gone)


def test_code_dependencies_are_the_stage_imports():
    plan = plan_of("config/smoke.yaml")
    code: dict[str, set[str]] = {}
    for j in plan.jobs():
        code.setdefault(j.stage.name, set()).update(j.code)
    assert "src/ccalign/sample/shards.py" in code["sample"]
    assert "src/ccalign/tokenizers/llamagen_vq.py" in code["sample"]  # via the family's module
    assert (
        "src/ccalign/data/dataset.py" in code["finetune"] and "src/ccalign/align/step.py" in code["finetune"]
    )
    assert "src/ccalign/report.py" in code["report"]
    users = {stage for stage, files in code.items() if "src/ccalign/report.py" in files}
    assert users == {"report"}
    var_sample = next(j for j in plan.jobs() if j.stage.name == "sample" and j.labels["family"] == "var")
    assert "src/ccalign/families/var.py" in var_sample.code
    assert "src/ccalign/families/llamagen.py" not in var_sample.code
    assert code_files(["ccalign.stages.report"]) == sorted(code["report"])


@pytest.mark.parametrize("stage", ["report", "fetch", "prepare_data"])
def test_light_stages_never_import_torch(stage):
    probe = f"""
import sys
import ccalign.cli, ccalign.stages.{stage}
from ccalign.pipeline import stages
stages()
assert "torch" not in sys.modules, "imported torch"
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr


def test_schema_error_through_snakemake_is_one_line_naming_file_and_key(tmp_path):
    bad = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    bad["sample"]["per_clas"] = 3
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    out = _smk("-n", "--configfile", str(p))
    assert out.returncode != 0
    assert f"{os.path.relpath(p, ROOT)}: unknown key 'per_clas' under sample" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("name", ["config.yaml", "smoke.yaml", "paper.yaml"])
def test_every_model_names_a_known_tokenizer_of_its_family(name):
    cfg = load_config(ROOT / "config" / name)
    for m, spec in cfg["models"].items():
        assert cfg["tokenizers"][spec["tokenizer"]]["family"] == spec["family"], m


def test_plan_command_prints_the_jobs_and_dvc_yaml():
    out = subprocess.run(
        [str(BIN / "ccalign"), "plan", "--config", "config/smoke.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(plan_of("config/smoke.yaml").jobs())
    assert all(shlex.split(line.split(": ", 1)[1])[0] in ("ccalign", "torchrun") for line in lines)


def test_a_job_gets_only_the_overrides_it_reads():
    """A --config value changes the command (a Snakemake param) of the jobs that read it, and no other."""
    plan = snakemake_plan(["config/smoke.yaml"], {"sample": {"per_class": "3"}, "experiment": "x"})
    by_stage: dict[str, set[tuple[str, ...]]] = {}
    for job in plan.jobs():
        sets = tuple(job.args[i + 1] for i, a in enumerate(job.args) if a == "--set")
        by_stage.setdefault(job.stage.name, set()).add(sets)
    assert by_stage["sample"] == {("sample.per_class=3", "experiment=x")}
    assert (
        by_stage["pretrain"] == by_stage["evaluate"] == {("experiment=x",)}
    )  # MLflow's experiment: every job
