"""Real-time camera streams against the edge server or Triton (KServe v2 gRPC).

Run: `locust -f loadtest/realtime.py` (headless or web UI, local or --master/--worker).

Each Locust user is one camera at --fps sending labelled imagenet-val frames. Open loop: frame k
leaves at its due time whether or not earlier frames returned, and latency counts from the due
time, so queueing is measured, not hidden (coordinated omission corrected). The gRPC deadline of
each frame is the frame interval unless --deadline-ms says otherwise.

    locust -f loadtest/realtime.py --headless -u 4 -r 4 -t 60s --host 127.0.0.1:8001 \
        --model efficientnet_lite0-int8-openvino --fps 30 --csv out/run

Rows in Locust's stats (and --csv files):
  gRPC     <model>  every measured frame; response time = latency from the due time; failures = errors
  deadline <model>  every measured frame; failures = frames late or failed (deadline misses)
  accuracy <model>  every answered labelled frame; failures = wrong top-1 (accuracy = 1 - fail ratio)
With --csv PREFIX, PREFIX_realtime.csv / .json add exact p50/p90/p99 (1% buckets), throughput,
accuracy, miss rate and load-generator send lag, merged over workers in distributed mode.
Frames due in the first --warmup-s seconds of each stream are sent but not counted.
Locust rewrites its own CSV files once a second, so their last second may be missing;
PREFIX_realtime.csv is written after the run ends and holds every measured frame.

This process must not import OpenVINO or nncf (they hang with gevent); only client code is used.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

# gRPC must cooperate with gevent, or one blocking call freezes every user of the process.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import gevent  # noqa: E402
import gevent.pool  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from serving.bench.frames import INPUT_MODES, infer_inputs, load_frames  # noqa: E402
from serving.bench.schedule import FrameSchedule, PoissonSchedule, StreamStats  # noqa: E402
from serving.errors import RtqError  # noqa: E402

log = logging.getLogger("realtime")
DEFAULT_MODEL = "efficientnet_lite0-int8-openvino"
# A stream whose server answers nothing for this long is over: the run ends, marked incomplete.
DEAD_SERVER_S = 3.0
MAX_IN_FLIGHT = 64  # per stream; beyond this frames are not sent and count as misses


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = _positive_float(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text}")
    return int(value)


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="variant to load (default: %(default)s)")
    parser.add_argument("--fps", type=_positive_float, default=30.0, help="frames per second per stream")
    parser.add_argument("--data", default="imagenet-val", help="labelled folder or name under the data root")
    parser.add_argument("--images", type=_positive_int, default=100, help="images cycled by each process")
    parser.add_argument(
        "--input",
        choices=INPUT_MODES,
        default="tensor",
        help="FP32 tensors (both servers) or JPEG bytes (edge server preprocesses)",
    )
    parser.add_argument(
        "--deadline-ms",
        type=_positive_float,
        default=None,
        help="per-frame deadline (default: the frame interval)",
    )
    parser.add_argument("--warmup-s", type=float, default=2.0, help="seconds per stream not counted")
    parser.add_argument(
        "--arrivals",
        choices=("fixed", "poisson"),
        default="fixed",
        help="fixed frame interval (camera) or Poisson at --fps (MLPerf server)",
    )


class _Run:
    """One process's load state, kept on the Locust environment (no module globals)."""

    def __init__(self, options) -> None:
        self.options = options
        self.stats = StreamStats()  # this process; workers ship deltas to the master
        self.reported = StreamStats()  # master: merged worker reports
        self.frames = []
        self.incomplete: list[str] = []
        self.started = time.time()

    @property
    def deadline_s(self) -> float:
        o = self.options
        return (o.deadline_ms / 1000) if o.deadline_ms else 1.0 / o.fps


def _mark(environment, message: str) -> None:
    """The run goes on but is marked incomplete, with the reason (e.g. an outage it survived)."""
    run: _Run = environment.rtq
    if message not in run.incomplete:
        run.incomplete.append(message)
        log.error("realtime.py: %s", message)
    environment.process_exit_code = 2


def _fail(environment, message: str) -> None:
    """One clear line, the run marked incomplete, every user stopped (a worker stops itself)."""
    run: _Run = environment.rtq
    if message not in run.incomplete:
        run.incomplete.append(message)
        log.error("realtime.py: %s", message)
    environment.process_exit_code = 2
    if environment.runner is not None:
        gevent.spawn_later(0, environment.runner.quit)


