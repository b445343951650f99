"""What `rtq qat` trains (presets, hyper-parameters), apart from the training loop itself.

Kept free of torch: every `rtq` command builds its parser from these defaults, and the edge server
must not pay torch's ~300 MB for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from serving.errors import RtqError
from serving.quantize.plan import PrecisionPlan, parse_plan

# Built-in plans; a YAML plan (rtq sensitivity --allocate writes them) works the same way.
PRESETS: dict[str, dict] = {
    "w8a8": {"weights": {"bits": 8}, "activations": {"bits": 8}},
    "w4a8": {"weights": {"bits": 4}, "activations": {"bits": 8}},
    "w4a4": {"weights": {"bits": 4}, "activations": {"bits": 4}},
    # First and last layers at 8 bits, as the issue allows for W2A4.
    "w2a4": {"weights": {"bits": 2}, "activations": {"bits": 4}},
}
_FIRST_LAST_8 = {"stem": {"bits": 8}, "classifier": {"bits": 8}}


def preset_plan(name: str) -> PrecisionPlan:
    if name not in PRESETS:
        raise RtqError(f"unknown QAT plan {name!r}; built in: {', '.join(PRESETS)}, or a plan YAML file")
    return parse_plan({"name": name, **PRESETS[name], "components": _FIRST_LAST_8}, f"preset {name}")


@dataclass(frozen=True)
class QatConfig:
    epochs: int = 4
    progressive: tuple[int, ...] = (8, 4, 2)  # () trains at the plan's bits from the start
    phase_epochs: tuple[int, ...] = ()  # epochs per progressive phase; () splits evenly
    kd: bool = True  # distil from the FP32 teacher (KL at temperature); else cross-entropy on labels
    temperature: float = 1.0
    lr: float = 5e-5  # weights and biases
    step_lr: float = 1e-3  # log step sizes and activation offsets
    batch_size: int = 32
    image_size: int | None = None  # training crops; None: the model's serving resolution
    crop_scale_min: float = 0.35
    # Beta(a, a) mixup of the batch with itself reversed; 0 = off. With KD it shows the teacher
    # images it has not memorized, so its soft targets carry more than the label (Beyer et al. 2022).
    mixup: float = 0.0
    grad_clip: float = 1.0
    # Decay of an exponential average of the student's parameters over the last phase, which is what
    # gets evaluated and exported; 0 = the last step's. At the cosine's tail, weights next to a rounding
    # boundary still flip: two 6-epoch W4A4 runs each ended 0.3-0.4 pp below their best epoch.
    ema_decay: float = 0.0
    freeze_threshold: float | None = 0.02  # oscillation frequency above which a weight is pinned
    osc_momentum: float = 0.99
    freeze_after: float = 0.3  # fraction of each low-bit phase before freezing starts
    calibration_images: int = 256
    max_images: int | None = None
    max_val_images: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise RtqError(f"--epochs must be 0 or more, got {self.epochs}")
        if self.phase_epochs and (min(self.phase_epochs) < 1 or sum(self.phase_epochs) != self.epochs):
            raise RtqError(
                f"--phase-epochs {','.join(map(str, self.phase_epochs))} must be positive and sum to "
                f"--epochs {self.epochs}"
            )
        if any(b not in (2, 3, 4, 6, 8) for b in self.progressive):
            raise RtqError(f"--progressive widths must be among 2, 3, 4, 6, 8; got {list(self.progressive)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise RtqError(f"--ema-decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if not math.isfinite(self.mixup) or self.mixup < 0:
            raise RtqError(f"--mixup must be 0 (off) or a positive Beta alpha, got {self.mixup}")
        if self.batch_size < 2 or self.lr <= 0 or self.step_lr <= 0 or self.temperature <= 0:
            raise RtqError("--batch-size must be >= 2 and learning rates and temperature positive")
        if self.calibration_images < 1 or (self.image_size is not None and self.image_size < 8):
            raise RtqError("--calibration-images must be positive and --image-size at least 8 px")
        for limit in (self.max_images, self.max_val_images):
            if limit is not None and limit < 1:
                raise RtqError(f"image limits must be positive, got {limit}")
