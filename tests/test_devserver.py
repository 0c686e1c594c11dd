"""The dev server over real sockets: TF Serving's REST/gRPC contract, errors, swaps, batching."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import tensorflow as tf
from conftest import make_recommender
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from tfrs_coldstart import cli
from tfrs_coldstart.errors import UserError
from tfrs_coldstart.serving import devserver
from tfrs_coldstart.serving import status as status_codes
from tfrs_coldstart.serving.devserver import BatchingParameters, ConfigError, Server
from tfrs_coldstart.serving.saved_model import WARMUP_FILE, list_versions

REPO = Path(__file__).resolve().parents[1]
ITEMS = [f"item{i}" for i in range(12)]
K = 5
MAX_BATCH = 8


# ---------------------------------------------------------------------------------------------
# Small real SavedModels
# ---------------------------------------------------------------------------------------------


class _Numeric(tf.Module):
    """One float input 'x' [batch, 3] -> one output 'y'; plus a bytes echo signature."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.w = tf.Variable(np.arange(6, dtype="float32").reshape(3, 2) * version)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def predict(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": tf.matmul(x, self.w)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="raw")])
    def echo(self, raw: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"raw_bytes": raw}


def publish(
    base: Path,
    name: str,
    version: int,
    module: tf.Module,
    signatures: dict,
    warmup: list[predict_pb2.PredictRequest] | None = None,
) -> Path:
    """Save to a staging folder, then rename into <base>/<name>/<version> (atomic publish)."""
    staging = base.parent / f".staging-{base.name}-{name}-{version}-{time.monotonic_ns()}"
    tf.saved_model.save(module, str(staging), signatures=signatures)
    if warmup:
        (staging / WARMUP_FILE).parent.mkdir()
        with tf.io.TFRecordWriter(str(staging / WARMUP_FILE)) as writer:
            for req in warmup:
                entry = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=req)
                )
                writer.write(entry.SerializeToString())
    target = base / name / str(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, target)
    return target


def publish_recommender(base: Path, name: str, version: int, **kw) -> Path:
    m = make_recommender(ITEMS, K, version, dim=4, buckets=16, seed=0)
    return publish(
        base, name, version, m, {"serving_default": m.recommend, "embed_user": m.embed_user}, **kw
    )


def publish_numeric(base: Path, name: str, version: int, **kw) -> Path:
    m = _Numeric(version)
    return publish(base, name, version, m, {"serving_default": m.predict, "echo": m.echo}, **kw)


MODELS_CONFIG = """
model_config_list {
  config {
    name: "rec"
    base_path: "/models/rec"
    model_platform: "tensorflow"
    model_version_policy { all {} }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
  config {
    name: "num"
    base_path: "/models/num"
    model_platform: "tensorflow"
  }
}
"""

