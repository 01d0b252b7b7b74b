"""``ccalign <stage> --config FILE [--set key=value ...] [stage flags]``.

One stage = one subcommand = one Snakemake rule = one DVC stage. Each stage module in ``ccalign.stages``
defines ``HELP``, ``add_arguments(parser)`` and ``main(cfg, args)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ccalign.config import ConfigError, load_config
from ccalign.errors import describe
from ccalign.log import get_logger

# Stages in pipeline order (module names in ccalign.stages; the subcommand uses '-' for '_').
STAGES = (
    "prepare_data",
    "fetch",
    "train_tokenizer",
    "tokenize",
    "cache_verify",
    "train_classifier",
    "pretrain",
    "finetune",
    "sample",
    "evaluate",
    "report",
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI; with ``only`` just that stage is imported (a stage's start-up pays for its own imports)."""
    parser = argparse.ArgumentParser(
        prog="ccalign",
        description="Condition Contrastive Alignment pipeline: each subcommand is one stage of the DAG "
        "(see README). Settings come from a validated YAML config; inputs and outputs are flags.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name in [only] if only else STAGES:
        module = importlib.import_module(f"ccalign.stages.{name}")
        p = sub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        p.add_argument(
            "--config",
            default="config/config.yaml",
            metavar="FILE",
            help="experiment config (YAML, validated against workflow/schemas/config.schema.yaml)",
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one config value, dotted key, YAML value (repeatable)",
        )
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = argv[0].replace("-", "_") if argv else ""
    args = build_parser(first if first in STAGES else None).parse_args(argv)
    log = get_logger("cli")
    try:
        cfg = load_config(args.config, args.overrides)
        args._module.main(cfg, args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    except Exception as e:  # a full disk, a busy output, a failed download: one line, no traceback
        if (message := describe(e)) is None:
            raise
        log.error("%s", message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
