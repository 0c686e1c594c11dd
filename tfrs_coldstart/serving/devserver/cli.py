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

from tfrs_coldstart.errors import ConfigError
from tfrs_coldstart.serving.devserver.config import BatchingParameters, parse_batching_config
from tfrs_coldstart.serving.devserver.limits import RequestLimits
from tfrs_coldstart.serving.devserver.rest_api import PROMETHEUS_PATH
from tfrs_coldstart.serving.devserver.server import (
    DEFAULT_DRAIN_SECONDS,
    DEFAULT_IDLE_TIMEOUT,
    Server,
    serve,
)
from tfrs_coldstart.serving.saved_model import MODELS_CONFIG

__all__ = ["add_arguments", "main", "run"]

#: Picked up when present and no flag names another file (the repository's committed one);
#: the models config likewise: ``<model-base>/models.config``, written by the exporter.
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
        help="TF Serving ModelServerConfig text proto (default: <model-base>/models.config, "
        "written by export, if it exists, else every folder under --model-base, latest version)",
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
    defaults = RequestLimits()
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=defaults.max_request_bytes,
        help="largest REST body / gRPC message, and largest decoded tensors of one request "
        f"(default: {defaults.max_request_bytes}, 64 MiB); larger ones get 413 / "
        "RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--max-instances",
        type=int,
        default=defaults.max_instances,
        help=f"most rows in a REST 'instances' list (default: {defaults.max_instances})",
    )
    p.add_argument(
        "--max-tensor-elements",
        type=int,
        default=defaults.max_tensor_elements,
        help="most elements one input tensor may declare, REST or gRPC "
        f"(default: {defaults.max_tensor_elements}, 2^24)",
    )
    p.add_argument(
        "--max-json-values",
        type=int,
        default=defaults.max_json_values,
        help="most JSON values (numbers, strings, arrays, objects, keys) in one REST body, "
        "counted before it is parsed; bounds the memory parsing takes (~80 bytes a value at "
        f"worst; default: {defaults.max_json_values}, 2^22)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=DEFAULT_DRAIN_SECONDS,
        help="on SIGTERM/Ctrl-C, how long requests already received may take to finish "
        f"(default: {DEFAULT_DRAIN_SECONDS:g})",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        help="close connections idle (or stalled mid-request) this many seconds "
        f"(default: {DEFAULT_IDLE_TIMEOUT:g})",
    )


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


def _limits(args: argparse.Namespace) -> RequestLimits:
    """The request limits of the flags (ConfigError naming the flag if one is not positive)."""
    return RequestLimits(
        max_request_bytes=args.max_request_bytes,
        max_instances=args.max_instances,
        max_tensor_elements=args.max_tensor_elements,
        max_json_values=args.max_json_values,
    )


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
    lim = server.limits
    print(
        f"limits: {lim.max_request_bytes} bytes, {lim.max_instances} instances, "
        f"{lim.max_tensor_elements} elements per tensor, {lim.max_json_values} JSON values",
        flush=True,
    )
    print("press Ctrl-C to stop", flush=True)


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM; returns the exit code (0 once stopped)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    limits = _limits(args)
    for flag, value in (
        ("--drain-seconds", args.drain_seconds),
        ("--idle-timeout", args.idle_timeout),
    ):
        if not value >= 0 or (flag == "--idle-timeout" and value == 0):
            raise ConfigError(f"{flag} must be a positive number of seconds, got {value}")
    models_config = args.models_config
    default_config = Path(args.model_base) / MODELS_CONFIG
    if models_config is None and default_config.is_file():
        models_config = str(default_config)
    serve(
        args.model_base,
        models_config,
        args.rest_port,
        args.grpc_port,
        args.host,
        args.poll_seconds,
        _batching(args),
        ready=_print_ready,
        limits=limits,
        drain_seconds=args.drain_seconds,
        idle_timeout=args.idle_timeout,
    )
    print("stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``tfrs-coldstart serve`` on its own (errors propagate; the project CLI prints them)."""
    parser = argparse.ArgumentParser(prog="tfrs-coldstart serve", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
