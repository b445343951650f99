"""Build specs: plain YAML naming which variants `rtq build` makes. Unknown fields are errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from serving.errors import RtqError
from serving.models.zoo import get_spec
from serving.repository.recipes import RECIPES
from serving.settings import PROJECT_ROOT

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_SPEC = PROJECT_ROOT / "specs" / "default.yaml"


@dataclass(frozen=True)
class ModelEntry:
    model: str
    precisions: tuple[str, ...] = ("fp32", "int8")
    backends: tuple[str, ...] = ("onnxruntime", "openvino")
    weights: str | None = None
    plans: tuple[str, ...] = ()  # precision plan YAML files; each adds a <model>-<plan name>-<backend>

    def all_precisions(self) -> tuple[str, ...]:
        from serving.quantize.plan import load_plan

        return self.precisions + tuple(load_plan(p).name for p in self.plans)


@dataclass(frozen=True)
class BuildSpec:
    models: tuple[ModelEntry, ...]
    calibration_folder: str = "imagenet-calib"
    calibration_images: int = 300
    eval_folder: str | None = None  # None: imagenet-val for ImageNet models, imagenette/val for 10-class
    eval_images: int | None = None  # None: every image of the eval folder
    threads: int = 2
    max_batch_size: int = 32
    source: str = field(default="<inline>", compare=False)

    def variants(self) -> list[tuple[ModelEntry, str, str]]:
        return [(m, p, b) for m in self.models for p in m.all_precisions() for b in m.backends]


def variant_name(model: str, precision: str, backend: str) -> str:
    return f"{model}-{precision}-{backend}"


def _strict(cls: type, data: object, where: str) -> dict:
    if not isinstance(data, dict):
        raise RtqError(f"{where} must be a mapping, got {type(data).__name__}")
    allowed = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RtqError(f"{where} has unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    return data


def _names(value: object, allowed: tuple[str, ...], what: str, where: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value or ())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise RtqError(f"{where}: {what} {bad or items} not supported; expected some of {list(allowed)}")
    return items


def _plan_path(value: object, source: str) -> str:
    """Plan paths are relative to the spec file, then to the project root; checked now."""
    from serving.quantize.plan import load_plan

    if not isinstance(value, str):
        raise RtqError(f"spec {source}: plans must be file paths, got {value!r}")
    candidates = [Path(source).parent / value, PROJECT_ROOT / value, Path(value)]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise RtqError(f"spec {source}: precision plan {value} not found next to the spec or in the project")
    load_plan(path)
    return str(path)


def parse_spec(data: object, source: str = "<inline>") -> BuildSpec:
    top = _strict(BuildSpec, data, f"spec {source}")
    if not top.get("models"):
        raise RtqError(f"spec {source} lists no models")
    entries = []
    for i, raw in enumerate(top["models"]):
        where = f"spec {source} models[{i}]"
        m = _strict(ModelEntry, raw, where)
        if "model" not in m:
            raise RtqError(f"{where} lacks the `model` field")
        get_spec(m["model"])  # unknown model -> clear error now, not half-way through a build
        entries.append(
            ModelEntry(
                model=m["model"],
                # A model built only from precision plans may list no base precision.
                precisions=()
                if m.get("plans") and not m.get("precisions")
                else _names(m.get("precisions", ModelEntry.precisions), PRECISIONS, "precisions", where),
                backends=_names(m.get("backends", ModelEntry.backends), tuple(RECIPES), "backends", where),
                weights=m.get("weights"),
                plans=tuple(_plan_path(p, source) for p in m.get("plans") or ()),
            )
        )
    for e in entries:
        for b in e.backends:
            if e.plans and not RECIPES[b].lowbit:
                raise RtqError(f"spec {source}: backend {b} does not build precision plans")
            unsupported = [p for p in e.precisions if p not in RECIPES[b].precisions]
            if unsupported:
                raise RtqError(
                    f"spec {source}: backend {b} does not build {unsupported}; it builds "
                    f"{list(RECIPES[b].precisions)}"
                )
    spec = BuildSpec(
        models=tuple(entries),
        **{k: v for k, v in top.items() if k != "models"},
        source=source,
    )
    for name in ("calibration_images", "threads", "max_batch_size"):
        value = getattr(spec, name)
        if not isinstance(value, int) or value < 1:
            raise RtqError(f"spec {source}: {name} must be a positive integer, got {value!r}")
    if spec.eval_images is not None and (not isinstance(spec.eval_images, int) or spec.eval_images < 1):
        raise RtqError(f"spec {source}: eval_images must be a positive integer or null")
    return spec


def load_spec(path: str | Path | None = None) -> BuildSpec:
    path = Path(path) if path else DEFAULT_SPEC
    if not path.is_file():
        raise RtqError(f"spec file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RtqError(f"spec file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_spec(data, str(path))
