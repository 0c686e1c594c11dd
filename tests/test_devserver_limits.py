"""Hostile and careless clients against the dev server, over real sockets on 127.0.0.1.

Each test pins one defect of issue 15: a request's declared size is refused before it is
allocated (gRPC shape [2^28], oversized REST bodies, too many instances), deep JSON is a 400,
the HTTP stack's own errors are JSON, idle and half-open connections close quietly, and
SIGTERM drains requests already received. Every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

import tfrs_coldstart  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

# isort: split
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from test_devserver import publish, publish_numeric, publish_recommender

from tfrs_coldstart.serving.devserver import RequestLimits, Server

MiB = 1024 * 1024
#: Peak RSS growth allowed while the server refuses the hostile request (it was 1 GiB).
GRPC_RSS_BOUND = 64 * MiB
#: Peak RSS growth allowed while the server refuses 100,000 REST instances (it was 4.2 GB).
REST_RSS_BOUND = 400 * MiB
#: Peak RSS growth allowed while the server answers 64 rows, one with a 1 MB multi-hot cell
#: (it took ~1.4 GB: the model pads every row's tags to the longest row).
TAGS_RSS_BOUND = 96 * MiB
#: Peak RSS growth allowed while the server refuses a ~63 MiB body of 21M empty lists (parsed,
#: it took ~1.4 GB): the body's own copies as it is read, not its parse.
JSON_RSS_BOUND = 256 * MiB
IDLE = 1.0  # the test server's idle timeout, seconds


def rss_bytes() -> int:
    """This process's resident set size (the in-process server's memory)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def peak_rss_growth(action: Callable[[], object], max_seconds: float = 60.0) -> tuple[int, object]:
    """Run ``action`` while sampling RSS every 2 ms; returns (peak growth in bytes, result)."""
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        deadline = time.monotonic() + max_seconds
        while not done.is_set() and time.monotonic() < deadline:
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = action()
    finally:
        done.set()
        sampler.join(timeout=5)
    peak[0] = max(peak[0], rss_bytes())
    return peak[0] - base, result


class _Tags(tf.Module):
    """A multi-hot tower as the exported ones encode it: 'tags' (``|``-joined) split, padded to
    the longest row, hashed, embedded and averaged -> 'y' [batch, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = tf.Variable(np.random.default_rng(0).normal(size=(64, 8)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="tags")])
    def predict(self, tags: tf.Tensor) -> dict[str, tf.Tensor]:
        parts = tf.strings.split(tags, sep="|").to_tensor("")  # [batch, longest row]
        vecs = tf.gather(self.emb, tf.strings.to_hash_bucket_fast(parts, 64))
        mask = tf.cast(parts != "", tf.float32)[..., None]
        return {"y": tf.math.divide_no_nan(tf.reduce_sum(vecs * mask, 1),
                                           tf.reduce_sum(mask, 1))}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """Batching off (the limits must hold without it), default limits, a short idle timeout."""
    base = tmp_path_factory.mktemp("limits") / "export"
    publish_numeric(base, "num", 1)
    publish_recommender(base, "rec", 1)
    tags = _Tags()
    publish(base, "tags", 1, tags, {"serving_default": tags.predict})
    srv = Server(base, None, rest_port=0, grpc_port=0, poll_seconds=0, idle_timeout=IDLE)
    srv.start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory):
    """Small limits, to refuse bodies and messages without sending megabytes."""
    base = tmp_path_factory.mktemp("small") / "export"
    publish_numeric(base, "num", 1)
    limits = RequestLimits(
        max_request_bytes=64 * 1024, max_instances=5, max_tensor_elements=30, max_json_values=200
    )
    srv = Server(base, None, rest_port=0, grpc_port=0, poll_seconds=0, limits=limits)
    srv.start()
    yield srv
    srv.stop(grace=1)


def float_request(shape: list[int], values: list[float]) -> predict_pb2.PredictRequest:
    """A Predict of model 'num' whose float input 'x' declares ``shape``."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "num"
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]
    req.inputs["x"].CopyFrom(
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims),
            float_val=values,
        )
    )
    return req


