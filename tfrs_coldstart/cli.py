"""``tfrs-coldstart`` command line: run | train | distill | evaluate | export | serve | ...

Each command lives in its module as ``add_arguments(parser)`` and ``run(args) -> int``; this
file only registers them and owns the one error path: an error the user can fix
(:class:`tfrs_coldstart.errors.UserError`, a bad value, a missing or unreadable file) prints
one line ``error: ...`` and exits 2; ``TFRS_COLDSTART_DEBUG=1`` shows its traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from tfrs_coldstart.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    """A command's module and the names of its ``add_arguments`` and ``run`` functions."""

    module: str
    help: str
    add_arguments: str = "add_arguments"
    run: str = "run"


COMMANDS = {
    "run": Command("tfrs_coldstart.pipeline", "data -> split -> teacher -> student -> evaluate",
                   "add_run_arguments", "run_command"),
    "train": Command("tfrs_coldstart.pipeline", "data -> split -> teacher -> evaluate",
                     "add_run_arguments", "train_command"),
    "distill": Command("tfrs_coldstart.pipeline", "train the student from a saved teacher run",
                       "add_distill_arguments", "distill_command"),
    "evaluate": Command("tfrs_coldstart.pipeline",
                        "evaluate a run's models; writes report.json/md/png",
                        "add_evaluate_arguments", "evaluate_command"),
    "export": Command("tfrs_coldstart.serving.export",
                      "export a run as TF Serving SavedModels (recommend + item encoder)"),
    "serve": Command("tfrs_coldstart.serving.devserver",
                     "local server with TF Serving's REST and gRPC APIs (production: TF Serving)"),
    "recommend": Command("tfrs_coldstart.serving.client",
                         "ask a TF Serving (or `serve`) server for one user's recommendations"),
    "batch": Command("tfrs_coldstart.batch",
                     "offline top-k for a users table (CSV/Parquet) -> Parquet; local or Beam"),
    "add-items": Command("tfrs_coldstart.serving.add_items",
                         "embed new items and publish a new version with them in the index"),
    "finetune": Command("tfrs_coldstart.finetune",
                        "continue training a run on new interactions (then `export`)"),
}


def _load(cmd: Command) -> tuple[Callable[[argparse.ArgumentParser], None],
                                 Callable[[argparse.Namespace], int]]:
    # Imported only for the chosen command: each command module pulls in TensorFlow (and
    # serve/batch their servers and Beam), which `tfrs-coldstart --help` should not wait for.
    module = importlib.import_module(cmd.module)
    return getattr(module, cmd.add_arguments), getattr(module, cmd.run)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments."""
    p = argparse.ArgumentParser(prog="tfrs-coldstart", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == command:
            add_arguments, run = _load(cmd)
            add_arguments(sp)
            sp.set_defaults(run=run)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, ValueError, OSError) as e:
        # ValueError and OSError too: a bad value or path from a library (pandas, pyarrow,
        # the file system) is the user's to fix as well; the debug switch shows where it came.
        return _fail(e)


def _fail(e: BaseException) -> int:
    if os.environ.get("TFRS_COLDSTART_DEBUG"):
        raise e
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    print(f"error: {text}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
