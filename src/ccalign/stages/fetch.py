"""Stage ``fetch``: download the pretrained artifacts of ``config/weights.yaml`` into the weights folder.

Without ``--only``/``--all`` it fetches the artifacts whose ``<dest>/<file>`` path appears in the config
(model and tokenizer checkpoints, evaluation weights). Each artifact is one MLflow run with its lineage
(origin, revision, size, sha256). Values the manifest leaves null are listed at the end so they can be pinned.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from ccalign.pipeline import Job, Plan, Stage

HELP = "download pretrained weights and reference files (pinned, sha256-checked, resumable, offline-capable)"


def jobs(plan: Plan) -> Iterator[Job]:
    dest = f"{plan.root}/weights"
    for key in plan.weight_keys():
        flags = ["--manifest", plan.weights_manifest, "--only", key, "--dest", dest]
        wildcards = {"artifact": plan.manifest[key]["file"]}
        yield plan.job("fetch", wildcards, {"artifact": key}, {"manifest": plan.weights_manifest}, flags)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", default="config/weights.yaml", metavar="FILE", help="artifact manifest")
    parser.add_argument("--only", nargs="+", metavar="KEY", help="fetch these manifest keys only")
    parser.add_argument("--all", action="store_true", help="fetch every artifact of the manifest")
    parser.add_argument("--dest", default="data/weights", metavar="DIR", help="weights folder")
    parser.add_argument(
        "--lock", default=None, metavar="FILE", help="lock file (default: DEST/weights.lock.json)"
    )
    parser.add_argument(
        "--cache-dir", default=None, metavar="DIR", help="Hugging Face cache (default: $HF_HUB_CACHE)"
    )
    parser.add_argument(
        "--offline", action="store_true", help="never touch the network (also implied by HF_HUB_OFFLINE=1)"
    )


def select(cfg: dict, manifest: dict, args: argparse.Namespace) -> list[str]:
    from ccalign.weights import needed_keys

    """Keys to fetch: ``--only``, else ``--all``, else those the config refers to."""
    if args.only:
        unknown = [k for k in args.only if k not in manifest]
        if unknown:
            raise ValueError(f"{args.manifest}: unknown artifact(s) {unknown}; known: {sorted(manifest)}")
        return list(dict.fromkeys(args.only))
    return list(manifest) if args.all else needed_keys(cfg, manifest, args.dest)


def main(cfg: dict, args: argparse.Namespace) -> None:
    from ccalign.log import get_logger
    from ccalign.tracking import stage_run
    from ccalign.weights import ChecksumError, fetch, load_manifest

    log = get_logger("fetch")
    manifest = load_manifest(args.manifest)
    keys = select(cfg, manifest, args)
    if not keys:
        log.info(
            "the config refers to no artifact of %s under %s; nothing to fetch", args.manifest, args.dest
        )
    fetched = []
    for key in keys:
        a = manifest[key]
        labels = {**args.labels, "artifact": key}
        declared = {"file": a.file, "origin": a.origin, "size": a.size, "sha256": a.sha256}
        declared.update({"revision": a.revision} if a.hf_repo else {})
        # as the manifest declares them ("null" where it leaves a value open)
        params = {f"artifact.{k}": "null" if v is None else v for k, v in declared.items()}
        with stage_run(cfg, SPEC.name, labels, params=params, tags={"origin": a.origin}) as run:
            try:
                got = fetch(a, args.dest, lock_path=args.lock, offline=args.offline, cache_dir=args.cache_dir)
            except ChecksumError as e:
                log.error("%s", e)
                raise SystemExit(1) from e
            lineage = {"sha256": got.sha256, "size": got.size, "action": got.action}
            lineage.update({"revision": got.revision} if a.hf_repo else {})
            run.set_tags({k: str(v) for k, v in lineage.items()})
            run.log_params({f"fetched.{k}": v for k, v in lineage.items()})
            run.log_metrics({"bytes": got.size})
        log.info("%s: %s %s (%d bytes, sha256 %s)", key, got.action, got.path, got.size, got.sha256)
        fetched.append(got)
    for g in (g for g in fetched if g.unpinned):
        values = {"size": g.size, "sha256": g.sha256, "revision": g.revision}
        log.warning(
            "%s is not pinned in %s; recorded in the lock, pin it with: %s",
            g.key,
            args.manifest,
            ", ".join(f"{n}: {values[n]}" for n in g.unpinned),
        )


SPEC = Stage(
    name="fetch",
    help=HELP,
    outputs={"weights": "weights/{artifact}"},
    jobs=jobs,
    add_arguments=add_arguments,
    main=main,
)
