"""Request batching: concurrent requests of one version and signature run as one batch.

TF Serving's ``SharedBatchScheduler`` semantics for the parameters this server honours
(``max_batch_size``, ``batch_timeout_micros``, ``max_enqueued_batches``,
``num_batch_threads``): a full queue answers UNAVAILABLE, so clients back off and retry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import numpy as np

from tfrs_coldstart.serving.devserver.config import BatchingParameters
from tfrs_coldstart.serving.devserver.errors import RpcError, to_rpc_error
from tfrs_coldstart.serving.status import Code

__all__ = ["Batcher"]

log = logging.getLogger(__name__)


@dataclass
class _Task:
    """One request waiting in the queue; ``key`` says which requests it may share a batch with."""

    inputs: dict[str, np.ndarray]
    size: int
    key: tuple
    future: futures.Future
    enqueued: float


class Batcher:
    """Concatenates concurrent requests of one version/signature along the batch dimension.

    Each of ``num_batch_threads`` workers waits up to ``batch_timeout_micros`` after the oldest
    task for the batch to fill to ``max_batch_size``, runs it once and splits the outputs back.
    Tasks only share a batch when their non-batch dimensions and dtypes agree.
    """

    def __init__(
        self,
        run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
        params: BatchingParameters,
        on_batch: Callable[[int], None],
        name: str,
    ) -> None:
        self._run = run
        self._params = params
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._queue: list[_Task] = []
        self._closed = False
        for i in range(max(1, params.num_batch_threads)):
            threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True).start()

    def submit(self, inputs: dict[str, np.ndarray], size: int) -> futures.Future | None:
        """Queue a task; None when the batcher is closed (the caller then runs it itself)."""
        key = tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()))
        fut: futures.Future = futures.Future()
        with self._cond:
            if self._closed:
                return None
            queued = sum(t.size for t in self._queue)
            limit = self._params.max_enqueued_batches * self._params.max_batch_size
            if queued + size > limit:
                raise RpcError(
                    Code.UNAVAILABLE,
                    "The batch scheduling queue to which this task was submitted is full",
                )
            self._queue.append(_Task(inputs, size, key, fut, time.monotonic()))
            self._cond.notify_all()
        return fut

    def close(self) -> None:
        """Stop taking tasks; queued ones still run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _take(self) -> list[_Task]:
        first = self._queue[0]
        batch, total = [], 0
        for task in list(self._queue):
            if task.key != first.key:
                continue
            if total + task.size > self._params.max_batch_size:
                break
            batch.append(task)
            total += task.size
        for task in batch:
            self._queue.remove(task)
        return batch

    def _ready_size(self) -> int:
        first = self._queue[0]
        return sum(t.size for t in self._queue if t.key == first.key)

    def _loop(self) -> None:
        timeout = self._params.batch_timeout_micros / 1e6
        while True:
            with self._cond:
                while True:  # other workers may take tasks while this one waits: re-check
                    if not self._queue:
                        if self._closed:
                            return
                        self._cond.wait()
                        continue
                    remaining = self._queue[0].enqueued + timeout - time.monotonic()
                    full = self._ready_size() >= self._params.max_batch_size
                    if self._closed or full or remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch = self._take()
            try:
                self._execute(batch)
            except BaseException as exc:  # noqa: BLE001 - never leave a request waiting
                log.exception("batch failed")
                for task in batch:
                    if not task.future.done():
                        task.future.set_exception(to_rpc_error(exc))

    def _execute(self, batch: list[_Task]) -> None:
        live = [t for t in batch if t.future.set_running_or_notify_cancel()]
        if not live:
            return
        total = sum(t.size for t in live)
        self._on_batch(total)
        if len(live) == 1:
            self._run_one(live[0])
            return
        try:
            merged = {
                name: np.concatenate([t.inputs[name] for t in live], axis=0)
                for name in live[0].inputs
            }
            outputs = self._run(merged)
        except BaseException as exc:  # noqa: BLE001 - every task must get an answer
            for task in live:
                task.future.set_exception(to_rpc_error(exc))
            return
        if any(np.ndim(v) == 0 or np.shape(v)[0] != total for v in outputs.values()):
            for task in live:  # outputs are not batch-major after all: run one by one
                self._run_one(task)
            return
        offset = 0
        for task in live:
            end = offset + task.size
            task.future.set_result({k: v[offset:end] for k, v in outputs.items()})
            offset = end

    def _run_one(self, task: _Task) -> None:
        try:
            task.future.set_result(self._run(task.inputs))
        except BaseException as exc:  # noqa: BLE001
            task.future.set_exception(to_rpc_error(exc))
