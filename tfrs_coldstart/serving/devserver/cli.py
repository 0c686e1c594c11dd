"""``tfrs-coldstart serve``: TF Serving's flags (in this project's spelling) and the command.

Follows the project's CLI convention: :func:`add_arguments` registers the flags, :func:`run`
runs the command and raises :class:`tfrs_coldstart.errors.UserError` subclasses for what
the user can fix (a bad config file, a port in use); ``tfrs_coldstart.cli`` prints them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from tfrs_coldstart.serving.devserver.config import BatchingParameters, parse_batching_config
from tfrs_coldstart.serving.devserver.rest_api import PROMETHEUS_PATH
from tfrs_coldstart.serving.devserver.server import Server, serve

__all__ = ["add_arguments", "main", "run"]

#: Picked up when present and no flag names another file (the repository's committed ones).
DEFAULT_MODELS_CONFIG = Path("serving/models.config")
DEFAULT_BATCHING_CONFIG = Path("serving/batching.config")
DESCRIPTION = (
    "Serve exported models with TF Serving's REST and gRPC APIs (for machines without TF "
    "Serving; production uses TF Serving itself)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``tfrs-coldstart serve``."""
    p.add_argument(
        "--model-base",
        default="export",
        help="folder holding <model>/<version>/ SavedModels (default: export)",
    )
    p.add_argument(
        "--models-config",
        default=None,
        help="TF Serving ModelServerConfig text proto (default: serving/models.config "
        "if it exists, else every folder under --model-base)",
    )
    p.add_argument("--rest-port", type=int, default=8501, help="REST port; 0 picks a free one")
    p.add_argument("--grpc-port", type=int, default=8500, help="gRPC port; 0 picks a free one")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=1.0,
        help="how often to look for new versions (0 = never)",
    )
    p.add_argument(
        "--batching-config",
        default=None,
        help="TF Serving batching.config (default: serving/batching.config if it exists)",
    )
    p.add_argument(
        "--enable-batching",
        action="store_true",
        help="batch with TF Serving's default parameters when there is no batching config",
    )
    p.add_argument("--no-batching", action="store_true", help="never batch requests")


def _batching(args: argparse.Namespace) -> BatchingParameters | None:
    """The flags' batching choice: off, a file (named or the default one), or the defaults."""
    if args.no_batching:
        return None
    if args.batching_config:
        return parse_batching_config(Path(args.batching_config))
    if DEFAULT_BATCHING_CONFIG.exists():
        return parse_batching_config(DEFAULT_BATCHING_CONFIG)
    if args.enable_batching:
        return BatchingParameters()
    return None


def _print_ready(server: Server) -> None:
    names = ", ".join(server.manager.model_names) or "none yet"
    print(f"serving models: {names}", flush=True)
    print(f"REST on {server.rest_url} (e.g. GET {server.rest_url}/v1/models/<name>)", flush=True)
    print(f"gRPC on {server.grpc_address}", flush=True)
    print(f"metrics on {server.rest_url}{PROMETHEUS_PATH}", flush=True)
    b = server.manager.batching
    print(
        "batching: off"
        if b is None
        else f"batching: max_batch_size={b.max_batch_size} "
        f"batch_timeout_micros={b.batch_timeout_micros}",
        flush=True,
    )
    print("press Ctrl-C to stop", flush=True)


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM; returns the exit code (0 once stopped)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    models_config = args.models_config
    if models_config is None and DEFAULT_MODELS_CONFIG.exists():
        models_config = str(DEFAULT_MODELS_CONFIG)
    serve(
        args.model_base,
        models_config,
        args.rest_port,
        args.grpc_port,
        args.host,
        args.poll_seconds,
        _batching(args),
        ready=_print_ready,
    )
    print("stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``tfrs-coldstart serve`` on its own (errors propagate; the project CLI prints them)."""
    parser = argparse.ArgumentParser(prog="tfrs-coldstart serve", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