def hostile_grpc_request(elements: int = 2**28) -> predict_pb2.PredictRequest:
    """A few bytes on the wire: a float tensor declaring ``elements`` with one float_val."""
    return float_request([elements], [1.0])


def raw_http(port: int, head: bytes, body: bytes = b"", timeout: float = 10.0) -> bytes:
    """Send ``head`` + ``body`` on a fresh socket; read until the server closes or times out."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            data = b"".join(chunks)
            if b"\r\n\r\n" in data:
                header, _, rest = data.partition(b"\r\n\r\n")
                m = re.search(rb"content-length:\s*(\d+)", header, re.IGNORECASE)
                if m and len(rest) >= int(m.group(1)):
                    break
        return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict]:
    assert raw, "the server sent nothing"
    header, _, body = raw.partition(b"\r\n\r\n")
    status = int(header.split()[1])
    assert b"application/json" in header.lower(), header
    return status, json.loads(body)


# ---------------------------------------------------------------------------------------------
# gRPC: the declared shape is checked before tf.make_ndarray expands it
# ---------------------------------------------------------------------------------------------


def test_grpc_declared_shape_is_refused_before_allocation(server: Server) -> None:
    req = hostile_grpc_request()
    assert len(req.SerializeToString()) < 200  # a tiny message declaring 1 GiB
    channel = grpc.insecure_channel(server.grpc_address)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        ok = stub.Predict(float_request([1, 3], [1.0, 1.0, 1.0]), timeout=30)
        assert list(ok.outputs) == ["y"]

        def attack() -> list[grpc.RpcError]:
            errors = []
            for _ in range(4):  # the "four at once" took the server to 5.5 GB
                with pytest.raises(grpc.RpcError) as info:
                    stub.Predict(req, timeout=60)
                errors.append(info.value)
            return errors

        growth, errors = peak_rss_growth(attack)
    finally:
        channel.close()
    print(f"gRPC [2^28] x4: peak RSS growth {growth / MiB:.1f} MiB")
    for err in errors:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert "268435456" in err.details() and "--max-tensor-elements" in err.details()
    assert growth < GRPC_RSS_BOUND, f"peak RSS grew {growth / MiB:.0f} MiB"


def test_grpc_limits_on_bytes_and_message_size(small_server: Server) -> None:
    channel = grpc.insecure_channel(small_server.grpc_address)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        with pytest.raises(grpc.RpcError) as info:  # 31 elements > 30
            stub.Predict(hostile_grpc_request(31), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-tensor-elements" in info.value.details()
        big = hostile_grpc_request(3)
        big.inputs["x"].float_val.extend([0.0] * 20_000)  # ~80 KB message > 64 KiB
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(big, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        channel.close()


# ---------------------------------------------------------------------------------------------
# REST: body bytes, instances, elements, nesting, the HTTP stack's own errors
# ---------------------------------------------------------------------------------------------


def test_rest_oversized_body_is_refused_by_content_length_before_reading(server: Server) -> None:
    declared = 100 * MiB  # over the 64 MiB default; only 64 KiB is ever sent
    head = (
        f"POST /v1/models/num:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    status, body = parse_response(raw_http(server.rest_port, head, b"[" * 65536, timeout=10))
    assert time.monotonic() - t0 < 5  # answered at once, not after waiting for 100 MiB
    assert status == 413
    assert "--max-request-bytes" in body["error"] and str(declared) in body["error"]


def test_rest_chunked_body_is_capped_while_read(small_server: Server) -> None:
    head = (
        b"POST /v1/models/num:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 32768
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4))  # 128 KiB
    status, body = parse_response(raw_http(small_server.rest_port, head, chunks, timeout=10))
    assert status == 413 and "--max-request-bytes" in body["error"]
    ok = requests.post(
        f"{small_server.rest_url}/v1/models/num:predict",
        json={"instances": [[1.0, 1.0, 1.0]]},
        timeout=10,
    )
    assert ok.status_code == 200, ok.text


def test_rest_too_many_instances_is_413(server: Server) -> None:
    row = {"age": "25-34", "activity": 0.5}
    ok = requests.post(
        f"{server.rest_url}/v1/models/rec:predict", json={"instances": [row] * 3}, timeout=60
    )
    assert ok.status_code == 200, ok.text
    r = requests.post(
        f"{server.rest_url}/v1/models/rec:predict",
        json={"instances": [row] * 10_001},
        timeout=60,
    )
    assert r.status_code == 413, r.text[:300]
    assert r.headers["Content-Type"].startswith("application/json")
    assert "10001" in r.json()["error"] and "--max-instances" in r.json()["error"]


def test_rest_100k_instances_are_refused_with_bounded_memory(server: Server) -> None:
    body = json.dumps({"instances": [{"age": "25-34", "activity": 0.5}] * 100_000})
    assert len(body) > 3 * MiB

    def attack() -> requests.Response:
        return requests.post(f"{server.rest_url}/v1/models/rec:predict", data=body, timeout=60)

    t0 = time.monotonic()
    growth, r = peak_rss_growth(attack)
    elapsed = time.monotonic() - t0
    print(f"REST 100k instances: peak RSS growth {growth / MiB:.1f} MiB in {elapsed:.2f} s")
    assert r.status_code == 413, r.text[:300]
    assert growth < REST_RSS_BOUND, f"peak RSS grew {growth / MiB:.0f} MiB"
    assert elapsed < 10


def test_rest_tensor_elements_are_limited(small_server: Server) -> None:
    r = requests.post(
        f"{small_server.rest_url}/v1/models/num:predict",
        json={"inputs": [[1.0, 2.0, 3.0]] * 11},  # 33 elements > 30
        timeout=10,
    )
    assert r.status_code == 413 and "--max-tensor-elements" in r.json()["error"], r.text
    r = requests.post(
        f"{small_server.rest_url}/v1/models/num:predict",
        json={"instances": [[1.0, 2.0, 3.0]] * 6},  # 6 instances > 5
        timeout=10,
    )
    assert r.status_code == 413 and "--max-instances" in r.json()["error"], r.text


def test_rest_json_is_counted_before_it_is_parsed(small_server: Server) -> None:
    """Instances and values over the limits are refused before json.loads: each body below
    ends in a syntax error, which parsing would report first (400; that is what the code
    before the count answered)."""
    url = f"{small_server.rest_url}/v1/models/num:predict"
    six = '{"instances": [' + ",".join(["[1.0, 1.0, 1.0]"] * 6) + "], oops"
    r = requests.post(url, data=six, timeout=10)
    assert r.status_code == 413 and "--max-instances" in r.json()["error"], r.text
    assert "6 instances" in r.json()["error"]
    # quotes, brackets and escapes inside strings are not structure: 5 instances pass the
    # count (then 400 for the syntax error)
    tricky = '["a,[{\\"b\\\\", "]],,{{:"]'
    five = '{"instances": [' + ",".join([tricky] * 5) + "], oops"
    r = requests.post(url, data=five, timeout=10)
    assert r.status_code == 400 and "JSON Parse error" in r.json()["error"], r.text
    many = '{"inputs": [' + ",".join(["[]"] * 250) + "], oops"  # 252 values > 200
    r = requests.post(url, data=many, timeout=10)
    assert r.status_code == 413 and "--max-json-values" in r.json()["error"], r.text
    deep = '{"inputs": ' + "[" * 300 + "1" + "]" * 300 + "}"
    r = requests.post(url, data=deep, timeout=10)
    assert r.status_code == 400 and "nested 301 levels deep" in r.json()["error"], r.text


def test_rest_tiny_values_body_is_refused_with_bounded_memory(server: Server) -> None:
    """~63 MiB of `[],` in one instance: under the body limit and every element limit (the
    tensor has 0 elements), but json.loads would turn each 3 bytes into a 64-byte list."""
    n = 21_000_000
    body = b'{"instances": [[' + b"[]," * n + b"[]]]}"
    assert 60 * MiB < len(body) < RequestLimits().max_request_bytes

    def attack() -> requests.Response:
        return requests.post(f"{server.rest_url}/v1/models/num:predict", data=body, timeout=120)

    t0 = time.monotonic()
    growth, r = peak_rss_growth(attack, max_seconds=120)
    elapsed = time.monotonic() - t0
    print(f"REST {len(body) / MiB:.0f} MiB of []: peak RSS growth {growth / MiB:.1f} MiB "
          f"in {elapsed:.2f} s, {r.status_code}")
    assert r.status_code == 413, r.text[:300]
    assert "--max-json-values" in r.json()["error"]
    assert growth < JSON_RSS_BOUND, f"peak RSS grew {growth / MiB:.0f} MiB"


def test_rest_long_multi_hot_cell_is_not_padded_across_rows(server: Server) -> None:
    """One 1 MB tag cell among 64 rows: the model pads all rows to its 500,000 tags (~1.4 GB
    before the fix); the server now runs such rows apart, with the same answers."""
    url = f"{server.rest_url}/v1/models/tags:predict"
    rows = [f"t{i}|t{i + 1}" for i in range(64)]
    rows[5] = "a|" * 500_000
    body = json.dumps({"instances": rows})
    warm = requests.post(url, json={"instances": rows[:5]}, timeout=60)  # first-call costs
    assert warm.status_code == 200, warm.text[:300]

    growth, r = peak_rss_growth(lambda: requests.post(url, data=body, timeout=60))
    print(f"REST 64 rows, one 1 MB multi-hot cell: peak RSS growth {growth / MiB:.1f} MiB")
    assert r.status_code == 200, r.text[:300]
    got = np.array(r.json()["predictions"])
    alone = requests.post(url, json={"instances": [rows[5]]}, timeout=60).json()["predictions"]
    rest = requests.post(url, json={"instances": rows[:5] + rows[6:]}, timeout=60).json()
    np.testing.assert_allclose(got[5], alone[0], rtol=1e-6)
    np.testing.assert_allclose(np.delete(got, 5, axis=0), rest["predictions"], rtol=1e-6)
    assert growth < TAGS_RSS_BOUND, f"peak RSS grew {growth / MiB:.0f} MiB"


@pytest.mark.parametrize("depth", [500, 10_000])
def test_rest_deeply_nested_json_is_400(server: Server, depth: int) -> None:
    body = '{"instances": ' + "[" * depth + "1.0" + "]" * depth + "}"
    r = requests.post(f"{server.rest_url}/v1/models/num:predict", data=body, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert "error" in r.json()
    good = requests.post(
        f"{server.rest_url}/v1/models/num:predict",
        json={"instances": [[1.0, 1.0, 1.0]]},
        timeout=10,
    )
    assert good.status_code == 200


def test_http_stack_errors_are_json(server: Server) -> None:
    r = requests.get(f"{server.rest_url}/no/such/url", timeout=10)
    assert r.status_code == 404
    assert r.headers["Content-Type"].startswith("application/json")
    assert "/no/such/url" in r.json()["error"]
    r = requests.put(f"{server.rest_url}/monitoring/prometheus/metrics", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


# ---------------------------------------------------------------------------------------------
# Connections: idle, half-open and abandoned ones close quietly
# ---------------------------------------------------------------------------------------------


def test_idle_and_half_open_connections_time_out_quietly(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = server.rest_port
    sends = {
        "silent": b"",
        "half headers": b"POST /v1/models/num:predict HTTP/1.1\r\nHost: x\r\n",
        "half body": b"POST /v1/models/num:predict HTTP/1.1\r\nHost: x\r\n"
        b'Content-Length: 100\r\n\r\n{"instances"',
    }
    socks = {}
    for name, data in sends.items():
        s = socket.create_connection(("127.0.0.1", port), timeout=IDLE + 8)
        if data:
            s.sendall(data)
        socks[name] = s
    # Abandoned: half a body, then the client goes away.
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(sends["half body"])
    t0 = time.monotonic()
    closed_after = {}
    for name, s in socks.items():
        with s:
            received, closed = b"", False
            for _ in range(100):  # until the server closes (EOF or reset), or the socket timeout
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    closed = True
                    break
                except TimeoutError:
                    break
                if not chunk:
                    closed = True
                    break
                received += chunk
            closed_after[name] = time.monotonic() - t0
            assert closed, f"{name}: the server never closed the connection ({received[:100]!r})"
            if received:  # a stalled body is answered 408 before the close
                assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert all(t < IDLE + 5 for t in closed_after.values()), closed_after
    time.sleep(0.2)
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    ok = requests.post(
        f"{server.rest_url}/v1/models/num:predict",
        json={"instances": [[1.0, 1.0, 1.0]]},
        timeout=10,
    )
    assert ok.status_code == 200


# ---------------------------------------------------------------------------------------------
# SIGTERM drains requests already received
# ---------------------------------------------------------------------------------------------

SLOW_BATCHING = """
max_batch_size { value: 1000 }
batch_timeout_micros { value: 3000000 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 1 }
"""


def test_sigterm_drains_requests_in_flight(tmp_path: Path) -> None:
    """Requests wait 3 s in the batch queue; SIGTERM comes 1 s in; all must answer 200/OK."""
    base = tmp_path / "export"
    publish_numeric(base, "num", 1)
    (tmp_path / "batching.config").write_text(SLOW_BATCHING)
    pkg_root = Path(tfrs_coldstart.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(pkg_root)}
    cmd = [
        sys.executable, "-m", "tfrs_coldstart.serving.devserver",
        "--model-base", str(base), "--rest-port", "0", "--grpc-port", "0",
        "--poll-seconds", "0", "--batching-config", str(tmp_path / "batching.config"),
        "--drain-seconds", "10",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path
    )
    try:
        lines: list[str] = []
        rest_url = grpc_addr = None
        deadline = time.monotonic() + 90
        while (rest_url is None or grpc_addr is None) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"REST on (http://\S+)", line):
                rest_url = m.group(1)
            if m := re.search(r"gRPC on (\S+)", line):
                grpc_addr = m.group(1)
        assert rest_url and grpc_addr, "".join(lines)

        results: list[object] = []
        lock = threading.Lock()

        def rest_call() -> None:
            try:
                r = requests.post(
                    f"{rest_url}/v1/models/num:predict",
                    json={"instances": [[1.0, 1.0, 1.0]]},
                    timeout=30,
                )
                out: object = (r.status_code, r.text)
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                out = exc
            with lock:
                results.append(("REST", out))

        channel = grpc.insecure_channel(grpc_addr)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def grpc_call() -> None:
            try:
                resp = stub.Predict(float_request([1, 3], [1.0, 1.0, 1.0]), timeout=30)
                out: object = ("OK", list(resp.outputs))
            except grpc.RpcError as exc:
                out = (exc.code().name, exc.details())
            with lock:
                results.append(("gRPC", out))

        grpc.channel_ready_future(channel).result(timeout=10)
        threads = [threading.Thread(target=rest_call) for _ in range(6)]
        threads += [threading.Thread(target=grpc_call) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # all received and waiting in the 3 s batch queue
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=30)
        channel.close()
        out, _ = proc.communicate(timeout=30)
        exited_after = time.monotonic() - t_signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(results) == 10, results
    failed = [r for r in results if not (isinstance(r[1], tuple) and r[1][0] in (200, "OK"))]
    assert not failed, (failed, out)
    assert proc.returncode == 0, out
    assert exited_after < 10 + 5, exited_after
    assert "Traceback" not in out, out