BATCHING_CONFIG = f"""
max_batch_size {{ value: {MAX_BATCH} }}
batch_timeout_micros {{ value: 50000 }}
max_enqueued_batches {{ value: 100 }}
num_batch_threads {{ value: 2 }}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("devserver")
    base = root / "export"
    base.mkdir()
    for v in (1, 2):
        publish_recommender(base, "rec", v)
        publish_numeric(base, "num", v)
    (root / "models.config").write_text(MODELS_CONFIG)
    (root / "batching.config").write_text(BATCHING_CONFIG)
    batching = devserver.parse_batching_config(root / "batching.config")
    srv = Server(
        base, root / "models.config", rest_port=0, grpc_port=0, poll_seconds=0, batching=batching
    )
    srv.start()
    yield srv
    srv.stop()


def post(srv: Server, path: str, body) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(f"{srv.rest_url}{path}", data=data, timeout=30)


GOOD_ROW = {"instances": [{"age": "25-34", "activity": 0.5}, {"age": "18-24", "activity": 1.0}]}


# ---------------------------------------------------------------------------------------------
# REST
# ---------------------------------------------------------------------------------------------


def test_rest_predict_row_and_columnar_agree(server: Server) -> None:
    row = post(server, "/v1/models/rec:predict", GOOD_ROW)
    assert row.status_code == 200, row.text
    preds = row.json()["predictions"]
    assert len(preds) == 2 and set(preds[0]) == {"item_ids", "scores"}
    assert len(preds[0]["item_ids"]) == K and all(i in ITEMS for i in preds[0]["item_ids"])
    assert preds[0]["scores"] == sorted(preds[0]["scores"], reverse=True)
    assert 2000 <= preds[0]["scores"][0] < 3000  # policy 'all': latest (2) answers by default

    col = post(
        server,
        "/v1/models/rec:predict",
        {
            "signature_name": "serving_default",
            "inputs": {"age": ["25-34", "18-24"], "activity": [0.5, 1.0]},
        },
    )
    assert col.status_code == 200, col.text
    outputs = col.json()["outputs"]
    assert outputs["item_ids"] == [p["item_ids"] for p in preds]
    assert outputs["scores"] == [p["scores"] for p in preds]


def test_rest_b64_strings_and_bytes_outputs(server: Server) -> None:
    plain = post(
        server, "/v1/models/rec:predict", {"instances": [{"age": "25-34", "activity": 0.5}]}
    ).json()
    b64 = post(
        server,
        "/v1/models/rec:predict",
        {"instances": [{"age": {"b64": base64.b64encode(b"25-34").decode()}, "activity": 0.5}]},
    ).json()
    assert plain == b64
    raw = bytes([0, 159, 255, 10])
    echo = post(
        server,
        "/v1/models/num:predict",
        {"signature_name": "echo", "instances": [{"b64": base64.b64encode(raw).decode()}]},
    )
    assert echo.status_code == 200, echo.text
    # a single output comes back without its name; *_bytes outputs as {"b64": ...}
    assert echo.json() == {"predictions": [{"b64": base64.b64encode(raw).decode()}]}


def test_rest_single_input_single_output_model(server: Server) -> None:
    r = post(server, "/v1/models/num:predict", {"instances": [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]})
    assert r.status_code == 200, r.text
    w = np.arange(6, dtype="float32").reshape(3, 2) * 2  # latest version is 2
    expected = (np.array([[1, 2, 3], [0, 0, 1]], dtype="float32") @ w).tolist()
    assert r.json() == {"predictions": expected}
    r = post(server, "/v1/models/num:predict", {"inputs": [[1.0, 2.0, 3.0]]})
    assert r.json() == {"outputs": [expected[0]]}


def test_rest_status_and_metadata_in_tf_serving_form(server: Server) -> None:
    r = requests.get(f"{server.rest_url}/v1/models/rec", timeout=10)
    assert r.status_code == 200
    assert r.json() == {
        "model_version_status": [
            {
                "version": "2",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            },
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            },
        ]
    }
    r = requests.get(f"{server.rest_url}/v1/models/rec/labels/stable", timeout=10)
    assert [v["version"] for v in r.json()["model_version_status"]] == ["1"]
    # latest {num_versions: 1} (the default policy): only version 2 of 'num' is loaded
    r = requests.get(f"{server.rest_url}/v1/models/num", timeout=10)
    assert [v["version"] for v in r.json()["model_version_status"]] == ["2"]

    meta = requests.get(f"{server.rest_url}/v1/models/rec/versions/1/metadata", timeout=10).json()
    assert meta["model_spec"] == {"name": "rec", "signature_name": "", "version": "1"}
    sigs = meta["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "embed_user"} <= set(sigs)
    default = sigs["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    assert default["inputs"]["age"]["dtype"] == "DT_STRING"
    assert default["inputs"]["activity"]["dtype"] == "DT_FLOAT"
    assert default["inputs"]["age"]["tensor_shape"]["dim"][0]["size"] == "-1"
    assert default["outputs"]["item_ids"]["dtype"] == "DT_STRING"
    assert default["outputs"]["scores"]["dtype"] == "DT_FLOAT"
    assert set(sigs["embed_user"]["outputs"]) == {"embedding"}


def test_rest_version_and_label_pinning(server: Server) -> None:
    def top_score(path: str) -> float:
        r = post(server, path, {"instances": [{"age": "x", "activity": 0.0}]})
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]["scores"][0]

    assert 1000 <= top_score("/v1/models/rec/versions/1:predict") < 2000
    assert 2000 <= top_score("/v1/models/rec/versions/2:predict") < 3000
    assert 1000 <= top_score("/v1/models/rec/labels/stable:predict") < 2000
    assert 2000 <= top_score("/v1/models/rec/labels/canary:predict") < 3000
    r = post(
        server,
        "/v1/models/rec/versions/1:predict",
        {"signature_name": "embed_user", "inputs": {"age": ["x"], "activity": [0.0]}},
    )
    assert np.array(r.json()["outputs"]).shape == (1, 4)


ROW = GOOD_ROW["instances"][0]
MALFORMED = [
    # (name, method, path, body, http status, substring of the error)
    ("bad json", "POST", "/v1/models/rec:predict", "{not json", 400, "JSON Parse error"),
    ("empty body", "POST", "/v1/models/rec:predict", "", 400, "The document is empty"),
    ("not an object", "POST", "/v1/models/rec:predict", "[1, 2]", 400, "Is not object"),
    (
        "signature not a string",
        "POST",
        "/v1/models/rec:predict",
        {"signature_name": 3, "instances": [ROW]},
        400,
        "'signature_name' key must be a string",
    ),
    (
        "wrong signature",
        "POST",
        "/v1/models/rec:predict",
        {"signature_name": "nope", "instances": [ROW]},
        400,
        'Serving signature name: "nope" not found',
    ),
    (
        "unknown model",
        "POST",
        "/v1/models/nomodel:predict",
        {"instances": [ROW]},
        404,
        "Servable not found for request: Latest(nomodel)",
    ),
    (
        "unknown version",
        "POST",
        "/v1/models/rec/versions/9:predict",
        {"instances": [ROW]},
        404,
        "Servable not found for request: Specific(rec, 9)",
    ),
    (
        "version not loaded by policy",
        "POST",
        "/v1/models/num/versions/1:predict",
        {"instances": [[1.0, 2.0, 3.0]]},
        404,
        "Specific(num, 1)",
    ),
    (
        "unknown label",
        "POST",
        "/v1/models/rec/labels/nolabel:predict",
        {"instances": [ROW]},
        400,
        "Unrecognized servable version label: nolabel",
    ),
    (
        "missing input (row)",
        "POST",
        "/v1/models/rec:predict",
        {"instances": [{"age": "a"}]},
        400,
        "keys must be equal to: activity,age",
    ),
    (
        "missing input (columnar)",
        "POST",
        "/v1/models/rec:predict",
        {"inputs": {"age": ["a"]}},
        400,
        "Missing named input: activity",
    ),
    (
        "unknown input (row)",
        "POST",
        "/v1/models/rec:predict",
        {"instances": [{**ROW, "height": 1.0}]},
        400,
        "does not have named input: height",
    ),
    (
        "unknown input (columnar)",
        "POST",
        "/v1/models/rec:predict",
        {"inputs": {"age": ["a"], "activity": [1.0], "height": [1.0]}},
        400,
        "does not have named input: height",
    ),
    (
        "number for a string input",
        "POST",
        "/v1/models/rec:predict",
        {"instances": [{"age": 25, "activity": 1.0}]},
        400,
        "JSON Value: 25 Type: Number is not of expected type: string",
    ),
    (
        "string for a float input",
        "POST",
        "/v1/models/rec:predict",
        {"inputs": {"age": ["a"], "activity": ["high"]}},
        400,
        "is not of expected type: float",
    ),
    (
        "bool for a float input",
        "POST",
        "/v1/models/rec:predict",
        {"instances": [{"age": "a", "activity": True}]},
        400,
        "Type: True is not of expected type",
    ),
    (
        "lossy integer for float",
        "POST",
        "/v1/models/rec:predict",
        {"instances": [{"age": "a", "activity": 2**40}]},
        400,
        "without loss of precision",
    ),
    (
        "ragged batch",
        "POST",
        "/v1/models/rec:predict",
        {"inputs": {"age": ["a", "b"], "activity": [1.0]}},
        400,
        "equal 0th-dimension size",
    ),
    (
        "ragged instances",
        "POST",
        "/v1/models/rec:predict",
        {"instances": [ROW, {"age": ["b", "c"], "activity": 1.0}]},
        400,
        "Expecting shape",
    ),
    (
        "wrong rank",
        "POST",
        "/v1/models/rec:predict",
        {"inputs": {"age": ["a"], "activity": [[1.0]]}},
        400,
        "has shape [1, 1]",
    ),
    (
        "batch larger than max",
        "POST",
        "/v1/models/rec:predict",
        {"instances": [ROW] * (MAX_BATCH + 1)},
        400,
        f"Task size {MAX_BATCH + 1} is larger than maximum input batch size {MAX_BATCH}",
    ),
    (
        "empty instances",
        "POST",
        "/v1/models/rec:predict",
        {"instances": []},
        400,
        "No values in 'instances' array",
    ),
    (
        "instances not a list",
        "POST",
        "/v1/models/rec:predict",
        {"instances": {"age": "a"}},
        400,
        "Excepting 'instances' to be an list/array",
    ),
    (
        "both instances and inputs",
        "POST",
        "/v1/models/rec:predict",
        {"instances": [ROW], "inputs": {"age": ["a"]}},
        400,
        "expecting only one of",
    ),
    (
        "neither instances nor inputs",
        "POST",
        "/v1/models/rec:predict",
        {"signature_name": ""},
        400,
        "Missing 'inputs' or 'instances' key",
    ),
    (
        "plain list for a two-input model",
        "POST",
        "/v1/models/rec:predict",
        {"instances": ["a", "b"]},
        400,
        "instances is a plain list",
    ),
    (
        "bad base64",
        "POST",
        "/v1/models/rec:predict",
        {"instances": [{"age": {"b64": "***"}, "activity": 1.0}]},
        400,
        "Unable to base64 decode",
    ),
    (
        "unknown verb",
        "POST",
        "/v1/models/rec:frobnicate",
        {"instances": [ROW]},
        400,
        "Malformed request",
    ),
    ("classify", "POST", "/v1/models/rec:classify", {"examples": []}, 501, "not supported"),
    (
        "status of unknown model",
        "GET",
        "/v1/models/nomodel",
        None,
        404,
        "Could not find any versions of model nomodel",
    ),
    (
        "status of unknown version",
        "GET",
        "/v1/models/rec/versions/7",
        None,
        404,
        "Could not find version 7 of model rec",
    ),
    (
        "metadata of unknown version",
        "GET",
        "/v1/models/rec/versions/7/metadata",
        None,
        404,
        "Servable not found",
    ),
    ("status without a model name", "GET", "/v1/models", None, 400, "Missing model name"),
]


def test_malformed_rest_requests_get_tf_serving_errors_and_server_keeps_serving(
    server: Server,
) -> None:
    assert len(MALFORMED) >= 15
    for name, method, path, body, status, fragment in MALFORMED:
        if method == "POST":
            r = post(server, path, body)
        else:
            r = requests.get(f"{server.rest_url}{path}", timeout=10)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["Content-Type"].startswith("application/json"), name
        error = r.json()["error"]
        assert fragment in error, (name, error)
    good = post(server, "/v1/models/rec:predict", GOOD_ROW)
    assert good.status_code == 200 and len(good.json()["predictions"]) == 2


def metric(srv: Server, sample: str, **labels: str) -> float:
    """Sum of the samples named `sample` whose labels include `labels` (0 when none)."""
    text = requests.get(f"{srv.rest_url}/monitoring/prometheus/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_prometheus_metrics(server: Server) -> None:
    count = ":tensorflow:serving:request_count_total"
    ok_before = metric(
        server, count, model_name="rec", API="predict", entrypoint="REST", status="OK"
    )
    bad_before = metric(server, count, model_name="rec", status="INVALID_ARGUMENT")
    post(server, "/v1/models/rec:predict", GOOD_ROW)
    post(server, "/v1/models/rec:predict", "{bad")
    assert (
        metric(server, count, model_name="rec", API="predict", entrypoint="REST", status="OK")
        == ok_before + 1
    )
    assert metric(server, count, model_name="rec", status="INVALID_ARGUMENT") == bad_before + 1
    assert metric(server, ":tensorflow:serving:request_latency_count", model_name="rec") >= 2
    assert metric(server, "tfrs_devserver_loaded_versions", model_name="rec") == 2


# ---------------------------------------------------------------------------------------------
# gRPC
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stubs(server: Server):
    channel = grpc.insecure_channel(server.grpc_address)
    yield (
        prediction_service_pb2_grpc.PredictionServiceStub(channel),
        model_service_pb2_grpc.ModelServiceStub(channel),
    )
    channel.close()


def grpc_request(
    model: str = "rec",
    signature: str = "",
    version: int | None = None,
    label: str | None = None,
    **inputs,
) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    for k, v in inputs.items():
        req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    return req


GOOD_INPUTS = {
    "age": np.array([b"25-34", b"18-24"], dtype=object),
    "activity": np.array([0.5, 1.0], dtype=np.float32),
}


def test_grpc_predict_matches_rest(server: Server, stubs) -> None:
    prediction, _ = stubs
    resp = prediction.Predict(grpc_request(**GOOD_INPUTS), timeout=30)
    assert resp.model_spec.name == "rec" and resp.model_spec.version.value == 2
    assert resp.model_spec.signature_name == "serving_default"
    ids = tf.make_ndarray(resp.outputs["item_ids"])
    scores = tf.make_ndarray(resp.outputs["scores"])
    assert ids.shape == (2, K) and scores.dtype == np.float32
    rest = post(server, "/v1/models/rec:predict", GOOD_ROW).json()["predictions"]
    assert [[i.decode() for i in row] for row in ids] == [p["item_ids"] for p in rest]
    np.testing.assert_allclose(scores, [p["scores"] for p in rest], rtol=1e-6)

    pinned = prediction.Predict(grpc_request(label="stable", **GOOD_INPUTS), timeout=30)
    assert pinned.model_spec.version.value == 1
    filtered = grpc_request(signature="embed_user", version=1, **GOOD_INPUTS)
    emb = prediction.Predict(filtered, timeout=30)
    assert tf.make_ndarray(emb.outputs["embedding"]).shape == (2, 4)


def test_grpc_metadata_and_status(stubs) -> None:
    prediction, models = stubs
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "rec"
    req.model_spec.version.value = 1
    resp = prediction.GetModelMetadata(req, timeout=10)
    assert resp.model_spec.version.value == 1
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert resp.metadata["signature_def"].Unpack(sig_map)
    assert set(sig_map.signature_def["serving_default"].inputs) == {"age", "activity"}

    sreq = get_model_status_pb2.GetModelStatusRequest()
    sreq.model_spec.name = "rec"
    status = models.GetModelStatus(sreq, timeout=10)
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (2, get_model_status_pb2.ModelVersionStatus.AVAILABLE),
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE),
    ]


def test_malformed_grpc_requests_get_matching_codes(stubs) -> None:
    prediction, models = stubs
    C = grpc.StatusCode
    one = {"age": np.array([b"a"], dtype=object), "activity": np.array([1.0], np.float32)}
    cases = [
        ("unknown model", grpc_request(model="nomodel", **one), C.NOT_FOUND, "Latest(nomodel)"),
        ("unknown version", grpc_request(version=9, **one), C.NOT_FOUND, "Specific(rec, 9)"),
        ("unknown label", grpc_request(label="x", **one), C.INVALID_ARGUMENT, "version label: x"),
        (
            "wrong signature",
            grpc_request(signature="nope", **one),
            C.FAILED_PRECONDITION,
            'Serving signature key "nope" not found.',
        ),
        (
            "missing input",
            grpc_request(age=one["age"]),
            C.INVALID_ARGUMENT,
            "Missing but required: {activity}",
        ),
        (
            "extra input",
            grpc_request(**one, height=np.array([1.0], np.float32)),
            C.INVALID_ARGUMENT,
            "Sent extra: {height}",
        ),
        (
            "float for string",
            grpc_request(age=np.array([1.0], np.float32), activity=one["activity"]),
            C.INVALID_ARGUMENT,
            "Expects arg[age] to be string but float is provided",
        ),
        (
            "double for float",
            grpc_request(age=one["age"], activity=np.array([1.0])),
            C.INVALID_ARGUMENT,
            "to be float but double is provided",
        ),
        (
            "ragged batch",
            grpc_request(age=np.array([b"a", b"b"], dtype=object), activity=one["activity"]),
            C.INVALID_ARGUMENT,
            "equal 0th-dimension size",
        ),
        (
            "oversized batch",
            grpc_request(age=np.array([b"a"] * 9, dtype=object), activity=np.ones(9, np.float32)),
            C.INVALID_ARGUMENT,
            "larger than maximum input batch size",
        ),
    ]
    for name, req, code, fragment in cases:
        with pytest.raises(grpc.RpcError) as info:
            prediction.Predict(req, timeout=10)
        assert info.value.code() == code, (name, info.value.code(), info.value.details())
        assert fragment in info.value.details(), (name, info.value.details())

    empty = get_model_metadata_pb2.GetModelMetadataRequest()
    empty.model_spec.name = "rec"
    with pytest.raises(grpc.RpcError) as info:
        prediction.GetModelMetadata(empty, timeout=10)
    assert info.value.code() == C.INVALID_ARGUMENT
    sreq = get_model_status_pb2.GetModelStatusRequest()
    sreq.model_spec.name = "rec"
    sreq.model_spec.version.value = 7
    with pytest.raises(grpc.RpcError) as info:
        models.GetModelStatus(sreq, timeout=10)
    assert info.value.code() == C.NOT_FOUND
    ok = prediction.Predict(grpc_request(**one), timeout=10)
    assert tf.make_ndarray(ok.outputs["scores"]).shape == (1, K)


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def _batch_counts(srv: Server) -> tuple[float, float]:
    """(batches of exactly one row, all batches) run so far for model 'rec'."""
    name = "tfrs_devserver_processed_batch_size"
    return (
        metric(srv, f"{name}_bucket", model_name="rec", le="1.0"),
        metric(srv, f"{name}_count", model_name="rec"),
    )


def test_concurrent_requests_are_batched_and_split_back_correctly(server: Server) -> None:
    ages = [f"age-{i}" for i in range(12)]
    expected = {}
    for age in ages:  # one at a time: every batch holds one request
        r = post(
            server,
            "/v1/models/rec/versions/1:predict",
            {"instances": [{"age": age, "activity": 0.25}]},
        )
        expected[age] = r.json()["predictions"][0]
    ones_before, count_before = _batch_counts(server)

    barrier = threading.Barrier(len(ages))
    results: dict[str, dict] = {}
    errors: list[str] = []

    def worker(age: str) -> None:
        barrier.wait(timeout=10)
        r = post(
            server,
            "/v1/models/rec/versions/1:predict",
            {"instances": [{"age": age, "activity": 0.25}]},
        )
        if r.status_code != 200:
            errors.append(r.text)
        else:
            results[age] = r.json()["predictions"][0]

    threads = [threading.Thread(target=worker, args=(a,)) for a in ages]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert results == expected  # every request got its own rows back
    ones_after, count_after = _batch_counts(server)
    batches = count_after - count_before
    assert batches < len(ages), "no two concurrent requests shared a batch"
    assert batches > (ones_after - ones_before)


# ---------------------------------------------------------------------------------------------
# Hot swap under load
# ---------------------------------------------------------------------------------------------


def test_new_version_is_swapped_in_under_load_without_failed_requests(tmp_path: Path) -> None:
    base = tmp_path / "export"
    publish_recommender(base, "live", 1)
    batching = BatchingParameters(
        max_batch_size=16, batch_timeout_micros=2000, max_enqueued_batches=1000
    )
    srv = Server(base, None, rest_port=0, grpc_port=0, poll_seconds=0.2, batching=batching)
    srv.start()
    stop = threading.Event()
    failures: list[str] = []
    seen: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 60

    def record(score: float) -> None:
        with lock:
            seen.append(int(score // 1000))

    def rest_worker() -> None:
        session = requests.Session()
        for _ in range(2000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                r = session.post(
                    f"{srv.rest_url}/v1/models/live:predict",
                    timeout=30,
                    data=json.dumps({"instances": [{"age": "a", "activity": 1.0}]}),
                )
                if r.status_code != 200:
                    failures.append(f"REST {r.status_code} {r.text}")
                else:
                    record(r.json()["predictions"][0]["scores"][0])
            except requests.RequestException as exc:
                failures.append(f"REST {exc!r}")

    def grpc_worker() -> None:
        channel = grpc.insecure_channel(srv.grpc_address)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        req = grpc_request(
            model="live", age=np.array([b"a"], dtype=object), activity=np.array([1.0], np.float32)
        )
        for _ in range(2000):
            if stop.is_set() or time.monotonic() > deadline:
                break
            try:
                resp = stub.Predict(req, timeout=30)
                record(float(tf.make_ndarray(resp.outputs["scores"])[0, 0]))
            except grpc.RpcError as exc:
                failures.append(f"gRPC {exc.code()} {exc.details()}")
        channel.close()

    threads = [threading.Thread(target=rest_worker) for _ in range(3)]
    threads += [threading.Thread(target=grpc_worker) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        publish_recommender(base, "live", 2)  # atomic rename into the base path
        while time.monotonic() < deadline:
            with lock:
                if 2 in seen[-20:] and seen.count(2) >= 20:
                    break
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        status = requests.get(f"{srv.rest_url}/v1/models/live", timeout=10).json()
        srv.stop()
    assert failures == []
    assert len(seen) > 100, f"only {len(seen)} requests ran"
    assert 1 in seen and 2 in seen, "the new version never answered"
    first_new = seen.index(2)
    assert seen[first_new + 50 :].count(1) == 0 if len(seen) > first_new + 50 else True
    states = {v["version"]: v["state"] for v in status["model_version_status"]}
    assert states == {"2": "AVAILABLE", "1": "END"}


def test_failed_warmup_keeps_the_previous_version_serving(tmp_path: Path) -> None:
    base = tmp_path / "export"
    good = predict_pb2.PredictRequest()
    good.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((1, 3), np.float32)))
    publish_numeric(base, "num", 1, warmup=[good])
    manager = devserver.ModelManager(base, None)
    manager.poll()
    assert manager.resolve("num").version == 1
    bad = predict_pb2.PredictRequest()
    bad.inputs["wrong"].CopyFrom(tf.make_tensor_proto(np.ones((1, 3), np.float32)))
    publish_numeric(base, "num", 2, warmup=[bad])
    manager.poll()
    assert manager.resolve("num").version == 1  # latest-1 wants 2, but 2 failed: 1 stays
    status = {s.version: s for s in manager.status("num").model_version_status}
    assert status[1].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status[2].state == get_model_status_pb2.ModelVersionStatus.END
    assert "warm-up request #1 failed" in status[2].status.error_message
    manager.poll()  # a failed version is not retried until its files change
    assert manager.resolve("num").version == 1
    manager.close()


# ---------------------------------------------------------------------------------------------
# Config files and CLI
# ---------------------------------------------------------------------------------------------


def test_models_config_parsing(tmp_path: Path) -> None:
    cfg = tmp_path / "models.config"
    cfg.write_text(
        MODELS_CONFIG.replace(
            "model_version_policy { all {} }", "model_version_policy { specific { versions: 1 } }"
        )
    )
    (tmp_path / "export" / "rec").mkdir(parents=True)
    models = {m.name: m for m in devserver.parse_models_config(cfg, tmp_path / "export")}
    assert models["rec"].policy == "specific" and models["rec"].versions == (1,)
    assert models["rec"].labels == {"stable": 1, "canary": 2}
    assert models["rec"].base_path == tmp_path / "export" / "rec"  # /models/rec mapped locally
    assert models["num"].policy == "latest" and models["num"].num_versions == 1
    assert models["rec"].wanted([1, 2, 3]) == {1}
    assert models["num"].wanted([1, 2, 3]) == {3}

    cfg.write_text("model_config_list { config { name: 'a' base_path: '/x' } bogus: 1 }")
    with pytest.raises(ConfigError, match="models.config"):
        devserver.parse_models_config(cfg)
    cfg.write_text(
        "model_config_list { config { name: 'a' base_path: '/x' } "
        "config { name: 'a' base_path: '/y' } }"
    )
    with pytest.raises(ConfigError, match="appears twice"):
        devserver.parse_models_config(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        devserver.discover_models(tmp_path / "missing")


def test_batching_config_parsing(tmp_path: Path) -> None:
    path = tmp_path / "batching.config"
    path.write_text(BATCHING_CONFIG)
    params = devserver.parse_batching_config(path)
    assert params == BatchingParameters(
        max_batch_size=MAX_BATCH,
        batch_timeout_micros=50000,
        max_enqueued_batches=100,
        num_batch_threads=2,
    )
    path.write_text("max_batch_size { value: 4 }")
    assert devserver.parse_batching_config(path).batch_timeout_micros == 0  # TF Serving default
    path.write_text("max_batch_size { value: 4 } not_a_field { value: 1 }")
    with pytest.raises(ConfigError, match="not_a_field"):
        devserver.parse_batching_config(path)
    path.write_text("max_batch_size { value: 0 }")
    with pytest.raises(ConfigError, match="max_batch_size must be >= 1"):
        devserver.parse_batching_config(path)


def test_status_codes_map_both_ways() -> None:
    """The server's HTTP status for a code and the client's code for an HTTP status agree."""
    for http, code in status_codes.CODE_BY_HTTP.items():
        assert status_codes.HTTP_STATUS[code] == http, code
    assert set(status_codes.CODE_BY_HTTP) == set(status_codes.HTTP_STATUS.values()) - {200}
    assert status_codes.code_for_http(418) == "UNKNOWN"
    assert status_codes.code_name(grpc.StatusCode.NOT_FOUND.value[0]) == "NOT_FOUND"
    assert status_codes.code_name(999) == "999"


def test_version_folders(tmp_path: Path) -> None:
    model = tmp_path / "num"
    for name in ("3", "12"):
        (model / name).mkdir(parents=True)
        (model / name / "saved_model.pb").write_bytes(b"")
    (model / "5").mkdir()  # still being written: not servable, but its number is taken
    (model / ".tmp-7-1234").mkdir()
    (model / ".added_items").mkdir()
    assert list_versions(model) == [3, 12]
    assert list_versions(model, complete_only=False) == [3, 5, 12]
    assert list_versions(tmp_path / "missing") == []


def test_serve_errors_are_one_line_exit_2(
    tmp_path: Path,
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)  # no serving/models.config or batching.config picked up here
    monkeypatch.delenv("TFRS_COLDSTART_DEBUG", raising=False)
    assert issubclass(ConfigError, UserError) and issubclass(devserver.ListenError, UserError)
    bad = tmp_path / "models.config"
    bad.write_text("model_config_list { config { name: 'a' } bogus: 1 }")
    assert cli.main(["serve", "--models-config", str(bad)]) == 2
    assert "not a valid ModelServerConfig" in capsys.readouterr().err
    (tmp_path / "export").mkdir()
    taken = ["--grpc-port", str(server.grpc_port), "--rest-port", "0", "--no-batching"]
    assert cli.main(["serve", "--model-base", str(tmp_path / "export"), *taken]) == 2
    assert f"cannot listen for gRPC on 127.0.0.1:{server.grpc_port}" in capsys.readouterr().err


def test_cli_serves_until_ctrl_c(tmp_path: Path) -> None:
    base = tmp_path / "export"
    publish_numeric(base, "num", 1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tfrs_coldstart.serving.devserver",
            "--model-base",
            str(base),
            "--rest-port",
            "0",
            "--grpc-port",
            "0",
            "--poll-seconds",
            "0",
            "--enable-batching",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        url = None
        lines = []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"REST on (http://\S+)", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        r = requests.post(
            f"{url}/v1/models/num:predict",
            timeout=10,
            data=json.dumps({"instances": [[1.0, 1.0, 1.0]]}),
        )
        assert r.json() == {"predictions": [[6.0, 9.0]]}
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
