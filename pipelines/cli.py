"""`qvl`: the command line that assembles jobs from a config file.

Exit codes: 0 success; 1 the run worked but nothing at all could be ingested;
2 configuration or preflight error (nothing was done); 3 infrastructure error
during the run (store or cluster failure; the report says what was written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from .config import ConfigError, load_config, redact

EXIT_OK, EXIT_NOTHING_INGESTED, EXIT_CONFIG, EXIT_INFRA = 0, 1, 2, 3


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set embedder.mrl_dims=[256,64] (repeatable)")


def _cmd_ingest(args: argparse.Namespace) -> int:
    from .ingest import PreflightError, run_ingest

    cfg = load_config(args.config, args.overrides)
    secrets = cfg.secret_values()
    _redact_logs(secrets)
    try:
        report = run_ingest(cfg, prune=True if args.prune else None)
    except PreflightError as exc:
        print(f"error: {redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # store/cluster failures: say what, without secrets
        print(f"error: ingestion failed: {type(exc).__name__}: {redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_INFRA
    if report.nothing_ingested:
        print("error: nothing could be ingested: every object failed (see the dead-letter file)", file=sys.stderr)
        return EXIT_NOTHING_INGESTED
    return EXIT_OK


class _RedactingFilter(logging.Filter):
    """Scrubs secret values from log records (message, arguments, traceback) before any handler writes them."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call: keep its parts, scrubbed
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message, self.secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


def _redact_logs(secrets: list[str]) -> None:
    """Make every root log handler of this process scrub the config's secrets (debug logs of S3 clients
    print signed request headers, which hold the access key id)."""
    if not secrets:
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactingFilter(list(secrets)))


def _cmd_tiny_checkpoint(args: argparse.Namespace) -> int:
    from operators.qwen3vl.checkpoint import build_checkpoint

    path = build_checkpoint(args.out_dir, args.kind, args.size, seed=args.seed)
    print(f"wrote {args.kind} checkpoint ({args.size}) to {path}")
    return EXIT_OK


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from operators.sample_media import write_sample_media

    paths = write_sample_media(args.out_dir)
    print(f"wrote {len(paths)} sample files to {args.out_dir}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The qvl argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="qvl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="ingest a source into Qdrant")
    _add_config_args(p)
    p.add_argument("--prune", action="store_true", help="delete points of objects that vanished from the source")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("tiny-checkpoint", help="write a random-weight Qwen3-VL checkpoint (tests, benchmarks)")
    p.add_argument("out_dir")
    p.add_argument("--kind", choices=["embedding", "reranker"], required=True)
    p.add_argument("--size", choices=["tiny", "small", "2b", "8b"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_checkpoint)

    p = sub.add_parser("sample-data", help="write a small mixed-media sample folder")
    p.add_argument("out_dir", nargs="?", default="sample_data")
    p.set_defaults(func=_cmd_sample_data)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Other modules (query, evaluation) register their subcommands here.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qvl` console script."""
    _load_extra_commands()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _load_extra_commands() -> None:
    from . import cli as registry  # this module's registry, also when run as `python -m pipelines.cli`
    from . import query_cli  # noqa: F401  (registers query, query-batch, eval in pipelines.cli)

    for register in registry._EXTRA_COMMANDS:
        if register not in _EXTRA_COMMANDS:
            _EXTRA_COMMANDS.append(register)


if __name__ == "__main__":
    sys.exit(main())
