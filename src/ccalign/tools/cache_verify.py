"""``ccalign cache-verify``: rehash every shard of a code cache; name each bad file and exit non-zero."""

from __future__ import annotations

import argparse

HELP = "check a code cache: every missing, truncated or corrupt shard is named; exit status 1 if any"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", required=True, metavar="DIR", help="cache directory (holds manifest.json)")


def main(args: argparse.Namespace) -> None:
    from ccalign.data.cache import load_manifest, verify_cache
    from ccalign.log import get_logger

    log = get_logger("cache-verify")
    problems = verify_cache(args.cache)
    for p in problems:
        log.error("%s: %s", args.cache, p)
    if problems:
        raise SystemExit(1)
    m = load_manifest(args.cache)
    log.info(
        "%s: OK — %d shards, %d images × %d views × %d codes",
        args.cache,
        len(m["shards"]),
        m["num_images"],
        m["num_views"],
        m["seq_len"],
    )
