"""Packaging checks a machine without a Docker engine can make: the Dockerfile parses and
every COPY source exists, TF Serving's config files parse as their protos and name the
exported models, the compose file builds both targets. (The ScaNN build step, the patch script,
is checked against the real TF Serving and ScaNN sources in tests/test_scann_build.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # trains a model or builds exports

DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY",
                       "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD",
                       "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


def parse_dockerfile(text: str) -> list[tuple[str, str, int]]:
    """``(INSTRUCTION, arguments, line)`` with continuations joined and comments dropped."""
    out: list[tuple[str, str, int]] = []
    buf, start = "", 0
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = no
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip(), start))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def _expand(s: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), s)


def test_dockerfile_parses_and_every_copy_source_exists(context: Path,
                                                        exports: dict[str, Any]) -> None:
    instrs = parse_dockerfile((context / "Dockerfile").read_text())
    assert {i for i, _, _ in instrs} <= DOCKER_INSTRUCTIONS
    global_args: dict[str, str] = {}
    for ins, rest, _ in instrs:  # ARGs before the first FROM set the image names
        if ins == "FROM":
            break
        assert ins == "ARG"
        name, _, default = rest.partition("=")
        global_args[name] = _expand(default, global_args)
    stages: list[tuple[str, str]] = []
    copies: list[tuple[str, list[str], str | None]] = []
    for ins, rest, line in instrs:
        if ins == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+([a-z][a-z0-9_.-]*)", rest, re.I)
            assert m, f"line {line}: every stage must be named (FROM image AS name)"
            stages.append((_expand(m.group(1), global_args), m.group(2)))
        elif ins == "COPY":
            parts = rest.split()
            frm = next((p.split("=", 1)[1] for p in parts if p.startswith("--from=")), None)
            srcs = [p for p in parts if not p.startswith("--")][:-1]
            assert srcs, f"line {line}: COPY needs a source and a destination"
            copies.append((stages[-1][1], srcs, frm))
        elif ins in ("ENTRYPOINT", "CMD") and rest.startswith("["):
            assert all(isinstance(a, str) for a in json.loads(rest)), f"line {line}"
    names = [n for _, n in stages]
    assert len(names) == len(set(names))
    assert names[-1] == "serving-scann"  # `docker build .` builds the ScaNN image
    images = dict((n, img) for img, n in stages)
    assert images["scann-build"] == "tensorflow/serving:2.20.0-devel"
    assert images["stock"] == images["serving-scann"] == "tensorflow/serving:2.20.0"
    ignore = (context / ".dockerignore").read_text().split()
    for stage, srcs, frm in copies:
        if frm is not None:
            assert frm in names[:names.index(stage)], f"COPY --from={frm} before it is built"
            continue
        for src in srcs:
            assert (context / src).exists(), f"{stage}: COPY source {src} missing after export"
            top = src.strip("/").split("/")[0]
            verdict = None
            for pat in ignore:  # last matching .dockerignore pattern wins
                neg = pat.startswith("!")
                if re.fullmatch(pat.lstrip("!").rstrip("/").replace("*", "[^/]*"), top):
                    verdict = not neg
            assert not verdict, f"{src} is excluded from the build context by .dockerignore"


def _parse_text_proto(path: Path, message: Any) -> Any:
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), message)


def test_models_configs_name_exported_models(context: Path, exports: dict[str, Any]) -> None:
    """The configs the images start TF Serving with are the ones the exports wrote into
    export/ (copied, or mounted, at /models): every model pinned to its two newest releases
    (the item encoder is in all three); the stock one without ScaNN's models."""
    from tensorflow_serving.config import model_server_config_pb2

    entrypoints = {stage: json.loads(rest) for stage, rest in _entrypoints(context)}
    exported: dict[str, list[int]] = {}
    for variant in ("scann", "bf", "part"):
        for n, m in exports[variant].items():
            exported.setdefault(n, []).append(m.version)
    newest = {n: sorted(vs)[-2:] for n, vs in exported.items()}
    scann = {n for n, m in exports["scann"].items() if m.kind == "recommend"}
    for stage, cfg_file, names in (("serving-scann", "models.config", set(newest)),
                                   ("stock", "models.stock.config", set(newest) - scann)):
        assert f"--model_config_file=/models/{cfg_file}" in entrypoints[stage]
        assert "--model_config_file_poll_wait_seconds=10" in entrypoints[stage]
        cfg = _parse_text_proto(context / "export" / cfg_file,
                                model_server_config_pb2.ModelServerConfig())
        pinned = {c.name: list(c.model_version_policy.specific.versions)
                  for c in cfg.model_config_list.config}
        assert pinned == {n: newest[n] for n in names}, cfg_file
        assert newest["student_items"] == [2, 3]
        for c in cfg.model_config_list.config:
            assert c.base_path == f"/models/{c.name}" and c.model_platform == "tensorflow"
            for v in pinned[c.name]:
                local = exports["base"] / c.name / str(v)
                assert (local / "saved_model.pb").is_file(), f"{cfg_file}: {local} missing"


