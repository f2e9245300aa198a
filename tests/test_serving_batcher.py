"""Serving internals without HTTP: the dynamic batcher, the metrics exposition, tensor decoding."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from aladin_fast.serving import DynamicBatcher, MetricsRegistry, QueueFullError, RequestError
from aladin_fast.serving.batcher import BatcherClosedError
from aladin_fast.serving.metrics import parse_exposition
from aladin_fast.serving.schema import decode_tensor, encode_tensor


class Recorder:
    """``run_batch`` stand-in: returns each payload doubled and records the batches it saw."""

    def __init__(self, fail_on=None, delay=0.0):
        self.batches = []
        self.fail_on = fail_on
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, payloads):
        import time

        time.sleep(self.delay)
        with self.lock:
            self.batches.append(list(payloads))
        if self.fail_on is not None and self.fail_on in [p["value"] for p in payloads]:
            raise ValueError(f"poisoned {self.fail_on}")
        return [p["value"] * 2 for p in payloads]


def run(coroutine):
    return asyncio.run(coroutine)


async def submit_all(batcher, payloads, stagger=0.0):
    async def one(payload, position):
        await asyncio.sleep(stagger * position)
        return await batcher.submit(payload)

    return await asyncio.gather(*(one(p, i) for i, p in enumerate(payloads)), return_exceptions=True)


def test_concurrent_items_are_merged_and_each_gets_its_own_result():
    async def scenario():
        recorder = Recorder(delay=0.01)
        metrics = MetricsRegistry()
        batcher = DynamicBatcher("search", recorder, max_batch_size=8, max_wait_ms=50, metrics=metrics)
        batcher.start()
        results = await submit_all(batcher, [{"value": i} for i in range(20)])
        await batcher.close()
        return recorder, metrics, results

    recorder, metrics, results = run(scenario())
    assert results == [2 * i for i in range(20)]
    sizes = [len(batch) for batch in recorder.batches]
    assert sum(sizes) == 20 and max(sizes) == 8 and len(sizes) <= 4
    # arrival order is kept inside and across batches
    assert [p["value"] for batch in recorder.batches for p in batch] == list(range(20))
    histogram = metrics.batch_size.snapshot(queue="search")
    assert histogram["count"] == len(sizes) and histogram["sum"] == 20


def test_batch_size_one_disables_merging():
    async def scenario():
        recorder = Recorder()
        batcher = DynamicBatcher("rerank", recorder, max_batch_size=1, max_wait_ms=50)
        batcher.start()
        results = await submit_all(batcher, [{"value": i} for i in range(6)])
        await batcher.close()
        return recorder, results

    recorder, results = run(scenario())
    assert results == [0, 2, 4, 6, 8, 10]
    assert [len(batch) for batch in recorder.batches] == [1] * 6


def test_only_items_with_equal_keys_share_a_call():
    async def scenario():
        recorder = Recorder()
        batcher = DynamicBatcher("search", recorder, key=lambda p: p["value"] % 3, max_batch_size=16,
                                 max_wait_ms=30)
        batcher.start()
        results = await submit_all(batcher, [{"value": i} for i in range(12)])
        await batcher.close()
        return recorder, results

    recorder, results = run(scenario())
    assert results == [2 * i for i in range(12)]
    for batch in recorder.batches:
        assert len({p["value"] % 3 for p in batch}) == 1
    assert len(recorder.batches) == 3


def test_lone_item_waits_at_most_max_wait():
    async def scenario():
        batcher = DynamicBatcher("search", Recorder(), max_batch_size=64, max_wait_ms=20)
        batcher.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await batcher.submit({"value": 4})
        elapsed = loop.time() - started
        await batcher.close()
        return result, elapsed

    result, elapsed = run(scenario())
    assert result == 8
    assert 0.015 <= elapsed < 0.5


def test_a_failing_item_fails_alone():
    async def scenario():
        recorder = Recorder(fail_on=3)
        batcher = DynamicBatcher("search", recorder, max_batch_size=8, max_wait_ms=30)
        batcher.start()
        results = await submit_all(batcher, [{"value": i} for i in range(6)])
        await batcher.close()
        return results

    results = run(scenario())
    assert isinstance(results[3], ValueError) and "poisoned 3" in str(results[3])
    assert [r for i, r in enumerate(results) if i != 3] == [0, 2, 4, 8, 10]


def test_full_queue_and_closed_batcher_refuse_new_items():
    async def scenario():
        batcher = DynamicBatcher("search", Recorder(delay=0.05), max_batch_size=1, max_wait_ms=0, max_queue=2)
        batcher.start()
        results = await submit_all(batcher, [{"value": i} for i in range(8)])
        await batcher.close()
        with pytest.raises(BatcherClosedError):
            await batcher.submit({"value": 1})
        return results

    results = run(scenario())
    assert any(isinstance(r, QueueFullError) for r in results)
    assert any(r == 0 for r in results)


def test_close_finishes_queued_items():
    async def scenario():
        recorder = Recorder(delay=0.02)
        batcher = DynamicBatcher("search", recorder, max_batch_size=2, max_wait_ms=0)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit({"value": i})) for i in range(6)]
        await asyncio.sleep(0)
        await batcher.close()
        return await asyncio.gather(*pending)

    assert run(scenario()) == [0, 2, 4, 6, 8, 10]


def test_metrics_exposition_format():
    metrics = MetricsRegistry()
    metrics.requests.inc(endpoint="/search", status="200")
    metrics.requests.inc(endpoint="/search", status="200")
    metrics.request_latency.observe(0.003, endpoint="/search")
    metrics.queue_depth.set(5, queue="search")
    text = metrics.render()
    assert "# TYPE aladin_request_latency_seconds histogram" in text
    samples = parse_exposition(text)
    assert samples['aladin_requests_total{endpoint="/search",status="200"}'] == 2
    assert samples['aladin_request_latency_seconds_bucket{endpoint="/search",le="0.0025"}'] == 0
    assert samples['aladin_request_latency_seconds_bucket{endpoint="/search",le="0.005"}'] == 1
    assert samples['aladin_request_latency_seconds_bucket{endpoint="/search",le="+Inf"}'] == 1
    assert samples['aladin_queue_depth{queue="search"}'] == 5
    with pytest.raises(ValueError, match="labels"):
        metrics.requests.inc(endpoint="/search")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_base64_tensors_round_trip(dtype):
    tensor = torch.randn(3, 5)
    decoded = decode_tensor("query_tokens", encode_tensor(tensor, dtype), 2)
    assert decoded.dtype == getattr(torch, dtype)
    torch.testing.assert_close(decoded, tensor.to(getattr(torch, dtype)), atol=0, rtol=0)


@pytest.mark.parametrize("value, message", [
    ([[1.0, 2.0], [3.0]], "rectangular"),
    ([1.0, 2.0], "2-d"),
    ("abc", "list of numbers"),
    ([[float("nan")]], "NaN"),
    ({"dtype": "int8", "shape": [1, 1], "data": ""}, "dtype"),
    ({"dtype": "float32", "shape": [2, 2], "data": "AAAA"}, "bytes"),
    ({"dtype": "float32", "shape": [1, 1], "data": "!!"}, "base64"),
])
def test_bad_tensors_name_the_field(value, message):
    with pytest.raises(RequestError, match=message) as caught:
        decode_tensor("query_tokens", value, 2)
    assert caught.value.field == "query_tokens" and caught.value.status == 422
