"""Loading a repository for the edge server: each variant through the runners, failures kept per variant.

A variant that cannot load (bad file, bad config, unknown backend) becomes a not-ready entry with
its reason, and the others serve normally.

Runners open a private snapshot of the variant's version folder, unlinked right after loading:
OpenVINO maps the weights file into memory, and truncating the repository's copy while it serves
would otherwise kill the whole process with SIGBUS. The repository files are then watched
(`ServedModel.check_files`): a variant whose files are removed or changed turns not-ready with the
reason, and ready again if they come back unchanged.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from serving.edge.batching import DEFAULT_ADMIT_FRACTION, BatchObserver, BatchPolicy, ModelBatcher
from serving.edge.metrics import EdgeMetrics
from serving.errors import RtqError
from serving.models.preprocessing import Preprocessing, normalize
from serving.repository.layout import CONFIG, VERSION, list_variants, open_variant
from serving.repository.triton_config import LABELS_FILE, read_config
from serving.runtimes import open_runner, runner_class

DEFAULT_MAX_QUEUE = 64
# Where each native config keeps the runtime's thread count (ORT, OpenVINO, LiteRT).
_THREAD_PARAMS = ("intra_op_thread_count", "INFERENCE_NUM_THREADS", "num_threads")


@dataclass
class Stats:
    """What ModelStatistics reports, in Triton's units (nanoseconds)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    infer_count: int = 0
    infer_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class _Stamp:
    """What a cheap stat() says about a file; ctime and inode also catch in-place writes that keep
    the mtime and replacement by rename."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> _Stamp:
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class FileWatch:
    """The files a variant was loaded from, as they were then: stat stamps and content hashes.

    `problem()` stats every file (cheap, every few seconds); only a file whose stamp moved is hashed
    again, so a touch or an identical copy put back is not a fault.
    """

    root: Path
    files: dict[str, tuple[_Stamp, str]]  # relative path -> (stamp, sha256)

    @classmethod
    def of(cls, root: Path, names: list[str]) -> FileWatch:
        files = {}
        for rel in names:
            path = root / rel
            stamp = _Stamp.of(path)
            files[rel] = (stamp, _sha256(path))
        return cls(root, files)

    def problem(self) -> str | None:
        for rel, (stamp, digest) in list(self.files.items()):
            path = self.root / rel
            try:
                now = _Stamp.of(path)
            except FileNotFoundError:
                return f"{rel} was removed while serving; restore it or restart to serve this variant"
            except OSError as exc:
                return f"{rel} cannot be read while serving: {exc.strerror}"
            if now == stamp:
                continue
            try:
                same = _sha256(path) == digest
            except OSError as exc:
                return f"{rel} cannot be read while serving: {exc.strerror}"
            if not same:
                return (
                    f"{rel} changed while serving ({stamp.size} -> {now.size} bytes); the loaded "
                    "copy no longer matches the repository: restore it or restart to serve this variant"
                )
            self.files[rel] = (now, digest)
        return None


def _variant_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@dataclass
class ServedModel:
    name: str
    version: str
    labels: tuple[str, str, str]
    config: mc.ModelConfig | None = None
    manifest: dict | None = None
    batcher: ModelBatcher | None = None
    class_names: tuple[str, ...] = ()
    reason: str = "loading"
    stats: Stats = field(default_factory=Stats)
    watch: FileWatch | None = None
    ready_gauge: object | None = None  # rtq_model_ready child, set when the state flips

    @property
    def ready(self) -> bool:
        # A loaded variant whose files went bad keeps its batcher (queued requests still finish)
        # but takes no new requests: the reason says why.
        return self.batcher is not None and not self.reason

    def check_files(self) -> bool:
        """Compare the repository files with what was loaded; True when the readiness changed."""
        if self.watch is None or self.batcher is None:
            return False
        problem = self.watch.problem() or ""
        if problem == self.reason:
            return False
        self.reason = problem
        if self.ready_gauge is not None:
            self.ready_gauge.set(0 if problem else 1)
        return True

    @cached_property  # per request otherwise; the manifest never changes once loaded
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest["preprocessing"])

    @cached_property
    def normalize(self) -> Callable[[np.ndarray], np.ndarray]:
        """uint8 pixels -> the model's float input; one object per model, so the batcher can tell
        that a batch of uint8 requests shares it and normalise them in one pass."""
        return partial(normalize, pp=self.preprocessing)

    @property
    def input_name(self) -> str:
        return self.config.input[0].name

    @cached_property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.config.input[0].dims)

    @property
    def output_name(self) -> str:
        return self.config.output[0].name


def policy_of(
    cfg: mc.ModelConfig, default_max_queue: int, admit_fraction: float = DEFAULT_ADMIT_FRACTION
) -> BatchPolicy:
    db = cfg.dynamic_batching if cfg.HasField("dynamic_batching") else None
    max_queue = default_max_queue
    if db is not None and db.default_queue_policy.max_queue_size > 0:
        max_queue = int(db.default_queue_policy.max_queue_size)
    return BatchPolicy(
        max_batch_size=max(1, cfg.max_batch_size),
        preferred_batch_sizes=tuple(db.preferred_batch_size) if db else (),
        max_queue_delay_s=db.max_queue_delay_microseconds / 1e6 if db else 0.0,
        max_queue_size=max_queue,
        instances=max(1, sum(g.count for g in cfg.instance_group) or 1),
        admit_fraction=admit_fraction,
    )


def threads_of(cfg: mc.ModelConfig, manifest: dict) -> int:
    for key in _THREAD_PARAMS:
        if key in cfg.parameters:
            try:
                return max(1, int(cfg.parameters[key].string_value))
            except ValueError:
                pass
    return int(manifest.get("threads", 2))


def _observer(metrics: EdgeMetrics, labels: tuple[str, str, str], stats: Stats) -> BatchObserver:
    queue_h = metrics.queue_seconds.labels(*labels)
    compute_h = metrics.compute_seconds.labels(*labels)
    batch_h = metrics.batch_size.labels(*labels)
    depth_g = metrics.queue_depth.labels(*labels)

    def queued(seconds: float) -> None:
        queue_h.observe(seconds)
        with stats.lock:
            stats.queue_count += 1
            stats.queue_ns += int(seconds * 1e9)

    def computed(images: int, seconds: float) -> None:
        compute_h.observe(seconds)
        batch_h.observe(images)
        with stats.lock:
            stats.execution_count += 1
            stats.inference_count += images
            stats.infer_count += images
            stats.infer_ns += int(seconds * 1e9)
            stats.last_inference_ms = int(time.time() * 1000)

    return BatchObserver(queued=queued, computed=computed, depth=depth_g.set)


def load_model(
    repository: Path,
    name: str,
    metrics: EdgeMetrics,
    default_max_queue: int,
    threads_override: int | None = None,
    admit_fraction: float = DEFAULT_ADMIT_FRACTION,
) -> ServedModel:
    """Open one variant; never raises for a broken variant, returns it not-ready with the reason."""
    served = ServedModel(name=name, version=VERSION, labels=("", "", ""))
    runners = []
    try:
        variant = open_variant(repository, name)
        served.manifest = variant.manifest
        served.labels = (name, str(variant.manifest["precision"]), str(variant.manifest["backend"]))
        served.config = read_config(variant.root / CONFIG)
        if served.config.name and served.config.name != name:
            raise RtqError(f"{CONFIG} names model '{served.config.name}' but its folder is '{name}'")
        if not served.config.input or not served.config.output:
            raise RtqError(f"{CONFIG} declares no input or no output")
        labels_path = variant.root / LABELS_FILE
        served.class_names = tuple(labels_path.read_text().splitlines()) if labels_path.is_file() else ()
        policy = policy_of(served.config, default_max_queue, admit_fraction)
        threads = threads_override or threads_of(served.config, variant.manifest)
        warm = np.zeros((1, *served.image_shape), dtype=np.float32)
        watched = _variant_files(variant.root)
        served.watch = FileWatch.of(variant.root, watched)
        snapshot = Path(tempfile.mkdtemp(prefix=f"rtq-{name}-"))
        try:
            version_dir = variant.model_path.parent
            shutil.copytree(version_dir, snapshot / version_dir.name, dirs_exist_ok=True)
            model_path = snapshot / version_dir.name / variant.model_path.name
            for _ in range(policy.instances):
                runner = open_runner(
                    variant.manifest["backend"], model_path, variant.manifest["precision"], threads
                )
                runners.append(runner)
                runner.infer(warm)  # first inference compiles kernels; keep it off the first request
        except Exception as exc:  # name the repository's file, not the snapshot that is gone
            text = str(exc).replace(str(snapshot / version_dir.name), str(version_dir))
            if not isinstance(exc, RtqError):
                text = f"{type(exc).__name__}: {text.strip().splitlines()[0][:300] if text else ''}"
            raise RtqError(text) from None
        finally:
            # Unlinked files stay readable by the runners that mapped them, and nobody can change them.
            shutil.rmtree(snapshot, ignore_errors=True)
        # A file changed between fingerprint and copy would leave the two out of step: check now.
        problem = served.watch.problem()
        if problem:
            raise RtqError(problem)
        served.batcher = ModelBatcher(runners, policy, _observer(metrics, served.labels, served.stats))
        served.reason = ""
    except RtqError as exc:
        served.reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure of one variant must not stop the others
        served.reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"
    if not served.ready:
        for r in runners:
            r.close()
    if served.labels[0]:
        served.ready_gauge = metrics.model_ready.labels(*served.labels)
        served.ready_gauge.set(1 if served.ready else 0)
    return served


def import_runtimes(repository: Path, names: list[str]) -> None:
    """Import the runtime of each variant's backend now; a failure is load_model's to report."""
    for name in names:
        try:
            runner_class(open_variant(repository, name).manifest["backend"])
        except Exception:  # noqa: BLE001, S112 - reported with its variant when it loads
            continue


def load_repository(
    repository: Path,
    metrics: EdgeMetrics,
    default_max_queue: int = DEFAULT_MAX_QUEUE,
    only: list[str] | None = None,
    threads: int | None = None,
    on_loaded: Callable[[ServedModel], None] | None = None,
    admit_fraction: float = DEFAULT_ADMIT_FRACTION,
) -> dict[str, ServedModel]:
    names = only or list_variants(repository)
    models: dict[str, ServedModel] = {}
    for name in names:
        served = load_model(repository, name, metrics, default_max_queue, threads, admit_fraction)
        models[name] = served
        if on_loaded:
            on_loaded(served)
    return models
