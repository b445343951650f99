"""Precision plans: plain YAML saying how many bits each layer gets and how it is rounded.

    name: w4a8                     # becomes the variant's precision: <model>-w4a8-<backend>
    method: adaround               # rtn | rtn-bc (bias correction) | adaround | adaround-oc
    weights: {bits: 4, per_channel: true, symmetric: true}
    activations: {bits: 8}
    components: {stem: {bits: 8}, classifier: {bits: 8}}   # by component type
    layers: {blocks.6.0.conv_pwl: {bits: 8}}               # by layer name; wins over components
    calibration_images: 256        # of the build's calibration set, for statistics and rounding

`rtq qat` writes plans with `method: qat` and `qat_file:` (its trained integers, .npz, relative to
the plan); builds take those integers as they are instead of rounding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from serving.errors import RtqError
from serving.quantize.graph import COMPONENTS, Layer
from serving.quantize.lowbit import ACT_BITS, WEIGHT_BITS, WeightQuant

METHODS = ("rtn", "rtn-bc", "adaround", "adaround-oc", "qat")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.]*$")
_TOP = {"name", "method", "weights", "activations", "components", "layers", "calibration_images",
        "description", "qat_file", "qat_sha256"}  # fmt: skip
# Storage containers: 3-bit weights ship in int4, 6-bit in int8 (no packing gain below a container).
STORAGE_BITS = {2: 2, 3: 4, 4: 4, 6: 8, 8: 8}


@dataclass(frozen=True)
class PrecisionPlan:
    name: str
    method: str = "adaround"
    weights: WeightQuant = WeightQuant(4)
    act_bits: int = 8
    components: dict[str, int] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)
    calibration_images: int = 256
    description: str = ""
    qat_file: str = ""  # method qat: the trained integers (absolute once loaded from a file)
    qat_sha256: str = ""  # of qat_file, checked at build; part of the build cache key

    def bits_for(self, layer: Layer) -> int:
        if layer.name in self.layers:
            return self.layers[layer.name]
        return self.components.get(layer.component, self.weights.bits)

    def quant_for(self, layer: Layer) -> WeightQuant:
        bits = self.bits_for(layer)
        # Asymmetric 8-bit does not fit int8 storage: 8-bit layers are always symmetric.
        symmetric = self.weights.symmetric or bits == 8
        return WeightQuant(bits, self.weights.per_channel, symmetric, self.weights.search_scale)

    def check_layers(self, layers: list[Layer]) -> None:
        known = {layer.name for layer in layers}
        unknown = sorted(set(self.layers) - known)
        if unknown:
            raise RtqError(
                f"plan {self.name} names unknown layers {unknown[:3]}; the model's layers start "
                f"{sorted(known)[:3]} (see `rtq sensitivity --list-layers`)"
            )

    def to_dict(self) -> dict:
        qat = {"qat_file": self.qat_file, "qat_sha256": self.qat_sha256} if self.method == "qat" else {}
        return {
            "name": self.name, "method": self.method, "description": self.description,
            "weights": {"bits": self.weights.bits, "per_channel": self.weights.per_channel,
                        "symmetric": self.weights.symmetric},
            "activations": {"bits": self.act_bits},
            "components": {k: {"bits": v} for k, v in self.components.items()},
            "layers": {k: {"bits": v} for k, v in self.layers.items()},
            "calibration_images": self.calibration_images,
        } | qat  # fmt: skip


def _bits(value: object, where: str, allowed: tuple[int, ...]) -> int:
    if isinstance(value, dict) and set(value) - {"bits"}:
        raise RtqError(f"{where}: only `bits` can be set per layer or component")
    bits = value.get("bits") if isinstance(value, dict) else value
    if bits not in allowed:
        raise RtqError(f"{where}: {bits!r} bits not supported; expected one of {list(allowed)}")
    return int(bits)


def parse_plan(data: object, source: str = "<inline>") -> PrecisionPlan:
    if not isinstance(data, dict):
        raise RtqError(f"plan {source} must be a mapping")
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise RtqError(f"plan {source} has unknown field(s) {unknown}; allowed: {sorted(_TOP)}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or name in ("fp32", "fp16", "int8"):
        raise RtqError(f"plan {source}: name {name!r} must be lower-case letters/digits, not fp32/fp16/int8")
    method = data.get("method", "adaround")
    if method not in METHODS:
        raise RtqError(f"plan {source}: method {method!r} unknown; expected one of {list(METHODS)}")
    w = data.get("weights", {}) or {}
    if set(w) - {"bits", "per_channel", "symmetric"}:
        raise RtqError(f"plan {source}: weights takes bits, per_channel, symmetric")
    weights = WeightQuant(
        _bits(w.get("bits", 4), f"plan {source} weights", WEIGHT_BITS),
        bool(w.get("per_channel", True)),
        bool(w.get("symmetric", True)),
    )
    a = data.get("activations", {}) or {}
    act_bits = _bits(a.get("bits", 8) if isinstance(a, dict) else a, f"plan {source} activations", ACT_BITS)
    comps = data.get("components", {}) or {}
    bad = sorted(set(comps) - set(COMPONENTS))
    if bad:
        raise RtqError(f"plan {source}: unknown components {bad}; expected some of {list(COMPONENTS)}")
    qat_file, qat_sha = str(data.get("qat_file", "") or ""), str(data.get("qat_sha256", "") or "")
    if (method == "qat") != bool(qat_file):
        raise RtqError(
            f"plan {source}: method qat and qat_file go together (qat_file names the integers that "
            "`rtq qat` trained; other methods round the FP32 weights themselves)"
        )
    n = data.get("calibration_images", 256)
    if not isinstance(n, int) or n < 16:
        raise RtqError(f"plan {source}: calibration_images must be an integer >= 16, got {n!r}")
    return PrecisionPlan(
        name=name,
        method=method,
        weights=weights,
        act_bits=act_bits,
        components={k: _bits(v, f"plan {source} components.{k}", WEIGHT_BITS) for k, v in comps.items()},
        layers={
            str(k): _bits(v, f"plan {source} layers.{k}", WEIGHT_BITS)
            for k, v in (data.get("layers", {}) or {}).items()
        },
        calibration_images=n,
        description=str(data.get("description", "")),
        qat_file=qat_file,
        qat_sha256=qat_sha,
    )


def load_plan(path: str | Path) -> PrecisionPlan:
    path = Path(path)
    if not path.is_file():
        raise RtqError(f"precision plan {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RtqError(f"precision plan {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    plan = parse_plan(data, str(path))
    if plan.qat_file and not Path(plan.qat_file).is_absolute():
        plan = replace(plan, qat_file=str((path.parent / plan.qat_file).resolve()))
    return plan


def save_plan(plan: PrecisionPlan, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(plan.to_dict(), sort_keys=False))
    return path
