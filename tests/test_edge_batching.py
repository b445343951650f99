"""The dynamic batcher with a real runtime: preferred sizes, max batch, FIFO, expiry, bounds."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving.edge.batching import (
    _LOAD_WINDOW_S,
    BatchObserver,
    BatchPolicy,
    CannotMeetDeadline,
    Expired,
    ModelBatcher,
    ModelStopped,
    Pending,
    QueueFull,
    model_input,
    wait_correction,
)
from serving.repository.layout import open_variant
from serving.runtimes import open_runner

MODEL = "efficientnet_lite0-int8-onnxruntime"


class Recorder:
    """Collects what the batcher did and the answer of every request."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.answers: dict[int, tuple[np.ndarray | None, BaseException | None]] = {}
        self.taken = threading.Event()
        self.lock = threading.Lock()

    def observer(self) -> BatchObserver:
        return BatchObserver(queued=lambda s: self.taken.set(), computed=lambda n, s: self.batches.append(n))

    def done(self, key: int):
        def cb(result, exc):
            with self.lock:
                self.answers[key] = (result, exc)

        return cb

    def wait(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.answers) < n and time.monotonic() < deadline:
            time.sleep(0.002)
        assert len(self.answers) == n


@pytest.fixture()
def runner(small_repository: Path):
    v = open_variant(small_repository, MODEL)
    r = open_runner("onnxruntime", v.model_path, "int8", 2)
    yield r


class GatedRunner:
    """A real runner whose compute waits for `gate`: holds a batch in flight for as long as a test
    needs, instead of hoping the machine is slow enough."""

    def __init__(self, inner, min_per_image_s: float = 0.0) -> None:
        self.inner = inner
        self.gate = threading.Event()
        # A floor under compute time, for tests of ratios: a few ms of thread wake-up on a busy CI
        # machine is 4x a 3 ms batch, but noise next to a 25 ms one.
        self.min_per_image_s = min_per_image_s

    def infer(self, x: np.ndarray) -> np.ndarray:
        assert self.gate.wait(30)
        start = time.monotonic()
        out = self.inner.infer(x)
        time.sleep(max(0.0, start + self.min_per_image_s * x.shape[0] - time.monotonic()))
        return out

    def close(self) -> None:
        self.inner.close()


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224), dtype=np.float32)


@contextlib.contextmanager
def batch_held_in_compute(runner, policy: BatchPolicy):
    """A batcher over a gated runner: request 0 (8 images) runs, so it knows a batch's time; request 1
    (8 images) is then held in compute until the gate opens. Stopped on exit, gate open."""
    rec = Recorder()
    gated = GatedRunner(runner)
    gated.gate.set()
    batcher = ModelBatcher([gated], policy, rec.observer())
    try:
        batcher.submit(Pending(images(8, 0), None, rec.done(0)))
        rec.wait(1)
        gated.gate.clear()
        rec.taken.clear()
        batcher.submit(Pending(images(8, 1), None, rec.done(1)))
        assert rec.taken.wait(10)
        yield rec, gated, batcher
    finally:
        gated.gate.set()
        batcher.stop()


