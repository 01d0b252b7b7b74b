"""``ccalign evaluate``: FID, sFID, IS, Precision/Recall (and class accuracy) of one samples.npz.

``--extractor inception`` follows the ADM protocol with torch-fidelity's TF-compatible Inception and its
weights from a local file; ``--extractor domain`` uses the classifier from ``train-classifier``. Writes
``metrics.json`` atomically: the job's labels (what the report groups by), the metrics, n, the reference, the
extractor and the sha256 of every input. Settings: ``evaluate``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from ccalign.pipeline import Job, Plan, Stage

HELP = "FID/sFID/IS/Precision/Recall of a samples.npz against a reference batch (ADM protocol)"


def jobs(plan: Plan) -> Iterator[Job]:
    ref = plan.reference()
    # the dataset's own val folder is a product of prepare-data (if any); anything else is an input file
    ref_inputs = plan.dataset_inputs() if ref.startswith(plan.dataset_dir()) else {"reference": ref}
    ev, extractor = plan.cfg["evaluate"], []
    if ev["extractor"] == "domain":
        extractor = ["--classifier", plan.path("train_classifier", dataset=plan.cfg["dataset"]["name"])]
        ref_inputs = {**ref_inputs, "classifier": extractor[1]}
    elif ev["inception_weights"] in plan.manifest:  # fetched: a product of the fetch stage
        extractor = ["--inception-weights", plan.weights_file(ev["inception_weights"])]
        ref_inputs = {**ref_inputs, "inception": extractor[1]}
    for wildcards, labels, _ in plan.sample_sets():
        samples = plan.path("sample", **wildcards)
        flags = ["--samples", samples, "--reference", ref, *extractor]
        flags += ["--out", plan.path("evaluate", **wildcards)]
        model = wildcards["model"]
        yield plan.job("evaluate", wildcards, labels, {"samples": samples, **ref_inputs}, flags, model=model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--samples", required=True, type=Path, help="samples.npz (arr_0 N×H×W×3 uint8, labels)"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="reference batch .npz (ADM; arr_0 and optional mu/sigma/mu_s/sigma_s) or image "
        "folder <class>/*.png (default: evaluate.reference)",
    )
    parser.add_argument(
        "--extractor",
        choices=["inception", "domain"],
        default=None,
        help="feature extractor (default: evaluate.extractor)",
    )
    parser.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        help="inception-v3-compat weights file (default: evaluate.inception_weights)",
    )
    parser.add_argument(
        "--classifier", type=Path, default=None, help="domain classifier from train-classifier"
    )
    parser.add_argument("--out", required=True, type=Path, help="metrics.json to write")


def main(cfg: dict, args: argparse.Namespace) -> None:
    import time

    from ccalign.device import resolve_device
    from ccalign.families import get_family
    from ccalign.io import atomic_write_json, sha256_file
    from ccalign.log import get_logger
    from ccalign.metrics.features import domain_features, inception
    from ccalign.metrics.images import NpzImages, content_sha256
    from ccalign.metrics.protocol import ImageSet, evaluate
    from ccalign.tracking import stage_run

    log = get_logger("evaluate")
    ecfg = cfg["evaluate"]
    settings = {k: ecfg[k] for k in ("batch_size", "device", "is_split_size", "prc_k", "prc_batch_size")}
    extractor = args.extractor or ecfg["extractor"]
    reference_path = args.reference or ecfg["reference"]
    if reference_path is None:
        raise ValueError("no reference: pass --reference or set evaluate.reference")
    if extractor == "inception":
        weights = args.inception_weights or ecfg["inception_weights"]
        if weights is None:
            raise ValueError("--extractor inception needs --inception-weights or evaluate.inception_weights")
        extractor_file = Path(weights)
        features = inception(extractor_file)
    else:
        if args.classifier is None:
            raise ValueError("--extractor domain needs --classifier (the train-classifier checkpoint)")
        extractor_file = args.classifier
        features = domain_features(extractor_file)
    samples = ImageSet(args.samples, npz=NpzImages(args.samples))
    reference = ImageSet.open(reference_path)
    classes = samples.npz.labels() if extractor == "domain" else None
    device = resolve_device(settings["device"])

    hashes = {
        "samples_sha256": sha256_file(args.samples),
        "reference_sha256": content_sha256(reference_path),
        "extractor_sha256": sha256_file(extractor_file),
    }
    tags = {"extractor": extractor} | {f"input.{k.replace('_', '.')}": v for k, v in hashes.items()}
    params = {f"evaluate.{k}": v for k, v in settings.items()} | {"evaluate.extractor": extractor}
    lineage = dict(args.labels)  # the report reads this, and whether the set was sampled with guidance
    if "family" in lineage and "guidance" in lineage:
        free = get_family(lineage["family"]).guidance_free
        lineage["guided"] = str(float(lineage["guidance"]) != free).lower()
    with stage_run(cfg, SPEC.name, args.labels, tags=tags, params=params) as run:
        t0 = time.perf_counter()
        metrics = evaluate(
            samples,
            reference,
            features,
            settings,
            labels=classes,
            use_stored_stats=extractor == "inception",
            device=device,
        )
        seconds = time.perf_counter() - t0
        log.info("metrics of %s: %s", args.samples, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        record = {
            "labels": lineage,
            "metrics": metrics,
            "n": len(samples),
            "n_reference": len(reference),
            "samples": str(args.samples),
            "reference": str(reference_path),
            "extractor": extractor,
            "extractor_file": str(extractor_file),
            **hashes,
            "settings": settings,
        }
        atomic_write_json(record, args.out)
        run.log_metrics(metrics | {"eval_seconds": seconds, "s_per_image": seconds / len(samples)})
        run.log_artifact(args.out)


SPEC = Stage(
    name="evaluate",
    help=HELP,
    outputs={"metrics": "eval/{family}/{model}/seed{seed}/{variant}/g{guidance}/metrics.json"},
    jobs=jobs,
    add_arguments=add_arguments,
    main=main,
    params=("evaluate",),
)
