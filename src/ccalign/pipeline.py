"""The pipeline as data: stage declarations and the plan of jobs one config asks for.

Each module of ``ccalign.stages`` declares its stage once, as ``SPEC = Stage(...)``: its name (CLI subcommand,
Snakemake rule, DVC stage prefix, MLflow ``stage`` tag), its outputs, the config keys it reads, and a function
that lists its jobs for a config. Everything else is derived here: the CLI parser (``ccalign.cli``), every
job's command, inputs, outputs, resources and config values (the Snakefile's rules call :class:`Plan`),
``dvc.yaml`` (:func:`dvc_yaml`), and the code each job depends on (:func:`code_files`, from the stage's real
imports).

Paths follow ``<data_root>/<stage>/{family}/{model}/seed{seed}/...``; a fine-tuned variant is
``<objective>_lam<λ>`` and the base model's variant is ``base``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import pkgutil
import shlex
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from ccalign.config import REPO_ROOT, ConfigError, defaults, load_config, lookup, parse_value, read_yaml

PACKAGE = "ccalign"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, declared next to its code."""

    name: str  # module name = Snakemake rule = DVC stage prefix = MLflow "stage" tag; CLI uses '-' for '_'
    help: str
    outputs: dict[str, str]  # named output patterns under data_root; the first is the stage's product
    jobs: Callable[[Plan], Iterable[Job]]  # the jobs a config asks for
    add_arguments: Callable  # (argparse parser) -> None: the stage's own flags
    main: Callable  # (resolved config, parsed args) -> None: the work
    params: tuple[str, ...] = ()  # config keys it reads; "{model}" / "{tokenizer}" are filled per job
    folder: bool = False  # the product's folder is the artifact (DVC versions it whole)
    persist: bool = False  # resumable state lives beside the outputs: DVC must not delete them first

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    @property
    def module(self) -> str:
        return self.main.__module__


@dataclass
class Job:
    """One run of a stage: what it reads, writes and runs."""

    stage: Stage
    wildcards: dict[str, str]  # fill the stage's output patterns
    labels: dict[str, str]  # lineage: family, model, seed, objective, lambda, guidance, ... (MLflow tags)
    inputs: dict[str, str | list[str]]
    outputs: dict[str, str]  # the stage's outputs and "record" (the job's resolved config and lineage)
    args: list[str]  # the full command, launcher included
    params: list[str]  # config keys it depends on
    resources: dict[str, Any]
    code: list[str] = field(default_factory=list)  # source files (repo-relative) whose change reruns it

    @property
    def name(self) -> str:
        parts = [self.stage.name, *self.wildcards.values()]
        return "-".join(p.replace(".", "p").replace("/", "_") for p in parts)

    @property
    def output(self) -> str:
        """The stage's product (the first declared output)."""
        return self.outputs[next(iter(self.stage.outputs))]

    @property
    def input_files(self) -> list[str]:
        return [p for v in self.inputs.values() for p in ([v] if isinstance(v, str) else v)]


@dataclass(frozen=True)
class Variant:
    """The base model, or one fine-tuning run: objective and λ, and β / uncond_ratio where they differ from
    the model's finetune settings."""

    objective: str  # "base" or one of ccalign.align.OBJECTIVES
    lam: float | None = None
    beta: float | None = None
    uncond_ratio: float | None = None

    @property
    def name(self) -> str:
        """As in paths: ``base``, ``cca_lam300``, ``cca_lam1_beta0.1``."""
        if self.objective == "base":
            return "base"
        extra = "".join(
            f"_{k}{fmt(v)}" for k, v in (("beta", self.beta), ("u", self.uncond_ratio)) if v is not None
        )
        return f"{self.objective}_lam{fmt(self.lam)}{extra}"

    def labels(self) -> dict[str, str]:
        fields = {"lambda": self.lam, "beta": self.beta, "uncond_ratio": self.uncond_ratio}
        return {"objective": self.objective} | {k: fmt(v) for k, v in fields.items() if v is not None}


BASE = Variant("base")


def guidance_scale(cfg: dict, model: str, value: float | str) -> float:
    """A guidance scale of a target or paper row: a number, "free" (the family's guidance-free scale) or
    "cfg" (the model's published scale)."""
    from ccalign.families import get_family  # facts only: no model code is imported

    m = cfg["models"][model]
    return float({"free": get_family(m["family"]).guidance_free, "cfg": m.get("cfg_scale")}.get(value, value))