def _entrypoints(context: Path) -> list[tuple[str, str]]:
    """``(stage, ENTRYPOINT json)`` of every stage that has one."""
    out, stage = [], ""
    for ins, rest, _ in parse_dockerfile((context / "Dockerfile").read_text()):
        if ins == "FROM":
            stage = rest.split()[-1]
        elif ins == "ENTRYPOINT":
            out.append((stage, rest))
    return out


def test_stock_image_serves_the_partitioned_exports(context: Path,
                                                    exports: dict[str, Any]) -> None:
    """The official image's models are the partitioned ones (TensorFlow's own ops, ANN speed),
    and the k8s Deployment (built from the `stock` target) probes one of them."""
    import yaml
    from tensorflow_serving.config import model_server_config_pb2

    stock = _parse_text_proto(context / "export" / "models.stock.config",
                              model_server_config_pb2.ModelServerConfig())
    names = {c.name for c in stock.model_config_list.config}
    recommend = {n for n, m in exports["part"].items() if m.kind == "recommend"}
    assert recommend and recommend <= names
    assert all(exports["part"][n].index == "partitioned" for n in recommend)
    assert all(n.endswith("_part") for n in recommend)
    deployment_file = REPO / "serving" / "k8s" / "deployment.yaml"
    deployment = yaml.safe_load(deployment_file.read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    probed = {container[p]["httpGet"]["path"].rsplit("/", 1)[1]
              for p in ("readinessProbe", "startupProbe")}
    assert probed and probed <= recommend, probed
    assert "--target stock" in deployment_file.read_text()


def _serving_protos() -> dict[str, Any]:
    """TF Serving's BatchingParameters and MonitoringConfig (not in the pip package), rebuilt
    from their .proto definitions so the config files are checked field by field."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    F = descriptor_pb2.FieldDescriptorProto
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    fd = descriptor_pb2.FileDescriptorProto(name="tfs_configs.proto", package="tensorflow.serving",
                                            syntax="proto3",
                                            dependency=["google/protobuf/wrappers.proto"])
    b = fd.message_type.add(name="BatchingParameters")
    for num, name, wrapper in ((1, "max_batch_size", "Int64Value"),
                               (2, "batch_timeout_micros", "Int64Value"),
                               (3, "max_enqueued_batches", "Int64Value"),
                               (4, "num_batch_threads", "Int64Value"),
                               (5, "thread_pool_name", "StringValue")):
        b.field.add(name=name, number=num, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=f".google.protobuf.{wrapper}")
    b.field.add(name="allowed_batch_sizes", number=6, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    b.field.add(name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL,
                label=F.LABEL_OPTIONAL)
    p = fd.message_type.add(name="PrometheusConfig")
    p.field.add(name="enable", number=1, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    p.field.add(name="path", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    mc = fd.message_type.add(name="MonitoringConfig")
    mc.field.add(name="prometheus_config", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                 type_name=".tensorflow.serving.PrometheusConfig")
    pool.Add(fd)
    return {n: message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"tensorflow.serving.{n}"))
        for n in ("BatchingParameters", "MonitoringConfig")}


def test_batching_and_monitoring_configs_parse() -> None:
    protos = _serving_protos()
    batching = _parse_text_proto(REPO / "serving" / "batching.config",
                                 protos["BatchingParameters"]())
    assert batching.max_batch_size.value >= 1 and batching.num_batch_threads.value >= 1
    assert batching.batch_timeout_micros.value > 0
    mon = _parse_text_proto(REPO / "serving" / "monitoring.config", protos["MonitoringConfig"]())
    assert mon.prometheus_config.enable
    assert mon.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_compose_file_builds_both_targets() -> None:
    import yaml

    compose = yaml.safe_load((REPO / "serving" / "docker-compose.yml").read_text())
    targets = {s["build"]["target"] for s in compose["services"].values()}
    stages = {m.group(1) for m in re.finditer(r"^FROM\s+\S+\s+AS\s+(\S+)",
                                              (REPO / "Dockerfile").read_text(), re.M)}
    assert targets == {"serving-scann", "stock"} and targets <= stages
    for s in compose["services"].values():
        assert (REPO / "serving" / s["build"]["context"] / s["build"]["dockerfile"]).is_file()
        assert {"8500:8500", "8501:8501"} <= set(s["ports"])
