"""``ccalign <command> [--config FILE ...] [--set key=value ...] [flags]``.

Every pipeline stage is one subcommand, declared once in ``ccalign.stages`` (see
:class:`ccalign.pipeline.Stage`); the tools ``plan`` and ``cache-verify`` are the others. Settings come from
validated YAML configs (several are merged in order) and ``--set`` overrides; inputs and outputs are flags.
A job of the plan also passes ``--labels`` (its lineage: MLflow tags, run name) and ``--record`` (where the
resolved config it ran with is written once it succeeds).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ccalign.config import ConfigError, load_config
from ccalign.device import world
from ccalign.errors import describe
from ccalign.log import get_logger
from ccalign.pipeline import Stage, stages

DEFAULT_CONFIG = "config/config.yaml"
TOOLS = {"plan": "ccalign.tools.plan", "cache-verify": "ccalign.tools.cache_verify"}  # command → module


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` (repeatable, merged in order) and ``--set``: the flags every command that reads a config
    takes."""
    parser.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="experiment config, YAML validated against workflow/schemas/config.schema.yaml; repeat to "
        f"merge several in order (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value: dotted key, YAML value (repeatable), e.g. --set finetune.lr=2e-5",
    )


def parse_labels(text: str) -> dict[str, str]:
    """``"family=var,seed=0"`` → ``{"family": "var", "seed": "0"}``."""
    items = [x for x in text.split(",") if x]
    if not all("=" in x for x in items):
        raise argparse.ArgumentTypeError(f"--labels expects key=value,... got {text!r}")
    return dict(x.split("=", 1) for x in items)


def _add_stage(sub, spec: Stage) -> None:
    p = sub.add_parser(spec.command, help=spec.help, description=spec.help)
    add_config_arguments(p)
    p.add_argument(
        "--labels",
        type=parse_labels,
        default={},
        metavar="K=V,...",
        help="the job's lineage (family, model, seed, objective, lambda, guidance, ...): MLflow tags",
    )
    p.add_argument("--record", metavar="JSON", help="write the resolved config and lineage here on success")
    spec.add_arguments(p)
    p.set_defaults(_stage=spec)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI; with ``only`` just that tool's module is imported (stage modules are light)."""
    parser = argparse.ArgumentParser(
        prog="ccalign",
        description="Condition Contrastive Alignment pipeline. Each stage subcommand is one job type of the "
        "DAG (README: 'Running the pipeline'); `ccalign plan` lists the jobs a config asks for.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for spec in stages().values():
        _add_stage(sub, spec)
    for name, module_name in TOOLS.items():
        if only in (None, name):
            module = importlib.import_module(module_name)
            p = sub.add_parser(name, help=module.HELP, description=module.HELP)
            module.add_arguments(p)
            p.set_defaults(_tool=module)
    return parser


def run_stage(spec: Stage, args: argparse.Namespace) -> None:
    """Resolve the config, run the stage, then write its record (rank 0)."""
    files = args.config or [DEFAULT_CONFIG]
    cfg = load_config(files, args.overrides)
    spec.main(cfg, args)
    if args.record and world()[0] == 0:
        from ccalign.record import write_record

        write_record(args.record, spec, cfg, files, args.overrides, args.labels)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    log = get_logger("cli")
    try:
        if hasattr(args, "_stage"):
            run_stage(args._stage, args)
        else:
            args._tool.main(args)
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
