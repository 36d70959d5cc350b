"""DynamicBatcher: concurrent rows batched together, each answer to its own row, bounded queue."""

import asyncio
import threading
import time

import pytest

from encoder_jax.batcher import DynamicBatcher, QueueFull


class Recorder:
    """run_batch that doubles each row and records the batches it saw."""

    def __init__(self, delay=0.0, fail_on=None):
        self.batches, self.delay, self.fail_on = [], delay, fail_on
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, kind, rows):
        self.gate.wait()
        self.batches.append((kind, list(rows)))
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in rows:
            raise RuntimeError(f"row {self.fail_on} is bad")
        return [2 * r for r in rows]


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer():
    recorder = Recorder(delay=0.01)
    batcher = DynamicBatcher(recorder, max_batch=8, max_wait_s=0.05, max_queue=256).start()

    async def clients():
        return await asyncio.gather(*(batcher.run("f", [3 * i, 3 * i + 1, 3 * i + 2])
                                      for i in range(20)))

    answers = asyncio.run(clients())
    batcher.stop()
    assert answers == [[6 * i, 6 * i + 2, 6 * i + 4] for i in range(20)]
    sizes = [len(rows) for _, rows in recorder.batches]
    assert sum(sizes) == 60 and max(sizes) == 8 and len(sizes) < 20  # batched across requests


def test_a_batch_holds_one_kind_and_a_lone_row_waits_at_most_max_wait():
    recorder = Recorder()
    batcher = DynamicBatcher(recorder, max_batch=4, max_wait_s=0.02, max_queue=16)
    recorder.gate.clear()  # queue everything before the worker takes its first batch
    batcher.start()
    futures = batcher.submit("a", [1]) + batcher.submit("b", [2, 3]) + batcher.submit("a", [4])
    recorder.gate.set()
    assert [f.result(timeout=5) for f in futures] == [2, 4, 6, 8]
    assert all(len({kind}) == 1 for kind, _ in recorder.batches)
    assert sorted(rows for _, rows in recorder.batches if _ == "b") == [[2, 3]]
    start = time.monotonic()
    assert batcher.submit("a", [5])[0].result(timeout=5) == 10
    assert time.monotonic() - start < 1.0
    batcher.stop()


def test_a_failing_batch_fails_only_its_rows_and_the_worker_goes_on():
    recorder = Recorder(fail_on=7)
    batcher = DynamicBatcher(recorder, max_batch=2, max_wait_s=0.0, max_queue=8).start()
    bad = batcher.submit("f", [7])[0]
    with pytest.raises(RuntimeError, match="row 7 is bad"):
        bad.result(timeout=5)
    assert batcher.submit("f", [1])[0].result(timeout=5) == 2
    batcher.stop()


def test_full_queue_refuses_whole_requests_and_stop_drains_what_was_queued():
    recorder = Recorder()
    recorder.gate.clear()
    batcher = DynamicBatcher(recorder, max_batch=2, max_wait_s=0.0, max_queue=4).start()
    first = batcher.submit("f", [1, 2])  # taken by the worker, which blocks on the gate
    time.sleep(0.05)
    queued = batcher.submit("f", [3, 4, 5, 6])
    with pytest.raises(QueueFull, match="queue full"):
        batcher.submit("f", [7])
    assert batcher.depth == 4
    threading.Timer(0.05, recorder.gate.set).start()
    batcher.stop(timeout=5)  # returns once every queued row has its answer
    assert [f.result(timeout=0) for f in first + queued] == [2, 4, 6, 8, 10, 12]
    with pytest.raises(QueueFull, match="shutting down"):
        batcher.submit("f", [8])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_queue=2 >= max_batch"):
        DynamicBatcher(Recorder(), max_batch=4, max_wait_s=0.0, max_queue=2)