def wait_idle(batcher: ModelBatcher, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not batcher.idle() and time.monotonic() < deadline:
        time.sleep(0.005)


def test_queued_requests_form_preferred_batches_in_fifo_order(runner):
    rec = Recorder()
    # A long queue delay: the batch waits for a preferred size while requests keep arriving.
    policy = BatchPolicy(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_s=0.5)
    xs = [images(1, i) for i in range(13)]
    reference = [runner.infer(x) for x in xs]
    batcher = ModelBatcher([runner], policy, rec.observer())
    try:
        for i, x in enumerate(xs):
            batcher.submit(Pending(x, None, rec.done(i)))
        rec.wait(13)
    finally:
        batcher.stop()
    assert sum(rec.batches) == 13 and max(rec.batches) <= 8 and len(rec.batches) <= 4, rec.batches
    # Between the first batch (taken as the queue started) and the leftover, only preferred sizes.
    assert all(b in (4, 8) for b in rec.batches[1:-1]), rec.batches
    for i in range(13):  # every request got its own rows back
        got, exc = rec.answers[i]
        assert exc is None
        np.testing.assert_allclose(got, reference[i], rtol=1e-4, atol=1e-3)


def test_an_idle_model_does_not_wait_out_the_queue_delay(runner):
    rec = Recorder()
    policy = BatchPolicy(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_delay_s=0.5)
    batcher = ModelBatcher([runner], policy, rec.observer())
    try:
        for i in range(3):  # spaced requests: no arrivals to wait for, so no delay is spent
            t0 = time.monotonic()
            batcher.submit(Pending(images(1, i), None, rec.done(i)))
            rec.wait(i + 1)
            assert time.monotonic() - t0 < 0.25
            time.sleep(0.6)
    finally:
        batcher.stop()
    assert rec.batches == [1, 1, 1]


def test_expired_requests_are_dropped_before_compute(runner):
    rec = Recorder()
    gated = GatedRunner(runner)
    batcher = ModelBatcher([gated], BatchPolicy(max_batch_size=8), rec.observer())
    try:
        batcher.submit(Pending(images(8, 0), None, rec.done(0)))
        assert rec.taken.wait(10)  # the first batch is held in compute now
        batcher.submit(Pending(images(1, 1), time.monotonic() + 0.0005, rec.done(1)))
        batcher.submit(Pending(images(2, 2), None, rec.done(2)))
        time.sleep(0.01)  # past the second request's deadline
        gated.gate.set()
        rec.wait(3)
    finally:
        gated.gate.set()
        batcher.stop()
    assert isinstance(rec.answers[1][1], Expired)
    assert rec.answers[0][1] is None and rec.answers[2][1] is None
    assert rec.batches == [8, 2]  # the expired image never reached the runtime


def test_a_full_queue_refuses_and_stop_finishes_the_queue(runner):
    rec = Recorder()
    gated = GatedRunner(runner)
    batcher = ModelBatcher([gated], BatchPolicy(max_batch_size=8, max_queue_size=2), rec.observer())
    batcher.submit(Pending(images(8, 0), None, rec.done(0)))
    assert rec.taken.wait(10)  # taken off the queue and held in compute
    batcher.submit(Pending(images(8, 1), None, rec.done(1)))
    batcher.submit(Pending(images(8, 2), None, rec.done(2)))
    with pytest.raises(QueueFull):
        batcher.submit(Pending(images(1, 3), None, rec.done(3)))
    gated.gate.set()
    batcher.stop()  # drains what was accepted
    assert sorted(rec.answers) == [0, 1, 2] and all(exc is None for _, exc in rec.answers.values())


def test_a_deadline_shorter_than_the_queued_work_is_refused_on_arrival(runner):
    with batch_held_in_compute(runner, BatchPolicy(max_batch_size=8)) as (rec, gated, batcher):
        for i in (2, 3, 4):
            batcher.submit(Pending(images(8, i), None, rec.done(i)))
        # 32 images ahead: a deadline of 8 images' compute cannot be met, and is told so at once.
        per_image = batcher._per_image_s
        assert per_image is not None
        with pytest.raises(CannotMeetDeadline) as refused:
            batcher.submit(Pending(images(1, 5), time.monotonic() + 8 * per_image, rec.done(5)))
        assert isinstance(refused.value, Expired) and 5 not in rec.answers  # refused, never queued
        batcher.submit(Pending(images(1, 6), time.monotonic() + 60, rec.done(6)))  # this one can wait
        assert 6 not in rec.answers
        gated.gate.set()
        rec.wait(6)
        # Nothing ahead: it always runs, however slow the estimate says it is (an estimate that
        # refused everything would never see a batch again to correct itself).
        wait_idle(batcher)
        batcher._per_image_s = 60.0
        batcher.submit(Pending(images(1, 7), time.monotonic() + 5, rec.done(7)))
        rec.wait(7)
    assert all(rec.answers[i][1] is None for i in (0, 1, 2, 3, 4, 6, 7))
    assert sum(rec.batches) == 8 * 5 + 2  # the refused image never reached the runtime


@pytest.mark.parametrize("fraction, admitted", [(0.5, False), (1.0, True)])
def test_admission_keeps_slack_for_varying_batch_times(runner, fraction: float, admitted: bool):
    """A deadline the estimate alone would just meet is refused unless the policy admits right up
    to the deadline: a queue filled to the edge misses whenever a batch runs a little slow."""
    policy = BatchPolicy(max_batch_size=8, admit_fraction=fraction)
    with batch_held_in_compute(runner, policy) as (rec, _, batcher):
        batcher.submit(Pending(images(8, 2), None, rec.done(2)))
        per_image = batcher._per_image_s
        assert per_image is not None
        predicted = (16 + 1) * per_image
        late = Pending(images(1, 3), time.monotonic() + 1.3 * predicted, rec.done(3))
        if admitted:
            batcher.submit(late)
        else:
            with pytest.raises(CannotMeetDeadline):
                batcher.submit(late)
        assert 3 not in rec.answers


def test_model_input_prepares_shared_uint8_in_one_pass_and_mixed_inputs_each():
    from functools import partial

    from serving.models.preprocessing import Preprocessing, normalize

    pp = Preprocessing(224, 0.875, (124.0, 116.0, 104.0), (58.0, 57.0, 57.0))
    shared = partial(normalize, pp=pp)
    rng = np.random.default_rng(0)
    u8 = [rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8) for n in (1, 3)]
    f32 = normalize(rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8), pp)
    done = lambda *a: None  # noqa: E731
    expected = np.concatenate([normalize(u8[0], pp), normalize(u8[1], pp), f32])
    pixels = [Pending(x, None, done, prepare=shared) for x in u8]
    np.testing.assert_array_equal(model_input(pixels), expected[:4])
    np.testing.assert_array_equal(model_input([*pixels, Pending(f32, None, done)]), expected)
    assert model_input([Pending(f32, None, done)]) is f32  # nothing to prepare or join: no copy


