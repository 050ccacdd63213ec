"""qvl: the command line that assembles jobs from a config file.

Exit codes: 0 success; 1 the run worked but nothing at all could be ingested;
2 configuration or preflight error (nothing was done); 3 infrastructure error
during the run (store or cluster failure; the report says what was written);
130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM (the ingestion's report says what
was written; see ``interrupts.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError, load_config
from .config_secrets import redact, redact_logs
from .interrupts import Interrupted
from .ray_processes import local_ray_shut_down_after

EXIT_OK, EXIT_NOTHING_INGESTED, EXIT_CONFIG, EXIT_INFRA = 0, 1, 2, 3
PLAN_LIMIT = 10  # `qvl ingest --plan`: URIs shown per kind unless --plan-limit says otherwise


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set embedder.mrl_dims=[256,64] (repeatable)")


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1 (its messages are argparse's "argument --top-k: ..." line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _cmd_ingest(args: argparse.Namespace) -> int:
    from .ingest import run_ingest
    from .preflight import PreflightError

    if args.plan_limit is not None and not args.plan:
        # Without --plan this would run the whole ingestion that the user meant to preview.
        print("error: --plan-limit needs --plan (without it, qvl ingest runs the ingestion)", file=sys.stderr)
        return EXIT_CONFIG
    cfg = load_config(args.config, args.overrides)
    secrets = cfg.secret_values()
    redact_logs(secrets)
    if args.plan:
        return _plan_ingest(cfg, args, secrets)
    try:
        report = run_ingest(cfg, prune=True if args.prune else None)
    except PreflightError as exc:
        print(f"error: {redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_CONFIG
    except Interrupted as exc:
        print(f"error: {redact(str(exc), secrets)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # store/cluster failures: say what, without secrets
        print(f"error: ingestion failed: {type(exc).__name__}: {redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_INFRA
    if report.nothing_ingested:
        print("error: nothing could be ingested: every object failed (see the dead-letter file)", file=sys.stderr)
        return EXIT_NOTHING_INGESTED
    return EXIT_OK


def _plan_ingest(cfg: Any, args: argparse.Namespace, secrets: list[str]) -> int:
    """`qvl ingest --plan`: print what the run would do; nothing is embedded or written."""
    from .preflight import PreflightError
    from .preview import preview_ingest

    try:
        preview = preview_ingest(cfg, prune=True if args.prune else None)
    except PreflightError as exc:
        print(f"error: {redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_CONFIG
    for line in preview.lines(limit=args.plan_limit or PLAN_LIMIT):
        print(redact(line, secrets))
    return EXIT_OK


def _clash(target: Path, rel: Path) -> Path | None:
    """The existing path that writing ``target / rel`` would overwrite (or trip on), else None."""
    node = target
    for part in rel.parts[:-1]:
        node = node / part
        if os.path.lexists(node) and not node.is_dir():
            return node  # a file where a folder must go
    dest = target / rel
    return dest if os.path.lexists(dest) else None


def _write_into_folder(command: str, out_dir: str, force: bool, write: Callable[[Path], object],
                       known: tuple[str, ...] = ()) -> int:
    """Run ``write(stage)`` in a staging folder, then move its files into ``out_dir``; an exit code."""
    # The writers only know what they write after writing it: stage first (inside out_dir, so on
    # the same file system and moving is a rename), and without force move nothing if any file
    # would be overwritten. `known` files are checked before writing, to fail before a slow build.
    target = Path(out_dir)
    hint = " (use --force to overwrite)"
    if os.path.lexists(target) and not target.is_dir():
        print(f"error: {command}: {out_dir}: exists and is not a folder", file=sys.stderr)
        return EXIT_CONFIG
    if not force:
        for name in known:
            if os.path.lexists(target / name):
                print(f"error: {command}: {target / name} already exists{hint}", file=sys.stderr)
                return EXIT_CONFIG
    created = not target.exists()
    stage: Path | None = None
    try:
        target.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".qvl-staging-", dir=target))
        write(stage)
        files = sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file() or p.is_symlink())
        if not force:
            for rel in files:
                clash = _clash(target, rel)
                if clash is not None:
                    print(f"error: {command}: {clash} already exists{hint}", file=sys.stderr)
                    return EXIT_CONFIG
        for rel in files:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, target / rel)
    except OSError as exc:
        # Name the user's path, never the staging folder's.
        where = exc.filename or out_dir
        if stage is not None and str(where).startswith(str(stage)):
            where = out_dir
        print(f"error: {command}: {where}: cannot write ({exc.strerror or type(exc).__name__})", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # nothing was written: leave no empty folder behind
    return EXIT_OK


def _cmd_tiny_checkpoint(args: argparse.Namespace) -> int:
    from operators.qwen3vl.checkpoint import build_checkpoint

    code = _write_into_folder("tiny-checkpoint", args.out_dir, args.force,
                              lambda stage: build_checkpoint(stage, args.kind, args.size, seed=args.seed),
                              known=("config.json", "model.safetensors"))
    if code == EXIT_OK:
        print(f"wrote {args.kind} checkpoint ({args.size}) to {args.out_dir}")
    return code


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from operators.sample_media import write_sample_media

    written: list[Path] = []
    code = _write_into_folder("sample-data", args.out_dir, args.force,
                              lambda stage: written.extend(write_sample_media(stage)))
    if code == EXIT_OK:
        print(f"wrote {len(written)} sample files to {args.out_dir}")
    return code


def build_parser() -> argparse.ArgumentParser:
    """The qvl argument parser with every subcommand."""
    # The exit codes as the module docstring gives them, below the commands.
    epilog = __doc__.split("\n\n", 1)[1].strip().replace("``interrupts.py``", "pipelines/interrupts.py")
    parser = argparse.ArgumentParser(prog="qvl", description=__doc__.splitlines()[0], epilog=epilog)
    _add_verbose(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="ingest a source into Qdrant")
    _add_config_args(p)
    p.add_argument("--prune", action="store_true", help="delete points of objects that vanished from the source")
    p.add_argument("--plan", action="store_true",
                   help="show what the run would embed, skip and prune, then stop: nothing is embedded or written")
    p.add_argument("--plan-limit", type=_positive, default=None, metavar="N",
                   help="with --plan: URIs shown per kind (default 10)")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("tiny-checkpoint", help="write a random-weight Qwen3-VL checkpoint (tests, benchmarks)")
    p.add_argument("out_dir", help="folder to write the checkpoint to (created; an empty one is fine)")
    p.add_argument("--kind", choices=["embedding", "reranker"], required=True,
                   help="embedding: for embedder.model; reranker: for reranker.model")
    p.add_argument("--size", choices=["tiny", "small", "2b", "8b"], default="tiny",
                   help="tiny: tests, dry runs; small: CPU benchmarks; 2b/8b: the real architectures (default tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite files of an existing checkpoint in OUT_DIR")
    p.set_defaults(func=_cmd_tiny_checkpoint)

    p = sub.add_parser("sample-data", help="write a small mixed-media sample folder")
    p.add_argument("out_dir", nargs="?", default="sample_data",
                   help="folder to write the files to (created; an empty one is fine; default sample_data)")
    p.add_argument("--force", action="store_true", help="overwrite existing files of the same names in OUT_DIR")
    p.set_defaults(func=_cmd_sample_data)

    for register in _EXTRA_COMMANDS:
        register(sub)
    for p in sub.choices.values():
        _add_verbose(p, default=argparse.SUPPRESS)
    return parser


def _add_verbose(p: argparse.ArgumentParser, default: object = False) -> None:
    """Add ``-v/--verbose`` to ``p`` (the main parser and every subcommand: before or after it)."""
    # Subcommands get a SUPPRESS default: absent there, they set nothing, so `qvl -v ingest ...`
    # is not reset to False by the subcommand's own default.
    try:
        p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    except argparse.ArgumentError:
        pass  # a registered subcommand defines -v itself: leave it its meaning


# Other modules (query, evaluation) register their subcommands here.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def configure_logging(verbose: bool) -> None:
    """Log records to stderr, one line each, at WARNING (DEBUG with -v)."""
    import huggingface_hub.utils.logging  # noqa: F401  (its import installs the handler removed below)

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # huggingface_hub writes through a handler of its own and also passes its records on to the
    # root's: every hub warning (each retry of an unreachable hub) printed twice, and its own copy
    # escaped the secret scrubbing that redact_logs adds to the root's handlers.
    logging.getLogger("huggingface_hub").handlers.clear()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qvl` console script."""
    _load_extra_commands()
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        with local_ray_shut_down_after():  # no process of a local Ray it started outlives the command
            return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt as exc:  # Ctrl-C (or, in a Ray job's run, SIGTERM): one line, not a traceback
        stop = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
        print(f"error: {stop}", file=sys.stderr)
        return stop.exit_code


def _load_extra_commands() -> None:
    from . import cli as registry  # this module's registry, also when run as `python -m pipelines.cli`
    from . import query_cli  # noqa: F401  (registers query, query-batch, eval in pipelines.cli)

    for register in registry._EXTRA_COMMANDS:
        if register not in _EXTRA_COMMANDS:
            _EXTRA_COMMANDS.append(register)


if __name__ == "__main__":
    sys.exit(main())