@events.init.add_listener
def _init(environment, **_kw) -> None:
    environment.rtq = run = _Run(environment.parsed_options)
    if isinstance(environment.runner, MasterRunner):
        return  # the master only merges reports; workers load the data
    o = environment.parsed_options
    if o.host and "://" in o.host:
        sys.exit(f"realtime.py: --host takes HOST:PORT for gRPC, got {o.host!r}")
    try:
        run.frames = load_frames(o.data, o.images, o.input, o.model)
    except RtqError as exc:
        sys.exit(f"realtime.py: {exc}")


def _attach_reporting(environment) -> None:
    run: _Run = environment.rtq

    # Closures over this environment's state: the hooks' signatures carry no environment.
    def report(client_id, data, **_kw) -> None:
        data["rtq"] = run.stats.to_dict()
        data["rtq_incomplete"] = list(run.incomplete)
        run.stats = StreamStats()

    def merge(client_id, data, **_kw) -> None:
        if "rtq" in data:
            run.reported.merge(data["rtq"])
        for reason in data.get("rtq_incomplete", []):
            if reason not in run.incomplete:
                run.incomplete.append(reason)

    environment.events.report_to_master.add_listener(report)
    environment.events.worker_report.add_listener(merge)


@events.init.add_listener
def _init_reporting(environment, **_kw) -> None:
    _attach_reporting(environment)


