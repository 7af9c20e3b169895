"""Batch job requests: items of one function run as one call along its batch_dimension."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from gen_worker.authoring import FunctionSpec
from gen_worker.discovery import EndpointLock
from gen_worker.engine import Engine, Failure, RequestRun, Result
from gen_worker.engine.batching import BatchShapeError, merge_payloads, split_output
from gen_worker.protocol import messages as m
from gen_worker.runtime.messages import outcome_message

__all__ = ["BatchPlan", "batch_result", "plan_batch", "pump_batch"]


@dataclass(frozen=True, slots=True)
class BatchPlan:
    batch: m.BatchJobRequest
    spec: FunctionSpec
    #: The merged payload (msgpack) and each item's share of the batch dimension.
    payload: bytes
    sizes: list[int]


def plan_batch(engine: Engine, lock: EndpointLock, batch: m.BatchJobRequest) -> BatchPlan | None:
    """A merged call for ``batch``, or None when its items must run one by one."""
    spec = engine.find(batch.function_name)
    entry = lock.function(spec.name) if spec is not None else None
    if spec is None or entry is None or not entry.batch_dimension or spec.is_streaming:
        return None
    if not batch.items:
        return None
    decoder = msgspec.msgpack.Decoder(spec.payload_type)
    try:
        payloads = [decoder.decode(item.payload) for item in batch.items]
        merged, sizes = merge_payloads(payloads, entry.batch_dimension)
    except (msgspec.DecodeError, BatchShapeError):
        return None  # each item then runs alone and reports its own error
    return BatchPlan(batch, spec, msgspec.msgpack.encode(merged), sizes)


def _item_ref(item: m.JobRequest) -> m.RequestRef:
    return m.RequestRef(
        request_id=item.request_id, item_id=item.item_id, attempt_epoch=item.attempt_epoch
    )


def batch_result(plan: BatchPlan, terminal: Any, error: str, ref: m.RequestRef) -> m.BatchResult:
    """Per-item results of the batch run (its output split per item, or its failure for all)."""
    items = plan.batch.items
    if isinstance(terminal, Result):
        try:
            output = msgspec.msgpack.decode(terminal.output, type=plan.spec.output_type)
            parts = split_output(output, plan.sizes)
        except (msgspec.DecodeError, BatchShapeError) as exc:
            error = str(exc)
        else:
            results = [
                m.JobResult(ref=_item_ref(item), success=True, output=msgspec.msgpack.encode(part),
                            timing_ms=terminal.timing_ms)
                for item, part in zip(items, parts, strict=True)
            ]  # fmt: skip
            return _batch(plan, results, ref)
    failure = terminal if isinstance(terminal, Failure) else None
    results = [
        m.JobResult(
            ref=_item_ref(item),
            error_type=failure.error_type if failure else "internal",
            retryable=failure.retryable if failure else False,
            safe_message=failure.safe_message if failure else "the batch could not be run",
            error_message=failure.error_message if failure else error,
        )
        for item in items
    ]
    return _batch(plan, results, ref)


def _batch(plan: BatchPlan, results: list[m.JobResult], ref: m.RequestRef) -> m.BatchResult:
    return m.BatchResult(
        batch_id=plan.batch.batch_id,
        function_name=plan.spec.name,
        results=results,
        ref=ref,
    )


async def pump_batch(
    run: RequestRun, plan: BatchPlan, produced: Callable[[int, bool, Any], None]
) -> None:
    """Pass the merged run's outcomes on under the batch's id, its terminal one as the
    BatchResult of every item; return once the run has really stopped."""
    ref = m.RequestRef(request_id=plan.batch.batch_id)
    async for outcome in run.channel:
        at = msgspec.structs.replace(ref, seq=outcome.seq)
        if outcome is run.channel.terminal:
            produced(outcome.seq, True, batch_result(plan, outcome, "", at))
            break
        produced(outcome.seq, False, outcome_message(outcome, at, streaming=False))
    await run.stopped.wait()
