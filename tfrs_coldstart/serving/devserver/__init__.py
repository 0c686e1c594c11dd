"""A local model server that speaks TF Serving's REST and gRPC APIs.

Production serves the exported models with TF Serving itself (the project's
Dockerfile image, ``serving/k8s/``). This server exists for laptops and CI
machines that have neither Docker nor the ``tensorflow_model_server`` binary:
it answers the same URLs, protos, JSON shapes, status codes and error texts as
TF Serving, so code written against it runs unchanged against production.

What it does, as TF Serving does:

* reads ``<model base>/models.config`` (a ``ModelServerConfig`` text proto; the
  exporter writes it, pinning each model's whole releases) or, when there is none,
  serves every folder under the model base path as a model;
  honours ``model_version_policy`` (``latest``, ``specific``, ``all``) and
  ``version_labels``;
* REST on 8501: ``POST /v1/models/<name>[/versions/N|/labels/L]:predict`` with
  the ``instances`` (row) and ``inputs`` (columnar) formats and ``{"b64": ...}``
  strings, ``GET /v1/models/<name>[...]`` (status) and ``.../metadata``,
  errors as ``{"error": "..."}`` with TF Serving's HTTP codes, Prometheus
  metrics at ``/monitoring/prometheus/metrics``;
* gRPC on 8500: ``PredictionService.Predict``/``GetModelMetadata`` and
  ``ModelService.GetModelStatus`` with matching status codes;
* polls the base paths for new versions, loads and warms a new version fully
  (``assets.extra/tf_serving_warmup_requests``) before publishing it, never
  drops an in-flight request, and unloads versions the policy no longer wants;
* batches concurrent requests for one model/version/signature
  (``batching.config``: ``max_batch_size``, ``batch_timeout_micros``,
  ``max_enqueued_batches``).

Beyond TF Serving: every request's declared size (body bytes, instances, elements x dtype
size) is checked against :class:`RequestLimits` before anything is allocated (413 /
RESOURCE_EXHAUSTED); idle connections time out; a stop drains requests already received.

Where it is stricter than TF Serving (unknown keys in a columnar ``inputs``
object, ragged batches, input shapes) it is stricter on purpose: a request that
works here works there. It does not implement Classify/Regress/MultiInference,
request padding (``allowed_batch_sizes``) or model reload RPCs.

The parts, one concern each (imports run down this list, never up)::

    errors      RpcError (a failed request, with its canonical code), ListenError
    config      models.config and batching.config (TF Serving's text protos)
    signature   what a request is checked against; TF's dtype names
    limits      RequestLimits: what one request may declare (bytes, instances, elements)
    batching    the batch queue of one version/signature
    servable    LoadedVersion: one loaded version, its checks, batching and warm-up
    manager     ModelManager: version policies, labels, polling, hot swap, status
    codec       JSON <-> tensors (TF Serving's rules and error texts)
    metrics     Prometheus metrics
    rest_api    REST on 8501;  grpc_api: gRPC on 8500
    server      Server (in-process) and serve (until Ctrl-C)
    cli         ``tfrs-coldstart serve``: add_arguments / run

Status codes and their HTTP mapping are shared with the client (``serving/status.py``);
version folders, the warm-up file and the ScaNN import with the exporter and batch
retrieval (``serving/saved_model.py``).

Example::

    from tfrs_coldstart.serving.devserver import Server

    with Server("export", "export/models.config", rest_port=0, grpc_port=0) as server:
        print(server.rest_url, server.grpc_address)   # ports chosen by the OS
"""

from __future__ import annotations

from tfrs_coldstart.errors import ConfigError
from tfrs_coldstart.serving.devserver.cli import add_arguments, main, run
from tfrs_coldstart.serving.devserver.config import (
    BatchingParameters,
    ModelConfig,
    discover_models,
    parse_batching_config,
    parse_models_config,
)
from tfrs_coldstart.serving.devserver.errors import ListenError, RpcError
from tfrs_coldstart.serving.devserver.limits import RequestLimits
from tfrs_coldstart.serving.devserver.manager import ModelManager
from tfrs_coldstart.serving.devserver.servable import LoadedVersion
from tfrs_coldstart.serving.devserver.server import Server, serve

__all__ = [
    "BatchingParameters",
    "ConfigError",
    "ListenError",
    "LoadedVersion",
    "ModelConfig",
    "ModelManager",
    "RequestLimits",
    "RpcError",
    "Server",
    "add_arguments",
    "discover_models",
    "main",
    "parse_batching_config",
    "parse_models_config",
    "run",
    "serve",
]
