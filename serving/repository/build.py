"""`rtq build`: spec -> PyTorch model -> export/quantize per backend -> evaluated repository variants.

Each variant is written into a staging folder inside the repository and renamed into place only
once its files, config and measured manifest are complete, so a failed build leaves no
half-written variant behind.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np

from serving.bench.accuracy import predict_top5, reference_top5, score
from serving.data.datasets import LabelledSet, open_labelled
from serving.data.loader import load_uint8
from serving.errors import RtqError
from serving.export.onnx_export import (
    INPUT_NAME,
    ONNX_OPSET,
    OUTPUT_NAME,
    export_onnx,
)
from serving.models.zoo import LoadedModel, class_names, class_wnids, create_model
from serving.repository import layout
from serving.repository.recipes import RECIPES, file_bytes
from serving.repository.spec import BuildSpec, ModelEntry, variant_name
from serving.repository.triton_config import LABELS_FILE, native_config, to_text
from serving.runtimes import open_runner
from serving.settings import PROJECT_ROOT

TOOLS = ("torch", "timm", "onnx", "onnxruntime", "openvino", "nncf")
DEFAULT_EVAL = {"imagenet-1k": "imagenet-val", "imagenette": "imagenette/val"}

Log = Callable[[str], None]


@dataclass
class ModelWork:
    """What every variant of one model shares: the loaded model, its exports, calibration, eval."""

    entry: ModelEntry
    loaded: LoadedModel
    workdir: Path
    eval_images: LabelledSet | None = None
    eval_labels: np.ndarray | None = None
    eval_uint8: np.ndarray | None = None
    ref5: np.ndarray | None = None
    calibration: np.ndarray | None = None
    plans: dict = field(default_factory=dict)  # plan name -> PrecisionPlan
    lowbit_info: dict = field(default_factory=dict)  # plan name -> facts for the manifest
    log: Log = print
    cache_dir: Path = PROJECT_ROOT / ".cache"
    _onnx: Path | None = None
    _ir_fp32: Path | None = None
    _lowbit: dict = field(default_factory=dict)

    def lowbit(self, plan: str) -> Path:
        if plan not in self._lowbit:
            from serving.quantize.lowbit_export import build_lowbit

            dst = self.workdir / f"{plan}.onnx"
            self.lowbit_info[plan] = build_lowbit(
                self.onnx_fp32(),
                self.plans[plan],
                self.calibration,
                dst,
                log=lambda msg: self.log(f"{self.loaded.spec.name} {plan}: {msg}"),
                cache_dir=self.cache_dir / "lowbit",
            )
            self._lowbit[plan] = dst
        return self._lowbit[plan]

    def onnx_fp32(self) -> Path:
        if self._onnx is None:
            self._onnx = export_onnx(self.loaded, self.workdir / "fp32.onnx")
        return self._onnx

    def ir_fp32(self) -> Path:
        if self._ir_fp32 is None:
            from serving.export.openvino_export import save_ir, to_ir_model

            self._ir_fp32 = save_ir(to_ir_model(self.onnx_fp32()), self.workdir / "fp32.xml")
        return self._ir_fp32


def tool_versions() -> dict[str, str]:
    return {t: version(t) for t in TOOLS} | {"python": platform.python_version()}


def machine() -> dict:
    import os

    from serving.runtimes.cpu import cpu_info, int8_vnni

    # Without VNNI, x86 INT8 kernels (u8 x s8 pairs summed in int16) can saturate: accuracy differs.
    cpu = cpu_info()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(), "int8_vnni": int8_vnni()}


def build_variant(
    work: ModelWork,
    precision: str,
    backend: str,
    spec: BuildSpec,
    repository: Path,
    command: str,
    progress: bool,
    log: Log,
) -> dict:
    name = variant_name(work.loaded.spec.name, precision, backend)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=repository))
    try:
        recipe = RECIPES[backend]
        model_file = staging / layout.VERSION / recipe.file_for(precision)
        model_file.parent.mkdir(parents=True)
        log(f"{name}: writing {model_file.name}")
        recipe.make(work, precision, model_file)
        fp32_bytes = file_bytes(backend, recipe.fp32_file(work))
        stats = recipe.stats(model_file)
        size = file_bytes(backend, model_file)
        pp = work.loaded.spec.preprocessing
        with open_runner(backend, model_file, precision, spec.threads) as runner:
            execution = runner.execution_precision
            runtime = runner.describe()
            accuracy = None
            if work.eval_uint8 is not None:
                pred5 = predict_top5(runner.infer, work.eval_uint8, pp, desc=name, progress=progress)
                accuracy = score(work.eval_images.name, pred5, work.ref5, work.eval_labels)
        classes = work.loaded.spec.classes
        cfg = native_config(
            name,
            backend,
            INPUT_NAME,
            pp.input_shape,
            OUTPUT_NAME,
            len(class_wnids(classes)),
            spec.max_batch_size,
            spec.threads,
            execution,
        )
        (staging / layout.CONFIG).write_text(to_text(cfg))
        (staging / LABELS_FILE).write_text("\n".join(class_names(classes)) + "\n")
        acc = {} if accuracy is None else {accuracy.eval_set: accuracy}
        manifest = {
            "schema": 1,
            "variant": name,
            **work.loaded.provenance(),
            "precision": precision,
            "backend": backend,
            "execution_precision": execution,
            "model_file": model_file.name,
            "onnx_opset": ONNX_OPSET,
            "quantization": recipe.int8_method if precision == "int8" else None,
            "lowbit": work.lowbit_info.get(precision),
            "weight_bits": round(stats.bits_per_weight, 3),
            "weight_params": stats.params,
            "file_bytes": size,
            "fp32_file_bytes": fp32_bytes,
            "compression_vs_fp32": round(fp32_bytes / size, 3),
            "top1": {k: a.top1 for k, a in acc.items()},
            "top5": {k: a.top5 for k, a in acc.items()},
            "top1_ci95": {k: a.top1_ci95 for k, a in acc.items()},
            "top1_fp32": {k: a.top1_fp32 for k, a in acc.items()},
            "agreement_fp32": {k: a.agreement_fp32 for k, a in acc.items()},
            "eval_images": {k: a.n for k, a in acc.items()},
            "fp32_reference": "PyTorch eager FP32 of the same weights, same images",
            "classes": classes,
            "preprocessing": pp.to_dict(),
            "input": {"name": INPUT_NAME, "datatype": "FP32", "shape": list(pp.input_shape)},
            "output": {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [len(class_wnids(classes))]},
            "calibration": {"folder": spec.calibration_folder, "images": spec.calibration_images}
            if precision != "fp32" and precision != "fp16"
            else None,
            "runtime": runtime,
            "threads": spec.threads,
            "max_batch_size": spec.max_batch_size,
            "tool_versions": tool_versions(),
            "build_command": command,
            "spec": str(Path(spec.source).resolve().relative_to(PROJECT_ROOT))
            if Path(spec.source).resolve().is_relative_to(PROJECT_ROOT)
            else spec.source,
            "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
        }
        (staging / layout.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for d in (staging, staging / layout.VERSION):
            d.chmod(0o755)  # mkdtemp makes 0700; servers may run as another user
        final = repository / name
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=repository))
            final.rename(trash / name)
            staging.rename(final)
            shutil.rmtree(trash)
        else:
            staging.rename(final)
        return manifest
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _prepare(
    entry: ModelEntry,
    spec: BuildSpec,
    data_root: Path | None,
    workdir: Path,
    cache_dir: Path,
    progress: bool,
    log: Log,
) -> ModelWork:
    loaded = create_model(entry.model, weights=entry.weights)
    if not loaded.trained:
        log(f"{entry.model}: no weights here, built untrained (figures are not real accuracy)")
    from serving.quantize.plan import load_plan

    plans = {p.name: p for p in map(load_plan, entry.plans)}
    work = ModelWork(entry, loaded, workdir, plans=plans, log=log, cache_dir=cache_dir)
    pp = loaded.spec.preprocessing
    if "int8" in entry.precisions or plans:
        from serving.quantize.calibration import calibration_inputs

        work.calibration = calibration_inputs(
            spec.calibration_folder, pp, spec.calibration_images, data_root, progress
        )
    folder = spec.eval_folder or DEFAULT_EVAL[loaded.spec.classes]
    try:
        images = open_labelled(folder, data_root)
    except RtqError as exc:
        log(f"no accuracy columns: {exc}")
        return work
    images, labels = images.head(None).for_classes(class_wnids(loaded.spec.classes))
    images = images.head(spec.eval_images)
    work.eval_images, work.eval_labels = images, labels[: len(images)]
    work.eval_uint8 = load_uint8(images, pp, progress)
    work.ref5 = reference_top5(
        loaded,
        work.eval_uint8,
        [str(it.path.name) for it in images.items],
        cache_dir / "reference",
        progress,
    )
    return work


def build(
    spec: BuildSpec,
    repository: Path,
    command: str,
    data_root: Path | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    log: Log = print,
) -> list[dict]:
    """Build every variant of the spec; returns their manifests in spec order.

    cache_dir keeps what is expensive and keyed by its inputs: FP32 reference predictions and
    learned-rounding results (default: .cache/ in the project).
    """
    repository.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir or PROJECT_ROOT / ".cache"
    manifests = []
    for entry in spec.models:
        with tempfile.TemporaryDirectory(prefix="rtq-build-") as tmp:
            work = _prepare(entry, spec, data_root, Path(tmp), cache_dir, progress, log)
            for precision in entry.all_precisions():
                for backend in entry.backends:
                    manifests.append(
                        build_variant(work, precision, backend, spec, repository, command, progress, log)
                    )
    return manifests
