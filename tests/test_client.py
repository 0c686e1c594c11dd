"""REST and gRPC clients against the dev server (and a real TF Serving when one is configured)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import tensorflow as tf
from conftest import make_recommender

from tfrs_coldstart import cli
from tfrs_coldstart.errors import UserError
from tfrs_coldstart.serving.client import (
    ClientInputError,
    GrpcClient,
    ModelVersionStatus,
    Recommendation,
    RestClient,
    ServingError,
)
from tfrs_coldstart.serving.devserver import Server


def recommend_cli(argv: list[str]) -> int:
    """``tfrs-coldstart recommend ...`` through the one CLI entry point; returns the exit code."""
    return cli.main(["recommend", *argv])

ITEMS = [f"movie{i}" for i in range(20)]
K = 10


def _publish(base: Path, version: int) -> None:
    m = make_recommender(ITEMS, K, version, dim=8, buckets=32, seed=1)
    staging = base.parent / f".staging-{version}"
    tf.saved_model.save(
        m, str(staging), signatures={"serving_default": m.recommend, "embed_user": m.embed_user}
    )
    (base / "student").mkdir(parents=True, exist_ok=True)
    os.rename(staging, base / "student" / str(version))


MODELS_CONFIG = """
model_config_list {
  config {
    name: "student"
    base_path: "/models/student"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("client")
    base = root / "export"
    for v in (1, 2):
        _publish(base, v)
    (root / "models.config").write_text(MODELS_CONFIG)
    srv = Server(base, root / "models.config", rest_port=0, grpc_port=0, poll_seconds=0)
    srv.start()
    yield srv, root
    srv.stop()


@pytest.fixture(scope="module")
def server(served) -> Server:
    return served[0]


def make_client(kind: str, srv: Server, **kw) -> RestClient | GrpcClient:
    if kind == "rest":
        return RestClient(srv.rest_url, kw.pop("model", "student"), **kw)
    return GrpcClient(srv.grpc_address, kw.pop("model", "student"), **kw)


KINDS = ["rest", "grpc"]
USERS = [{"age": "25-34", "activity": 0.5}, {"age": "45-49", "activity": 2.0}]


@pytest.mark.parametrize("kind", KINDS)
def test_predict_returns_typed_arrays(kind: str, server: Server) -> None:
    with make_client(kind, server) as client:
        out = client.predict({"age": ["25-34", "45-49"], "activity": [0.5, 2.0]})
        assert set(out) == {"item_ids", "scores"}
        assert out["item_ids"].shape == (2, K) and out["item_ids"].dtype == object
        assert all(isinstance(x, bytes) for x in out["item_ids"].ravel())
        assert out["scores"].dtype == np.float32 and out["scores"].shape == (2, K)
        emb = client.predict(
            {"age": np.array(["a"]), "activity": np.array([1.0])}, signature="embed_user"
        )
        assert emb["embedding"].shape == (1, 8) and emb["embedding"].dtype == np.float32


def test_rest_and_grpc_agree(server: Server) -> None:
    with make_client("rest", server) as rest, make_client("grpc", server) as grpc_client:
        assert rest.recommend(USERS) == grpc_client.recommend(USERS)
        assert rest.metadata() == grpc_client.metadata()
        assert rest.status() == grpc_client.status()


@pytest.mark.parametrize("kind", KINDS)
def test_recommend_one_and_many_users(kind: str, server: Server) -> None:
    with make_client(kind, server) as client:
        many = client.recommend(USERS)
        assert len(many) == 2 and all(isinstance(r, Recommendation) for r in many)
        assert all(len(r.item_ids) == K and set(r.item_ids) <= set(ITEMS) for r in many)
        assert all(r.scores == sorted(r.scores, reverse=True) for r in many)
        one = client.recommend(USERS[1], k=3)
        assert one == [Recommendation(many[1].item_ids[:3], many[1].scores[:3])]


@pytest.mark.parametrize("kind", KINDS)
def test_version_and_label_pinning(kind: str, server: Server) -> None:
    def served_version(**kw) -> int:
        with make_client(kind, server, **kw) as client:
            return int(client.recommend(USERS[0])[0].scores[0] // 1000)

    assert served_version() == 2
    assert served_version(version=1) == 1
    assert served_version(label="stable") == 1
    assert served_version(label="canary") == 2
    with make_client(kind, server, version=1) as client:
        assert client.status() == [ModelVersionStatus(1, "AVAILABLE", "OK", "")]
        assert client.metadata()["model_spec"]["version"] == "1"
    with make_client(kind, server) as client:
        assert [s.version for s in client.status()] == [2, 1]
    with pytest.raises(ClientInputError):
        make_client(kind, server, version=1, label="stable")


@pytest.mark.parametrize("kind", KINDS)
def test_errors_are_typed(kind: str, server: Server) -> None:
    with make_client(kind, server, model="nomodel") as client, pytest.raises(ServingError) as e:
        client.status()
    assert e.value.code == "NOT_FOUND" and "nomodel" in e.value.message
    with make_client(kind, server, version=9) as client, pytest.raises(ServingError) as e:
        client.recommend(USERS[0])
    assert e.value.code == "NOT_FOUND"
    with make_client(kind, server, label="nolabel") as client, pytest.raises(ServingError) as e:
        client.status()
    assert e.value.code == "INVALID_ARGUMENT"
    with make_client(kind, server) as client:
        with pytest.raises(ServingError) as e:
            client.recommend({"age": 25, "activity": 1.0})  # number for a string feature
        assert e.value.code == "INVALID_ARGUMENT" and "string" in e.value.message
        with pytest.raises(ServingError) as e:
            client.recommend({"age": "25-34"})  # a feature missing
        assert e.value.code == "INVALID_ARGUMENT" and "activity" in e.value.message
        with pytest.raises(ClientInputError, match="user #1"):
            client.recommend([{"age": "a", "activity": 1.0}, {"age": "b"}])
        with pytest.raises(ClientInputError):
            client.recommend([])
        assert len(client.recommend(USERS)) == 2  # the client still works


def _metric(srv: Server, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{srv.rest_url}/monitoring/prometheus/metrics", timeout=10).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == ":tensorflow:serving:request_count_total"
        and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.parametrize("kind", KINDS)
def test_client_errors_are_not_retried(kind: str, server: Server) -> None:
    entry = "REST" if kind == "rest" else "GRPC"
    before = _metric(server, model_name="student", entrypoint=entry, status="INVALID_ARGUMENT")
    with make_client(kind, server, retries=3) as client, pytest.raises(ServingError):
        client.recommend({"age": 25, "activity": 1.0})
    after = _metric(server, model_name="student", entrypoint=entry, status="INVALID_ARGUMENT")
    assert after == before + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unavailable_is_retried_until_the_server_comes_up(served) -> None:
    _, root = served
    rest_port, grpc_port = _free_port(), _free_port()
    rest = RestClient(f"127.0.0.1:{rest_port}", "student", retries=8, backoff=0.2)
    grpc_client = GrpcClient(f"127.0.0.1:{grpc_port}", "student", retries=8, backoff=0.2)
    with pytest.raises(ServingError) as e:
        RestClient(f"127.0.0.1:{rest_port}", "student", retries=0).status()
    assert e.value.code == "UNAVAILABLE"

    results: dict[str, object] = {}

    def call(name: str, client) -> None:
        try:
            results[name] = client.recommend(USERS[0])
        except Exception as exc:  # noqa: BLE001
            results[name] = exc

    threads = [
        threading.Thread(target=call, args=("rest", rest)),
        threading.Thread(target=call, args=("grpc", grpc_client)),
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)  # both clients are failing and backing off now
    srv = Server(
        root / "export",
        root / "models.config",
        rest_port=rest_port,
        grpc_port=grpc_port,
        poll_seconds=0,
    )
    srv.start()
    try:
        for t in threads:
            t.join(timeout=60)
    finally:
        srv.stop()
        rest.close()
        grpc_client.close()
    assert isinstance(results["rest"], list), results["rest"]
    assert isinstance(results["grpc"], list), results["grpc"]


@pytest.mark.parametrize("kind", KINDS)
def test_timeout_raises_deadline_exceeded(kind: str) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        client = (
            RestClient(address, "student", timeout=0.5, retries=2)
            if kind == "rest"
            else GrpcClient(address, "student", timeout=0.5, retries=2)
        )
        t0 = time.monotonic()
        with pytest.raises(ServingError) as e:
            client.status()
        assert e.value.code == "DEADLINE_EXCEEDED"
        assert time.monotonic() - t0 < 5
        client.close()


def test_recommend_cli(server: Server, capsys: pytest.CaptureFixture) -> None:
    user = json.dumps(USERS[0])
    assert (
        recommend_cli(
            ["--server", server.rest_url.removeprefix("http://"), "--user", user, "--k", "4"]
        )
        == 0
    )
    rest_lines = capsys.readouterr().out.strip().splitlines()
    assert len(rest_lines) == 1
    rec = json.loads(rest_lines[0])
    assert len(rec["item_ids"]) == 4 and len(rec["scores"]) == 4

    assert (
        recommend_cli(
            [
                "--server",
                server.grpc_address,
                "--grpc",
                "--k",
                "4",
                "--user",
                json.dumps(USERS),
                "--label",
                "canary",
            ]
        )
        == 0
    )
    grpc_lines = capsys.readouterr().out.strip().splitlines()
    assert len(grpc_lines) == 2
    first = json.loads(grpc_lines[0])  # same user, same version (2), now in a batch of two
    assert first["item_ids"] == rec["item_ids"]
    assert first["scores"] == pytest.approx(rec["scores"], rel=1e-5)

    # every command error exits 2 with one line: bad input (nothing sent) and server errors
    assert issubclass(ClientInputError, UserError) and issubclass(ServingError, UserError)
    assert recommend_cli(["--server", server.grpc_address, "--grpc", "--user", "{oops"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert (
        recommend_cli(
            ["--server", server.grpc_address, "--grpc", "--model", "nomodel", "--user", user]
        )
        == 2
    )
    assert "error: NOT_FOUND: " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Against a real TF Serving (skipped unless TFSERVING_REST_URL / TFSERVING_GRPC_ADDR are set)
# ---------------------------------------------------------------------------------------------

REAL_REST = os.environ.get("TFSERVING_REST_URL")
REAL_GRPC = os.environ.get("TFSERVING_GRPC_ADDR")
REAL_MODEL = os.environ.get("TFSERVING_MODEL", "student")


def _dummy_user(metadata: dict) -> dict:
    """One user with a neutral value for every input of serving_default."""
    sig = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    user = {}
    for name, info in sig["inputs"].items():
        dims = [int(d["size"]) for d in info.get("tensor_shape", {}).get("dim", [])][1:]
        leaf = "" if info["dtype"] == "DT_STRING" else 0.0
        value = leaf
        for size in reversed(dims):
            value = [value] * max(size, 1)
        user[name] = value
    return user


@pytest.mark.skipif(
    not (REAL_REST or REAL_GRPC),
    reason="set TFSERVING_REST_URL and/or TFSERVING_GRPC_ADDR to a real TF Serving",
)
def test_against_real_tf_serving() -> None:
    clients = []
    if REAL_REST:
        clients.append(RestClient(REAL_REST, REAL_MODEL))
    if REAL_GRPC:
        clients.append(GrpcClient(REAL_GRPC, REAL_MODEL))
    answers = []
    for client in clients:
        assert any(s.state == "AVAILABLE" for s in client.status())
        meta = client.metadata()
        assert "serving_default" in meta["metadata"]["signature_def"]["signature_def"]
        recs = client.recommend([_dummy_user(meta)] * 2)
        assert len(recs) == 2 and recs[0].item_ids and len(recs[0].item_ids) == len(recs[0].scores)
        answers.append(recs)
        missing = type(client)(
            REAL_REST if isinstance(client, RestClient) else REAL_GRPC, "no-such-model-xyz"
        )
        with pytest.raises(ServingError) as e:
            missing.status()
        assert e.value.code == "NOT_FOUND"
    if len(answers) == 2:
        assert [r.item_ids for r in answers[0]] == [r.item_ids for r in answers[1]]
    if REAL_REST:
        url = REAL_REST if "://" in REAL_REST else f"http://{REAL_REST}"
        r = requests.post(
            f"{url.rstrip('/')}/v1/models/{REAL_MODEL}:predict", data="{bad", timeout=10
        )
        assert r.status_code == 400 and "JSON Parse error" in r.json()["error"]
        r = requests.post(
            f"{url.rstrip('/')}/v1/models/{REAL_MODEL}:predict",
            data=json.dumps({"signature_name": "nope", "instances": [1]}),
            timeout=10,
        )
        assert r.status_code == 400 and "nope" in r.json()["error"]