def test_wait_correction_is_a_bounded_p95_of_actual_over_predicted():
    assert wait_correction([]) == 1.0
    assert wait_correction([0.5, 0.7]) == 1.0  # early finishes never loosen admission
    assert wait_correction([1.0] * 90 + [2.0] * 10) == 2.0  # the slowest 10% set it
    assert wait_correction([1.0] * 97 + [3.0] * 3) == 1.0  # the slowest 3% do not: noise cannot
    assert wait_correction([50.0]) == 4.0


def test_admission_learns_from_predictions_that_ran_late(runner):
    """A request that queued behind another and finished far later than predicted makes the next
    predictions count for more: a deadline the raw prediction fits twice over is refused."""
    with batch_held_in_compute(runner, BatchPolicy(max_batch_size=8)) as (rec, gated, batcher):
        batcher.submit(Pending(images(8, 2), None, rec.done(2)))  # predicted: 16 images of compute
        time.sleep(0.5)  # ... but the batch ahead is held far longer
        gated.gate.set()
        rec.wait(3)
        assert batcher._correction == 4.0
        wait_idle(batcher)
        gated.gate.clear()
        rec.taken.clear()
        batcher.submit(Pending(images(8, 3), None, rec.done(3)))
        assert rec.taken.wait(10)
        per_image = batcher._per_image_s
        assert per_image is not None
        with pytest.raises(CannotMeetDeadline):
            batcher.submit(Pending(images(1, 4), time.monotonic() + 2 * 9 * per_image, rec.done(4)))


def test_one_stalled_batch_does_not_refuse_the_short_queue_behind_it(runner):
    """A batch the machine stalled (here: held 1 s) must not make the next short queue look too long
    to serve: a mean of batch times let one 40 ms stall refuse requests with 98 ms left in the soak."""
    rec = Recorder()
    gated = GatedRunner(runner, min_per_image_s=0.025)  # a CI stall of a few ms is not one of 4x
    gated.gate.set()
    batcher = ModelBatcher([gated], BatchPolicy(max_batch_size=1), rec.observer())
    try:
        for i in range(30):  # enough history that one slow request is an outlier to the correction too
            batcher.submit(Pending(images(1, i), None, rec.done(i)))
            rec.wait(i + 1)
        normal = batcher._per_image_s
        assert normal is not None
        gated.gate.clear()
        rec.taken.clear()
        batcher.submit(Pending(images(1, 30), None, rec.done(30)))
        assert rec.taken.wait(10)
        time.sleep(1.0)  # 40x a normal batch: a mean of the last 16 would be 3.4x normal
        gated.gate.set()
        rec.wait(31)
        wait_idle(batcher)
        assert batcher._per_image_s < 2 * normal, (batcher._per_image_s, normal)
        gated.gate.clear()
        rec.taken.clear()
        batcher.submit(Pending(images(1, 31), None, rec.done(31)))
        assert rec.taken.wait(10)
        for i in (32, 33, 34):
            batcher.submit(Pending(images(1, i), None, rec.done(i)))
        batcher.submit(Pending(images(1, 35), time.monotonic() + 20 * normal, rec.done(35)))  # 4 ahead
        gated.gate.set()
        rec.wait(36)
    finally:
        gated.gate.set()
        batcher.stop()
    assert all(exc is None for _, exc in rec.answers.values())


