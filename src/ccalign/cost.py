"""GPU-hours a plan will cost, from the throughputs measured on GPUs (``benchmarks/results/*.json``).

A job's cost is its images divided by the measured images/s of its stage for the same model preset (and
guidance, for sampling), our path, on a GPU: fine-tuning ``dataset.num_images × epochs``, sampling
``per_class × classes``, evaluation the samples plus the reference, tokenizing ``dataset.num_images``. A job
with no measurement for its model is counted as unmeasured, never guessed; CPU-only stages cost no GPU time.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ccalign.config import REPO_ROOT
from ccalign.pipeline import Job, Plan

RESULTS = REPO_ROOT / "benchmarks" / "results"
GPU_STAGES = {"tokenize", "pretrain", "finetune", "sample", "evaluate"}
REFERENCE_IMAGES = 10_000  # ADM's ImageNet 256 reference batch (statistics stored: only its presence counts)


def measurements(folder: Path = RESULTS) -> list[dict]:
    """Every GPU record of our path in the benchmark result files (records name their ``stage``, or the file
    does: bench_train → finetune, bench_sample / bench_generate → sample)."""
    found = []
    for path in sorted(folder.glob("*.json")):
        stage = {"train": "finetune", "sample": "sample", "generate": "sample"}
        stage = next((s for key, s in stage.items() if key in path.stem), None)
        for r in json.loads(path.read_text()):
            if r.get("path") == "ours" and r.get("device", "cpu") != "cpu" and r.get("images_per_s"):
                found.append({"stage": stage, **r, "file": path.name})
    return found


def preset(cfg: dict, job: Job) -> str | None:
    """The model (or tokenizer) preset a job runs: "GPT-L", "d16", "VQ-16", ...; None without one."""
    if "model" in job.labels:
        return cfg["models"][job.labels["model"]]["args"].get("preset")
    if "tokenizer" in job.labels:
        return cfg["tokenizers"][job.labels["tokenizer"]]["args"].get("preset")
    return None


def images(cfg: dict, job: Job) -> int | None:
    """The images a GPU job processes (None where the config does not say how many)."""
    stage, n = job.stage.name, cfg["dataset"].get("num_images")
    if stage in ("finetune", "pretrain"):
        return None if n is None else int(n * cfg["models"][job.labels["model"]][stage]["epochs"])
    if stage == "tokenize":
        return n
    samples = cfg["models"][job.labels["model"]]["sample"]["per_class"] * cfg["dataset"]["num_classes"]
    return samples + (REFERENCE_IMAGES if stage == "evaluate" else 0)


def throughput(cfg: dict, job: Job, records: list[dict]) -> dict | None:
    """The best measured record for ``job``: same stage and preset (and guidance kind when sampling)."""
    stage, model, kind = job.stage.name, preset(cfg, job), None
    if stage == "sample":
        from ccalign.families import get_family  # facts only

        free = get_family(job.labels["family"]).guidance_free
        kind = "free" if float(job.labels["guidance"]) == free else "cfg"
    wanted = "inception" if stage == "evaluate" else model
    fits = [
        r
        for r in records
        if r["stage"] == ("finetune" if stage == "pretrain" else stage)
        and r.get("model") == wanted
        and (kind is None or r.get("guidance") == kind)
    ]
    return max(fits, key=lambda r: r["images_per_s"], default=None)


def gpu_hours(plan: Plan, jobs: list[Job], records: list[dict] | None = None) -> dict[str, dict]:
    """Per stage: jobs, GPU-hours of the measured ones, and how many are unmeasured."""
    records = measurements() if records is None else records
    out: dict[str, dict] = defaultdict(
        lambda: {"jobs": 0, "gpu_hours": 0.0, "unmeasured": 0, "devices": set()}
    )
    for job in jobs:
        row = out[job.stage.name]
        row["jobs"] += 1
        if job.stage.name not in GPU_STAGES or job.resources["gpus"] == 0:
            continue  # a CPU job
        record, n = throughput(plan.cfg, job, records), images(plan.cfg, job)
        if record is None or n is None:
            row["unmeasured"] += 1
        else:
            row["gpu_hours"] += n / record["images_per_s"] / 3600
            row["devices"].add(record["device"])
    return dict(out)