def target_sets(cfg: dict, target: str) -> list[tuple[str, Variant, float]]:
    """(model, variant, guidance) of every sample set of ``target``, in the config's order, each once."""
    t, out = cfg["targets"][target], []
    for model in t.get("models", cfg["models"]):
        named = cfg["models"][model].get("variants") or {}
        for s in t["sets"]:
            if model not in s.get("models", [model]):
                continue
            for variant in expand_variant(s["variant"], named):
                out += [(model, variant, guidance_scale(cfg, model, g)) for g in s["guidance"]]
    return list(dict.fromkeys(out))


def expand_variant(spec: str | dict, named: dict[str, dict]) -> list[Variant]:
    """A target's variant: "base", a name of the model's ``variants``, or a mapping whose ``lam`` may be a
    list (one variant per λ)."""
    if spec == "base":
        return [BASE]
    spec = dict(named[spec]) if isinstance(spec, str) else dict(spec)
    lams = spec.pop("lam")
    return [Variant(lam=float(lam), **spec) for lam in (lams if isinstance(lams, list) else [lams])]


# -- stages -------------------------------------------------------------------------------------------------
@cache
def stages() -> dict[str, Stage]:
    """Every stage declared in ``ccalign.stages``, by name (imports only the light stage modules)."""
    package = importlib.import_module(f"{PACKAGE}.stages")
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        spec = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "SPEC", None)
        if isinstance(spec, Stage):
            if spec.name != info.name:
                raise ValueError(f"ccalign.stages.{info.name} declares a stage named {spec.name!r}")
            found[spec.name] = spec
    return found


def record_path(product: str) -> str:
    """The job record beside a stage's product: ``.../model.pt`` -> ``.../model.pt.job.json``."""
    return f"{product}.job.json"


def fmt(x: float) -> str:
    """Number as it appears in paths: 1000.0 → "1000", 0.5 → "0.5", -1 → "-1"."""
    return f"{float(x):g}"