@events.quitting.add_listener
def _write_summary(environment, **_kw) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    run: _Run = environment.rtq
    stats = run.reported if isinstance(environment.runner, MasterRunner) else run.stats
    o = environment.parsed_options
    summary = {
        "model": o.model,
        "host": o.host,
        "fps_per_stream": o.fps,
        "arrivals": o.arrivals,
        "input": o.input,
        "deadline_ms": round(1000 * run.deadline_s, 3),
        "warmup_s": o.warmup_s,
        "users": environment.runner.target_user_count if environment.runner else None,
        "complete": not run.incomplete,
        "incomplete_reasons": run.incomplete,
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        **stats.summary(),
    }
    print(
        f"realtime: {summary['answered']}/{summary['queries']} answered, p50 {summary['p50_ms']} ms, "
        f"p99 {summary['p99_ms']} ms, {summary['throughput_per_s']}/s, misses {summary['deadline_misses']}, "
        f"accuracy {summary['accuracy']}" + ("" if summary["complete"] else " (INCOMPLETE)"),
        file=sys.stderr,
    )
    prefix = getattr(o, "csv_prefix", None)
    if prefix:
        path = Path(f"{prefix}_realtime")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
        flat = {k: v for k, v in summary.items() if not isinstance(v, dict | list)}
        flat["incomplete_reasons"] = "; ".join(run.incomplete)
        with path.with_suffix(".csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(flat)
            writer.writerow(flat.values())


class DeadlineMiss(Exception):
    pass


class WrongTop1(Exception):
    pass


class CameraStream(User):
    """One camera: frames on a fixed schedule (or Poisson), never waiting for earlier answers."""

    wait_time = constant(0)
    # Streams need an address; Locust's --host carries HOST:PORT of the gRPC endpoint.
    host = "127.0.0.1:8001"

    def on_start(self) -> None:
        import tritonclient.grpc as grpcclient

        self.run: _Run = self.environment.rtq
        o = self.environment.parsed_options
        self.model = o.model
        self.client = grpcclient.InferenceServerClient(self.host)
        self.inflight = gevent.pool.Group()
        try:
            ready = self.client.is_server_ready(client_timeout=5)
        except Exception as exc:  # noqa: BLE001 - any failure here means unreachable
            _fail(self.environment, f"server {self.host} unreachable: {str(exc).splitlines()[0][:160]}")
            raise StopUser from None
        if not ready:
            _fail(self.environment, f"server {self.host} is not ready")
            raise StopUser
        if not self.client.is_model_ready(self.model, client_timeout=5):
            names = [m.name for m in self.client.get_model_repository_index(client_timeout=5).models]
            _fail(self.environment, f"model {self.model!r} is not served at {self.host}; served: {names}")
            raise StopUser
        # Triton rejects nothing for unknown parameters, but only our edge server counts labels.
        self.send_label = self.client.get_server_metadata(client_timeout=5).name != "triton"
        self.last_ok = time.monotonic()
        # An outage: frames failing UNAVAILABLE (server gone, restarting) since this time.
        self.down_since: float | None = None
        self.down_frames = 0

    def on_stop(self) -> None:
        if hasattr(self, "inflight"):
            self.inflight.kill(block=False)
        if hasattr(self, "client"):
            client = self.client
            del self.client
            client.close()
            # tritonclient's __del__ closes the channel a second time: let that happen now, while the
            # gevent hub runs; at interpreter exit that second close blocks forever.
            del client

    @task
    def stream(self) -> None:
        o = self.environment.parsed_options
        start = time.monotonic()
        # Streams start at random phases so cameras do not fire in lockstep.
        phase = (self.environment.runner.user_count % 7) / 7 / o.fps if self.environment.runner else 0
        if o.arrivals == "poisson":
            schedule = PoissonSchedule(o.fps, start + phase, seed=id(self) & 0xFFFF)
        else:
            schedule = FrameSchedule(o.fps, start, phase)
        warm_until = start + o.warmup_s
        frames = self.run.frames
        k = 0
        while True:
            due = schedule.due(k)
            delay = due - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            frame = frames[k % len(frames)]
            measured = due >= warm_until
            if len(self.inflight) >= MAX_IN_FLIGHT:
                if measured:
                    self.run.stats.record_overload(due)
            else:
                self.inflight.spawn(self._send, frame, due, measured)
            k += 1
            if time.monotonic() - self.last_ok > DEAD_SERVER_S:
                if self.down_since is not None:
                    why = f"{self.down_frames} frames refused UNAVAILABLE: the server is down"
                else:
                    why = (
                        f"{len(self.inflight)} frames in flight; if the server is up, this load "
                        "generator is overloaded: add workers"
                    )
                _fail(
                    self.environment,
                    f"server {self.host} stopped answering for {DEAD_SERVER_S:.0f} s ({why})",
                )
                return

    def _send(self, frame, due: float, measured: bool) -> None:
        from tritonclient.utils import InferenceServerException

        run = self.run
        deadline_s = run.deadline_s
        params = {"label": frame.label} if self.send_label and frame.label >= 0 else None
        sent_at = time.monotonic()
        # The deadline runs from the due time: a late send leaves the server less time.
        timeout = max(0.001, due + deadline_s - sent_at)
        error = None
        correct = None
        try:
            result = self.client.infer(
                self.model, infer_inputs(frame), parameters=params, client_timeout=timeout
            )
            self.last_ok = time.monotonic()
            if self.down_since is not None:
                # Back after an outage (a restarted server): the run is still marked, since
                # frames were lost while it was away.
                _mark(
                    self.environment,
                    f"server {self.host} was unavailable for {self.last_ok - self.down_since:.1f} s "
                    f"({self.down_frames} frames failed) and came back",
                )
                self.down_since, self.down_frames = None, 0
            if frame.label >= 0:
                correct = int(result.as_numpy("logits")[0].argmax()) == frame.label
        except InferenceServerException as exc:
            status = exc.status() or "ERROR"
            error = str(status).removeprefix("StatusCode.")
            if error == "DEADLINE_EXCEEDED":
                self.last_ok = time.monotonic()  # the server is alive, just late
            elif error == "UNAVAILABLE":
                if self.down_since is None:
                    self.down_since = sent_at
                self.down_frames += 1
        finished = time.monotonic()
        if not measured:
            return
        missed = run.stats.record(due, finished, sent_at, deadline_s, error, correct)
        latency_ms = 1000 * (finished - due)
        fire = self.environment.events.request.fire
        fire(
            request_type="gRPC",
            name=self.model,
            response_time=latency_ms,
            response_length=0,
            exception=InferenceServerException(error) if error else None,
            context={},
        )
        fire(
            request_type="deadline",
            name=self.model,
            response_time=latency_ms,
            response_length=0,
            exception=DeadlineMiss(f"over {1000 * deadline_s:.1f} ms or failed") if missed else None,
            context={},
        )
        if correct is not None:
            fire(
                request_type="accuracy",
                name=self.model,
                response_time=0,
                response_length=0,
                exception=None if correct else WrongTop1("wrong top-1"),
                context={},
            )
