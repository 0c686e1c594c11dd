"""The server's configuration: TF Serving's ``models.config`` and ``batching.config``.

Both files are TF Serving's own text protos, parsed with TF Serving's rules and defaults,
so the files that configure production configure this server too. A file that cannot be
served raises :class:`tfrs_coldstart.errors.ConfigError` naming the file and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from tfrs_coldstart.errors import ConfigError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "BatchingParameters",
    "ModelConfig",
    "discover_models",
    "parse_batching_config",
    "parse_models_config",
]

log = logging.getLogger(__name__)

#: The largest request or response either API takes (REST body, gRPC message).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ModelConfig:
    """One model to serve: where its versions live and which of them to keep loaded."""

    name: str
    base_path: Path
    policy: str = "latest"  # latest | all | specific
    num_versions: int = 1  # for latest
    versions: tuple[int, ...] = ()  # for specific
    labels: Mapping[str, int] = field(default_factory=dict)

    def wanted(self, on_disk: Sequence[int]) -> set[int]:
        """The versions the policy aspires to, out of those on disk."""
        if self.policy == "all":
            return set(on_disk)
        if self.policy == "specific":
            return set(on_disk) & set(self.versions)
        return set(sorted(on_disk)[-self.num_versions :]) if on_disk else set()


@dataclass(frozen=True)
class BatchingParameters:
    """The subset of TF Serving's BatchingParameters this server acts on.

    Defaults are TF Serving's (SharedBatchScheduler::QueueOptions).
    """

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 1


def _resolve_base_path(base_path: str, name: str, model_base: Path | None,
                       config_dir: Path | None = None) -> Path:
    """Use base_path if it exists, else look for it under the local model base, then beside
    the config file.

    The exporter's ``<base>/models.config`` names Docker paths (``/models/student``); on a
    laptop the same file then serves ``<model-base>/student`` (or ``<base>/student``).
    """
    path = Path(base_path)
    if path.exists():
        return path
    roots = [r for r in (model_base, config_dir) if r is not None]
    for root in roots:
        for candidate in (root / path.name, root / name):
            if candidate.exists():
                return candidate
    return roots[0] / name if roots else path


def parse_models_config(path: Path, model_base: Path | None = None) -> list[ModelConfig]:
    """Parse TF Serving's ModelServerConfig text proto into ModelConfigs.

    A ``specific`` policy serves exactly its versions (those on disk), as TF Serving does:
    the exporter's ``<base>/models.config`` pins each model to its two newest whole releases.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the models config: {exc}") from exc
    cfg = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as exc:
        raise ConfigError(
            f"{path}: not a valid ModelServerConfig text proto: {exc}. Fix the file; it must "
            "look like: model_config_list { config { name: 'student' base_path: '/models/student' "
            "model_platform: 'tensorflow' } }"
        ) from exc
    if cfg.WhichOneof("config") != "model_config_list":
        raise ConfigError(f"{path}: only model_config_list is supported (no custom_model_config)")
    models: list[ModelConfig] = []
    seen: set[str] = set()
    for i, c in enumerate(cfg.model_config_list.config):
        where = f"{path}: config #{i + 1}"
        if not c.name:
            raise ConfigError(f"{where}: missing 'name'")
        if c.name in seen:
            raise ConfigError(f"{where}: model name {c.name!r} appears twice")
        seen.add(c.name)
        if not c.base_path:
            raise ConfigError(f"{where} ({c.name}): missing 'base_path'")
        if c.model_platform not in ("", "tensorflow"):
            raise ConfigError(
                f"{where} ({c.name}): model_platform {c.model_platform!r} is not supported; "
                "use 'tensorflow'"
            )
        choice = c.model_version_policy.WhichOneof("policy_choice") or "latest"
        num_versions, versions = 1, ()
        if choice == "latest":
            num_versions = c.model_version_policy.latest.num_versions or 1
        elif choice == "specific":
            versions = tuple(int(v) for v in c.model_version_policy.specific.versions)
            if not versions:
                raise ConfigError(f"{where} ({c.name}): 'specific' policy lists no versions")
        labels = {str(k): int(v) for k, v in c.version_labels.items()}
        models.append(
            ModelConfig(
                name=c.name,
                base_path=_resolve_base_path(c.base_path, c.name, model_base,
                                             Path(path).parent),
                policy=choice,
                num_versions=num_versions,
                versions=versions,
                labels=labels,
            )
        )
    if not models:
        raise ConfigError(f"{path}: model_config_list has no config entries")
    return models


def discover_models(model_base: Path) -> list[ModelConfig]:
    """Every folder under model_base is a model, served with the latest-1 policy."""
    model_base = Path(model_base)
    if not model_base.is_dir():
        raise ConfigError(
            f"model base path {model_base} does not exist or is not a folder; export a model "
            "first (tfrs-coldstart export) or pass --model-base / --models-config"
        )
    return [
        ModelConfig(name=p.name, base_path=p)
        for p in sorted(model_base.iterdir())
        if p.is_dir() and not p.name.startswith(".")
    ]


def _batching_message_class() -> type:
    """Build TF Serving's BatchingParameters proto (not shipped in tensorflow-serving-api)."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="tfrs_coldstart/batching_parameters.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    msg = fdp.message_type.add(name="BatchingParameters")
    f = descriptor_pb2.FieldDescriptorProto
    wrapped = [
        ("max_batch_size", 1, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, ".google.protobuf.StringValue"),
        ("enable_large_batch_splitting", 8, ".google.protobuf.BoolValue"),
        ("max_execution_batch_size", 9, ".google.protobuf.Int64Value"),
    ]
    for name, number, type_name in wrapped:
        msg.field.add(
            name=name,
            number=number,
            type=f.TYPE_MESSAGE,
            type_name=type_name,
            label=f.LABEL_OPTIONAL,
        )
    msg.field.add(name="allowed_batch_sizes", number=6, type=f.TYPE_INT64, label=f.LABEL_REPEATED)
    msg.field.add(
        name="pad_variable_length_inputs", number=7, type=f.TYPE_BOOL, label=f.LABEL_OPTIONAL
    )
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )


def parse_batching_config(path: Path) -> BatchingParameters:
    """Parse TF Serving's batching.config (BatchingParameters text proto)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the batching config: {exc}") from exc
    msg = _batching_message_class()()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise ConfigError(
            f"{path}: not a valid BatchingParameters text proto: {exc}. Expected fields like "
            "max_batch_size { value: 128 } batch_timeout_micros { value: 1000 }"
        ) from exc
    defaults = BatchingParameters()
    values: dict[str, int] = {}
    for name in (
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
    ):
        if msg.HasField(name):
            values[name] = int(getattr(msg, name).value)
        else:
            values[name] = getattr(defaults, name)
    for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
        if values[name] < 1:
            raise ConfigError(f"{path}: {name} must be >= 1, got {values[name]}")
    if values["batch_timeout_micros"] < 0:
        raise ConfigError(f"{path}: batch_timeout_micros must be >= 0")
    if msg.allowed_batch_sizes or msg.pad_variable_length_inputs:
        log.warning(
            "%s: allowed_batch_sizes / pad_variable_length_inputs are ignored by the "
            "dev server (TF Serving honours them)",
            path,
        )
    return BatchingParameters(**values)

