"""Batches: merging items along batch_dimension, splitting outputs, and the worker's batch path."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gen_worker.config import load_worker_settings
from gen_worker.engine.batching import BatchShapeError, merge_payloads, split_output
from gen_worker.entrypoint import run_inference
from gen_worker.protocol import messages as m
from gen_worker.testing.scheduler import MockScheduler

REPO = Path(__file__).resolve().parents[1]


class Texts(msgspec.Struct):
    texts: list[str]
    lower: bool = False


class Lengths(msgspec.Struct):
    lengths: list[int]
    model: str = "x"


def test_merge_and_split() -> None:
    merged, sizes = merge_payloads([Texts(["a", "b"]), Texts([]), Texts(["c"])], "texts")
    assert merged == Texts(["a", "b", "c"]) and sizes == [2, 0, 1]
    parts = split_output(Lengths([1, 2, 3], model="m"), sizes)
    assert parts == [Lengths([1, 2], "m"), Lengths([], "m"), Lengths([3], "m")]


def test_items_that_differ_elsewhere_do_not_merge() -> None:
    with pytest.raises(BatchShapeError, match="differ in fields other than 'texts'"):
        merge_payloads([Texts(["a"]), Texts(["b"], lower=True)], "texts")
    with pytest.raises(BatchShapeError, match="at least one item"):
        merge_payloads([], "texts")


def test_output_without_a_matching_list_cannot_split() -> None:
    with pytest.raises(BatchShapeError, match="no list field with one entry per input"):
        split_output(Lengths([1]), [1, 1])


def _env(tmp_path: Path, address: str) -> dict[str, str]:
    return {
        "PUBLIC_ORCHESTRATOR_GRPC_ADDR": address,
        "WORKER_JWT": "dev-worker-jwt",
        "WORKER_ID": "batch-worker",
        "GEN_WORKER_MANIFEST_PATH": str(REPO / "tests" / "golden" / "hello-world.endpoint.lock"),
        "GEN_WORKER_ENDPOINT_ROOT": str(REPO / "examples" / "hello-world"),
        "TENSORHUB_CACHE_DIR": str(tmp_path / "cache"),
        "WORKER_LOCAL_MODEL_CACHE_DIR": str(tmp_path / "local"),
    }


def test_worker_runs_a_batch_as_one_call(tmp_path: Path) -> None:
    async def go() -> None:
        sched = MockScheduler()
        address = await sched.start()
        worker = asyncio.create_task(run_inference(load_worker_settings(_env(tmp_path, address))))
        try:
            await sched.wait_for_worker(20)
            texts = [["a b", "c"], ["d e f"], []]
            records = await sched.submit_batch(
                "word-lengths", [msgspec.msgpack.encode({"texts": t}) for t in texts]
            )
            outputs: list[Any] = []
            for record in records:
                terminal = await record.wait(20)
                assert isinstance(terminal, m.JobResult) and terminal.success
                outputs.append(msgspec.msgpack.decode(terminal.output))
            assert outputs == [{"lengths": [2, 1]}, {"lengths": [3]}, {"lengths": []}]
            (batch,) = sched.batches.values()
            assert isinstance(batch.terminal, m.BatchResult)  # one merged call answered all
            assert [r.ref.request_id for r in batch.terminal.results] == [
                r.job.request_id for r in records
            ]
            assert any(e.event_type == "request.completed" for e in batch.events)
            # items that cannot merge (a function without batch_dimension) run one by one
            single = await sched.submit_batch("hello", [msgspec.msgpack.encode({"name": "x"})])
            terminal = await single[0].wait(20)
            assert isinstance(terminal, m.JobResult)
            assert msgspec.msgpack.decode(terminal.output) == {"message": "Hello, x!"}
            await sched.drain()
            assert await asyncio.wait_for(worker, 20) == 0
        finally:
            worker.cancel()
            await sched.close()

    asyncio.run(asyncio.wait_for(go(), 60))