def test_short_waits_that_ran_late_do_not_refuse_a_long_wait_that_fits(runner):
    """Once long predictions have been seen to come true, short ones running late (fixed overhead
    that is large as a ratio) must not inflate them: at 150 req/s a swell of 11 requests was
    refused with its raw prediction at 64% of the deadline, multiplied by short waits' ratio 1.6."""
    rec = Recorder()
    gated = GatedRunner(runner, min_per_image_s=0.025)  # CI's stalls made long waits 4x late at 3 ms
    gated.gate.set()
    batcher = ModelBatcher([gated], BatchPolicy(max_batch_size=1), rec.observer())
    key = 0
    try:
        batcher.submit(Pending(images(1, 0), None, rec.done(key)))
        key += 1
        rec.wait(key)
        for _ in range(8):  # long waits that come true: deadline 4.5x each one's own prediction
            per_image = batcher._per_image_s
            assert per_image is not None
            for ahead in range(5):
                deadline = time.monotonic() + 4.5 * (ahead + 1) * per_image
                batcher.submit(Pending(images(1, key), deadline, rec.done(key)))
                key += 1
            rec.wait(key)
            wait_idle(batcher)
        for _ in range(8):  # short waits, one in three held 150 ms (actual/predicted far above 4)
            gated.gate.clear()
            rec.taken.clear()
            batcher.submit(Pending(images(1, key), None, rec.done(key)))
            key += 1
            assert rec.taken.wait(10)
            time.sleep(0.15)
            gated.gate.set()
            for _ in range(2):  # ... and two not, so the median batch time stays a normal one's
                rec.wait(key)
                wait_idle(batcher)
                batcher.submit(Pending(images(1, key), None, rec.done(key)))
                key += 1
            rec.wait(key)
            wait_idle(batcher)
        assert wait_correction(batcher._ratios) > 2.85  # one correction for all waits would refuse
        assert batcher._correction < 2.85  # even the one used under overload
        per_image = batcher._per_image_s
        assert per_image is not None
        gated.gate.clear()
        rec.taken.clear()
        for _ in range(4):
            batcher.submit(Pending(images(1, key), None, rec.done(key)))
            key += 1
        assert rec.taken.wait(10)
        # 5 images of work for this one: fits at the long waits' correction, not at 4x.
        batcher.submit(Pending(images(1, key), time.monotonic() + 3 * 5 * per_image, rec.done(key)))
        key += 1
        gated.gate.set()
        rec.wait(key)
    finally:
        gated.gate.set()
        batcher.stop()


def test_below_overload_a_swell_is_judged_by_the_typical_error_and_overloaded_by_the_p95(runner):
    """The same queue and deadline: admitted while arrivals are below what compute can take (the
    median of how late predictions ran decides), refused once the last half second brought more
    work than that (the p95 does)."""
    rec = Recorder()
    gated = GatedRunner(runner)
    gated.gate.set()
    batcher = ModelBatcher([gated], BatchPolicy(max_batch_size=1, max_queue_size=400), rec.observer())
    frame = images(1, 0)
    key = 0

    def submit(deadline: float | None) -> None:
        nonlocal key
        batcher.submit(Pending(frame, deadline, rec.done(key)))
        key += 1

    try:
        submit(None)
        rec.wait(key)
        for i in range(50):  # long waits: most come true, one in eight held 30 ms (ratio >= 4)
            per_image = batcher._per_image_s
            assert per_image is not None
            if i % 8 == 7:
                gated.gate.clear()
                rec.taken.clear()
                submit(time.monotonic() + 4.5 * per_image)
                assert rec.taken.wait(10)
                time.sleep(0.03)
                gated.gate.set()
            else:
                submit(time.monotonic() + 4.5 * per_image)
            rec.wait(key)
            wait_idle(batcher)
        assert batcher._typical_correction < 2.0 < 2.85 < batcher._correction
        per_image = batcher._per_image_s
        assert per_image is not None
        time.sleep(2 * _LOAD_WINDOW_S)  # what arrived while learning is out of the load window
        for overload, queued in ((False, 4), (True, 300)):
            gated.gate.clear()
            rec.taken.clear()
            for _ in range(queued):
                submit(None)
            assert rec.taken.wait(10)
            # Its wait: `queued` images ahead and itself; fits at the median, not at the p95.
            deadline = time.monotonic() + 3 * (queued + 1) * per_image
            if overload:
                with pytest.raises(CannotMeetDeadline):
                    submit(deadline)
            else:
                submit(deadline)
            gated.gate.set()
            rec.wait(key)
            wait_idle(batcher)
    finally:
        gated.gate.set()
        batcher.stop()


def test_admit_fraction_outside_zero_to_one_is_refused():
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="admit_fraction"):
            BatchPolicy(max_batch_size=8, admit_fraction=bad)


def test_a_draining_batcher_refuses_new_requests_and_finishes_the_queue(runner):
    rec = Recorder()
    gated = GatedRunner(runner)
    batcher = ModelBatcher([gated], BatchPolicy(max_batch_size=8), rec.observer())
    try:
        batcher.submit(Pending(images(8, 0), None, rec.done(0)))
        assert rec.taken.wait(10)
        batcher.submit(Pending(images(2, 1), None, rec.done(1)))
        batcher.refuse_new()
        with pytest.raises(ModelStopped):
            batcher.submit(Pending(images(1, 2), None, rec.done(2)))
        assert not batcher.idle()
        gated.gate.set()
        rec.wait(2)
        wait_idle(batcher)
        assert batcher.idle()
    finally:
        gated.gate.set()
        batcher.stop()
    assert sorted(rec.answers) == [0, 1] and all(exc is None for _, exc in rec.answers.values())