def labels_arg(labels: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def join_args(args: Sequence[str]) -> str:
    """Join a job's argv for a shell; ``$(...)`` rendezvous expressions stay unquoted."""
    return " ".join(a if "$" in a else shlex.quote(a) for a in args)


# -- code dependencies --------------------------------------------------------------------------------------
PACKAGE_DIR = Path(__file__).resolve().parent


def _module_file(name: str) -> Path | None:
    """The source file of module ``name`` of this package, found on disk without importing anything."""
    if name.split(".")[0] != PACKAGE:
        return None
    path = PACKAGE_DIR.joinpath(*name.split(".")[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(module: str) -> set[str]:
    """Modules of this package that ``module`` imports anywhere in its text (function-level imports too)."""
    file = _module_file(module)
    tree = ast.parse(file.read_text(), str(file))
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return {m for m in found if _module_file(m) is not None}


@cache
def _closure(module: str) -> frozenset[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run their __init__
        todo += sorted(_imports(m) - seen)
    return frozenset(seen)


def code_files(modules: Iterable[str]) -> list[str]:
    """Source files of ``modules`` and of every ccalign module they import, transitively: repo-relative.
    A module outside this package (a family registered by another package) counts as its own file."""
    found = set()
    for module in modules:
        if _module_file(module) is None:
            spec = importlib.util.find_spec(module)
            found.add(str(Path(spec.origin).resolve()))
            continue
        for m in _closure(module):
            found.add(str(_module_file(m).relative_to(REPO_ROOT)))
    return sorted(found)


def code_version(files: Iterable[str]) -> str:
    """sha256 over the contents of ``files`` (repo-relative): changes exactly when one of them does."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.encode() + b"\0" + (REPO_ROOT / f).read_bytes() + b"\0")
    return h.hexdigest()


GLOBAL_KEYS = ("data_root", "experiment", "tracking")  # every job reads them (paths, MLflow)


def job_params(spec: Stage, labels: dict[str, str], cfg: dict) -> list[str]:
    """The config keys a job of ``spec`` reads, for its model and tokenizer."""
    model = labels.get("model")
    tokenizer = labels.get("tokenizer") or (cfg["models"][model]["tokenizer"] if model else None)
    return [p.format(model=model, tokenizer=tokenizer) for p in spec.params]


def reads(params: Sequence[str], override: str) -> bool:
    """Whether a job reading ``params`` reads the key an override ``key=value`` sets (or a key inside it).
    A top-level section (``finetune.lr``) is read by the jobs that read it, the models' own merged from it."""
    key = override.partition("=")[0].split(".")
    if key[0] in GLOBAL_KEYS:
        return True
    return any(key[: len(p.split("."))] == p.split(".")[: len(key)] for p in params)


def job_code(spec: Stage, labels: dict[str, str]) -> list[str]:
    """The source files a job of ``spec`` runs: the stage module's imports and its family's module."""
    modules = [spec.module]
    if "family" in labels:
        from ccalign.families import family_module

        modules.append(family_module(labels["family"]))
    return code_files(modules)


# -- the plan -----------------------------------------------------------------------------------------------
class Plan:
    """All jobs one resolved config asks for, as the CLI, Snakemake and DVC see them."""

    def __init__(
        self,
        cfg: dict,
        configfiles: str | Sequence[str],
        overrides: Sequence[str] = (),
        weights_manifest: str = "config/weights.yaml",
    ) -> None:
        self.cfg = cfg
        self.configfiles = [configfiles] if isinstance(configfiles, str | Path) else list(configfiles)
        self.configfiles = [str(f) for f in self.configfiles]
        self.overrides = list(overrides)  # --set values every job gets (Snakemake's --config)
        self.root = cfg["data_root"]
        self.weights_manifest = weights_manifest
        self.stages = stages()
        self._jobs: list[Job] | None = None

    # -- paths of other stages' products (the stage functions build their jobs with these) ------------------
    def path(self, stage: str, output: str | None = None, **wildcards: Any) -> str:
        outputs = self.stages[stage].outputs
        return f"{self.root}/" + outputs[output or next(iter(outputs))].format(**wildcards)

    @property
    def manifest(self) -> dict:
        path = Path(self.weights_manifest)
        return (read_yaml(path).get("artifacts") or {}) if path.is_file() else {}

    def weights_file(self, key: str) -> str:
        if key not in self.manifest:
            raise KeyError(f"weights key {key!r} is not in {self.weights_manifest}")
        return self.path("fetch", artifact=self.manifest[key]["file"])

    def weight_keys(self) -> list[str]:
        """Manifest keys this config downloads: released models and tokenizers, evaluation files."""
        cfg, ev = self.cfg, self.cfg["evaluate"]
        keys = {e["weights"] for s in ("tokenizers", "models") for e in cfg[s].values() if e.get("weights")}
        keys |= {k for k in (ev.get("reference"), ev.get("inception_weights")) if k in self.manifest}
        if ev["extractor"] != "inception":
            keys.discard(ev.get("inception_weights"))
        return sorted(keys)

    def dataset_dir(self) -> str:
        ds = self.cfg["dataset"]
        return ds["root"] or f"{self.root}/raw/{ds['name']}"

    def dataset_inputs(self) -> dict[str, str]:
        """The product a job reading the image folder depends on (none for a folder the user provides)."""
        ds = self.cfg["dataset"]
        return (
            {} if ds["source"] == "imagefolder" else {"data": self.path("prepare_data", dataset=ds["name"])}
        )

    def tokenizer_ckpt(self, name: str) -> str:
        tok = self.cfg["tokenizers"][name]
        if tok["weights"]:
            return self.weights_file(tok["weights"])
        return tok["checkpoint"] or self.path("train_tokenizer", tokenizer=name)

    def cache_manifest(self, tokenizer: str) -> str:
        return self.path("tokenize", tokenizer=tokenizer)

    def base_ckpt(self, model: str, seed: int | str) -> str:
        m = self.cfg["models"][model]
        if m["weights"]:
            return self.weights_file(m["weights"])
        return m["checkpoint"] or self.path("pretrain", family=m["family"], model=model, seed=seed)

    def model_ckpt(self, model: str, seed: int | str, variant: Variant) -> str:
        if variant.objective == "base":
            return self.base_ckpt(model, seed)
        family = self.cfg["models"][model]["family"]
        return self.path("finetune", family=family, model=model, seed=seed, variant=variant.name)

    def reference(self) -> str:
        ref = self.cfg["evaluate"]["reference"]
        if ref:
            return self.weights_file(ref) if ref in self.manifest else ref
        return f"{self.dataset_dir()}/val"

    # -- what the config asks for ---------------------------------------------------------------------------
    @property
    def targets(self) -> list[str]:
        return list(self.cfg["targets"])

    def target_sets(self, target: str) -> list[tuple[str, Variant, float]]:
        return target_sets(self.cfg, target)

    def sample_points(self, model: str) -> list[tuple[Variant, float]]:
        """(variant, guidance) of every sample set of ``model`` any target needs, each once."""
        points = [(v, g) for t in self.targets for m, v, g in self.target_sets(t) if m == model]
        return list(dict.fromkeys(points))

    def sample_set(self, model: str, seed: int, variant: Variant, guidance: float) -> tuple[dict, dict]:
        """(wildcards, labels) of one sample set: a variant of a model at a guidance scale, for a seed."""
        family = self.cfg["models"][model]["family"]
        wildcards = {"family": family, "model": model, "seed": seed, "variant": variant.name}
        labels = {"family": family, "model": model, "seed": seed, **variant.labels()}
        return wildcards | {"guidance": fmt(guidance)}, labels | {"guidance": fmt(guidance)}

    def sample_sets(self) -> Iterator[tuple[dict, dict, str]]:
        """(wildcards, labels, checkpoint) of every sample set the targets need, for every training seed."""
        for model in self.cfg["models"]:
            for seed in self.cfg["seeds"]:
                for variant, g in self.sample_points(model):
                    wildcards, labels = self.sample_set(model, seed, variant, g)
                    yield wildcards, labels, self.model_ckpt(model, seed, variant)

    def finetune_runs(self, model: str) -> list[Variant]:
        """Every fine-tuning run of ``model`` the sample sets need."""
        return list(dict.fromkeys(v for v, _ in self.sample_points(model) if v.objective != "base"))

    # -- jobs -----------------------------------------------------------------------------------------------
    def resources(self, stage: str, model: str | None = None) -> dict[str, Any]:
        """Schema defaults, overlaid with ``resources.<stage>`` and ``models.<model>.resources.<stage>``."""
        res = {**defaults("resources"), **(self.cfg["resources"].get(stage) or {})}
        if model:
            res.update((self.cfg["models"][model].get("resources") or {}).get(stage) or {})
        return res

    def job(
        self,
        stage: str,
        wildcards: dict[str, Any],
        labels: dict[str, Any],
        inputs: dict[str, str | list[str]],
        flags: Sequence[str],
        model: str | None = None,
    ) -> Job:
        """A job of ``stage``: its outputs from the wildcards, its command from the stage's ``flags``."""
        spec = self.stages[stage]
        wildcards = {k: str(v) for k, v in wildcards.items()}
        labels = {k: str(v) for k, v in labels.items()}
        outputs = {
            name: f"{self.root}/" + pattern.format(**wildcards) for name, pattern in spec.outputs.items()
        }
        outputs["record"] = record_path(outputs[next(iter(spec.outputs))])
        resources = self.resources(stage, model)
        params = job_params(spec, labels, self.cfg)
        # only the overrides the job reads: a value it does not read must not change its command (Snakemake
        # reruns a job whose params change, and the command is one of them)
        sets = [x for o in self.overrides if reads(params, o) for x in ("--set", o)]
        configs = [x for f in self.configfiles for x in ("--config", f)]
        args = ["ccalign", spec.command, *configs, *sets, "--labels", labels_arg(labels)]
        args += ["--record", outputs["record"], *flags]
        return Job(
            stage=spec,
            wildcards=wildcards,
            labels=labels,
            inputs=dict(inputs),
            outputs=outputs,
            args=launch(args, resources),
            params=params,
            resources=resources,
            code=job_code(spec, labels),
        )

    def jobs(self) -> list[Job]:
        """Every job, each stage's after those it reads from."""
        if self._jobs is None:
            jobs = [job for spec in self.stages.values() for job in spec.jobs(self)]
            self._jobs = _dependency_order(jobs)
        return self._jobs

    def needed(self, targets: Sequence[str]) -> list[Job]:
        """The jobs ``targets`` need: their report jobs and every job those read from, in dependency order."""
        unknown = sorted(set(targets) - set(self.targets))
        if unknown:
            raise ConfigError(f"unknown target(s) {unknown}; the config's targets: {self.targets}")
        producer = {p: j for j in self.jobs() for p in j.outputs.values()}
        todo = [self.find("report", {"target": t}) for t in targets]
        keep: set[int] = set()
        while todo:
            job = todo.pop()
            if id(job) not in keep:
                keep.add(id(job))
                todo += [producer[p] for p in job.input_files if p in producer]
        return [j for j in self.jobs() if id(j) in keep]

    def find(self, stage: str, wildcards: dict) -> Job:
        """The job of ``stage`` whose wildcards match (Snakemake input functions call this)."""
        for job in self.jobs():
            if job.stage.name == stage and all(job.wildcards.get(k) == str(v) for k, v in wildcards.items()):
                return job
        raise KeyError(f"no {stage} job for {dict(wildcards)} in this config")

    def values(self, job: Job) -> dict[str, Any]:
        """The resolved config values ``job`` reads (its params), as the job itself resolves them."""
        return {key: lookup(self.cfg, key) for key in job.params}


def launch(args: list[str], res: dict[str, Any]) -> list[str]:
    """Multi-GPU jobs run under torchrun; multi-node ones take the rendezvous from Slurm."""
    gpus, nodes = res["gpus"], res["nodes"]
    if gpus <= 1 and nodes <= 1:
        return args
    run = ["torchrun", f"--nproc_per_node={max(gpus, 1)}", f"--nnodes={nodes}"]
    if nodes > 1:
        # Snakemake's Slurm jobstep runs this in the batch step (the rule's "mpi" resource) with every SLURM_*
        # variable but SLURM_JOB_ID removed: name the node and task counts, and find the nodes from the job
        run = [
            "srun",
            "--overlap",
            f"--nodes={nodes}",
            f"--ntasks={nodes}",
            "--ntasks-per-node=1",
            *run,
            "--rdzv_backend=c10d",
            "--rdzv_endpoint=$(scontrol show hostnames $(squeue -h -o %N -j $SLURM_JOB_ID) | head -n1):29500",
            "--rdzv_id=$SLURM_JOB_ID",
        ]
    return [*run, "-m", PACKAGE, *args[1:]]


def _dependency_order(jobs: list[Job]) -> list[Job]:
    """``jobs`` ordered so that every job comes after the jobs whose outputs it reads (stable otherwise)."""
    producer = {path: job for job in jobs for path in job.outputs.values()}
    done: set[int] = set()
    ordered: list[Job] = []

    def visit(job: Job) -> None:
        if id(job) in done:
            return
        done.add(id(job))
        for path in job.input_files:
            if path in producer:
                visit(producer[path])
        ordered.append(job)

    for job in jobs:
        visit(job)
    return ordered


def wildcard_names(pattern: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(pattern) if name]


# -- Snakemake ----------------------------------------------------------------------------------------------
def snakemake_plan(configfiles: Sequence[str], config_values: dict[str, Any]) -> Plan:
    """The plan of one Snakemake invocation: its ``--configfile``s merged in order, and its ``--config``
    values passed to every job as ``--set`` overrides.

    Snakemake reads a nested ``--config`` value loosely (``sample={per_class: 3}`` arrives as ``{"per_class":
    "3"}``); every string is read again as YAML, so the job gets the value Snakemake planned with.
    """
    overrides = [f"{key}={_render(value)}" for key, value in _leaves(_typed(config_values))]
    cfg = load_config(configfiles, overrides)
    taken = sorted(set(cfg["targets"]) & {*stages(), "all", "paper"})
    if taken:
        raise ConfigError(f"{' + '.join(configfiles)}: targets {taken} are named like a rule; rename them")
    return Plan(cfg, configfiles, overrides)


def _typed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return parse_value(value) if isinstance(value, str) else value


def _leaves(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [(f"{prefix}{k}", v)]
    return out


def _render(value: Any) -> str:
    """A value as ``--set`` text: plain when YAML reads it back unchanged, else JSON (which YAML reads)."""
    if isinstance(value, str) and parse_value(value) == value:
        return value
    return json.dumps(value)


# -- DVC ----------------------------------------------------------------------------------------------------
def dvc_yaml(plan: Plan) -> dict:
    """``dvc.yaml`` for ``plan``: the same jobs, with deps (inputs + code), params and outs."""
    raw: dict = {}
    for f in plan.configfiles:  # DVC reads params from the files as written
        raw[f] = read_yaml(f)
    folders = {j.outputs[next(iter(j.stage.outputs))] for j in plan.jobs() if j.stage.folder}
    stages = {}
    for job in plan.jobs():
        product = job.output
        # a folder product is the artifact (its record lives inside it); else every output file
        outs = [str(Path(product).parent)] if job.stage.folder else list(job.outputs.values())
        deps = {str(Path(d).parent) if d in folders else d for d in job.input_files}
        stage: dict[str, Any] = {
            "cmd": join_args(job.args),
            "deps": sorted(deps) + job.code,
            "outs": [{o: {"persist": job.stage.persist}} if job.stage.persist else o for o in outs],
        }
        params = [
            {f: keys}
            for f, data in raw.items()
            if (keys := [k for k in job.params if lookup(data, k) is not None])
        ]
        if params:
            stage["params"] = params
        stages[job.name] = stage
    return {"stages": stages}
