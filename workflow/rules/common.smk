# The plan of this invocation and the functions the rules read it with (ccalign.pipeline).
#
# Every rule is one stage of ccalign.stages. Its outputs are the stage's declared patterns (a test holds them
# equal); its inputs, command, config values, code and resources come from the job the plan made for the
# wildcards. The config is validated and resolved by ccalign.config, as `ccalign <stage>` does, and an invalid
# config stops here with one line naming the file (or --config value) and the key.
import json
import os
import sys
import uuid

from ccalign.config import ConfigError
from ccalign.pipeline import code_version, join_args, snakemake_plan
from ccalign.state import after_invocation

CONFIGFILES = [os.path.relpath(f) for f in workflow.overwrite_configfiles] or ["config/config.yaml"]
try:
    PLAN = snakemake_plan(CONFIGFILES, dict(workflow.config_settings.config))  # --config values only
except ConfigError as error:
    sys.exit(f"ccalign: {error}")
ROOT = PLAN.root
# One id for all jobs of this invocation (Slurm jobs inherit it): their MLflow runs are children of one run.
GROUP = os.environ.setdefault("CCALIGN_RUN_GROUP", uuid.uuid4().hex[:12])


wildcard_constraints:
    family=r"[a-z][a-z0-9_]*",
    seed=r"\d+",
    guidance=r"-?[0-9.e+-]+",
    variant=r"base|(cca|dpo|unlearning)_lam[0-9.e+-]+(_beta[0-9.e+-]+)?(_u[0-9.e+-]+)?",
    target=r"[A-Za-z0-9_-]+",


def data(path):
    """A path under the config's data_root."""
    return f"{ROOT}/{path}"


def logs(path):
    return f"{ROOT}/logs/{path}"


def benchmarks(path):
    return f"{ROOT}/benchmarks/{path}"


def targets(stage):
    """Every product of ``stage`` this config asks for."""
    return [j.output for j in PLAN.jobs() if j.stage.name == stage]


def job(stage, wildcards):
    return PLAN.find(stage, dict(wildcards))


def get(stage, name):
    """Input ``name`` of the job (absent on this job: no file)."""
    return lambda wildcards: job(stage, wildcards).inputs.get(name, [])


def command(stage):
    return lambda wildcards: join_args(job(stage, wildcards).args)


def settings(stage):
    """The resolved config values the job reads: a change reruns it (params rerun-trigger)."""
    return lambda wildcards: json.dumps(PLAN.values(job(stage, wildcards)), sort_keys=True, default=str)


def code(stage):
    """Version of the code the job runs (every module it imports): a change reruns it."""
    return lambda wildcards: code_version(job(stage, wildcards).code)


def threads(stage):
    """CPU threads of a job: cpus_per_gpu × GPUs on GPU jobs, else ``cpus``."""

    def n(wildcards):
        r = job(stage, wildcards).resources
        return r["gpus"] * r["cpus_per_gpu"] if r["gpus"] else r["cpus"]

    return n


def resources(stage):
    """Snakemake resources as the Slurm executor plugin reads them (tasks_per_gpu 0: torchrun starts ranks)."""

    def get_resource(key):
        return lambda wildcards: job(stage, wildcards).resources[key]

    return dict(
        mem_mb=get_resource("mem_mb"),
        runtime=get_resource("runtime"),
        # gres is per node (--gpus would be per job: half the GPUs of a 2-node job)
        gres=lambda wildcards: (f"gpu:{n}" if (n := job(stage, wildcards).resources["gpus"]) else ""),
        nodes=get_resource("nodes"),
        cpus_per_gpu=get_resource("cpus_per_gpu"),
        tasks=get_resource("nodes"),
        tasks_per_gpu=0,
        # multi-node jobs run in the batch step ("srun": the executor asks for --ntasks=nodes), not in an
        # `srun -n1` step whose inner srun cannot reach the other nodes; the plugin refuses mpi on 1 task
        mpi=lambda wildcards: "srun" if job(stage, wildcards).resources["nodes"] > 1 else "",
    )


onsuccess:
    # DVC records what ran (dvc.lock + cache); MLflow gets the buffered runs and closes the invocation's run.
    after_invocation(PLAN, GROUP, succeeded=True)


onerror:
    after_invocation(PLAN, GROUP, succeeded=False)
