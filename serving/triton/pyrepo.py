"""The python-backend repository the slim Triton runs, derived from our model repository.

The repository's own `config.pbtxt` stays the one a full Triton loads natively (onnxruntime_onnx /
openvino backends). The slim tritonserver in nvidia-pytriton has only the python backend, so
`rtq triton` derives a sibling repository: per variant, the same inputs, outputs, batching and
instance groups with `backend: "python"`, our generic model.py and parameters pointing back at
the variant folder. Nothing is copied but labels and the small model.py; the weights stay put.
"""

from __future__ import annotations

import shutil
import site
import sys
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from serving.repository.layout import CONFIG, VERSION, list_variants, open_variant
from serving.repository.triton_config import LABELS_FILE, read_config, to_text
from serving.settings import PROJECT_ROOT

MODEL_PY = Path(__file__).with_name("model.py")
# Parameters of the native backends that mean nothing to the python backend.
_NATIVE_PARAMS = (
    "intra_op_thread_count",
    "inter_op_thread_count",
    "INFERENCE_NUM_THREADS",
    "INFERENCE_PRECISION_HINT",
    "PERFORMANCE_HINT",
    "num_threads",
    "rtq_note",
)
_THREAD_PARAMS = ("intra_op_thread_count", "INFERENCE_NUM_THREADS", "num_threads")


def site_packages() -> str:
    """This environment's site-packages: the stub's isolated interpreter must import from it."""
    for path in site.getsitepackages():
        if path.startswith(sys.prefix) and Path(path).is_dir():
            return path
    return site.getsitepackages()[0]


def python_config(native: mc.ModelConfig, variant_dir: Path, threads: int) -> mc.ModelConfig:
    cfg = mc.ModelConfig()
    cfg.CopyFrom(native)
    cfg.ClearField("platform")
    cfg.ClearField("default_model_filename")
    cfg.backend = "python"
    cfg.name = variant_dir.name  # Triton refuses a model whose config names another folder
    # The runner picks its own device (a TensorRT runner its GPU): Triton only hosts the stub.
    for group in cfg.instance_group:
        group.kind = mc.ModelInstanceGroup.KIND_CPU
        del group.gpus[:]
    for key in _NATIVE_PARAMS:
        if key in cfg.parameters:
            del cfg.parameters[key]
    for key, value in {
        "rtq_variant_dir": str(variant_dir.resolve()),
        "rtq_threads": str(threads),
        "rtq_site_packages": site_packages(),
        "rtq_project_root": str(PROJECT_ROOT),
    }.items():
        cfg.parameters[key].string_value = value
    return cfg


def threads_from(native: mc.ModelConfig, manifest: dict) -> int:
    for key in _THREAD_PARAMS:
        if key in native.parameters and native.parameters[key].string_value.isdigit():
            return int(native.parameters[key].string_value)
    return int(manifest.get("threads", 2))


def write_python_repository(repository: Path, out: Path, models: list[str] | None = None) -> list[str]:
    """Write the derived repository into `out` (replacing what is there); returns the model names."""
    names = models or list_variants(repository)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in names:
        variant = open_variant(repository, name)
        native = read_config(variant.root / CONFIG)
        cfg = python_config(native, variant.root, threads_from(native, variant.manifest))
        folder = out / name
        (folder / VERSION).mkdir(parents=True)
        (folder / CONFIG).write_text(to_text(cfg))
        if (variant.root / LABELS_FILE).is_file():
            shutil.copyfile(variant.root / LABELS_FILE, folder / LABELS_FILE)
        shutil.copyfile(MODEL_PY, folder / VERSION / "model.py")
    return names
