"""Training configuration and the progressive-learning schedule (EfficientNetV2 paper, Algorithm 1).

Training is split into M stages of equal length; stage i trains at image size
S_i = S_0 + (S_e - S_0) * i / (M - 1) with every regularizer moved the same way
(phi_i = phi_0 + (phi_e - phi_0) * i / (M - 1)): small images are paired with weak regularization
early on, large images with strong regularization at the end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from serving.errors import RtqError

DEFAULT_NAME = "efficientnetv2_b0_imagenette"
# The one architecture `rtq train` trains (the zoo entry above registers its output).
ARCH = "tf_efficientnetv2_b0"
TEACHER_PRECISIONS = ("f32", "int8")


@dataclass(frozen=True)
class Stage:
    index: int
    first_epoch: int
    epochs: int
    image_size: int
    dropout: float
    randaug_magnitude: float
    mixup_alpha: float

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights; saved in every checkpoint and the manifest.

    Defaults are sized for 2 CPU cores: about 100 minutes on an idle machine (see
    serving/train/README.md for the measurements behind them).
    """

    name: str = DEFAULT_NAME
    timm_name: str = ARCH
    data: str = "imagenette"
    # 80 -> 144 px was ahead of 96 -> 160 at equal epochs in the H200 recipe check
    # (benchmarks/results/train-recipe-check-h200-20261127.md) and costs less per epoch; 48 epochs
    # of it fit in 2 hours here (64 were projected at ~150 min: 113 img/s at 80 px on 2 threads).
    epochs: int = 48
    stages: int = 4
    min_size: int = 80
    max_size: int = 144
    # Sizes are rounded to this multiple so each stage runs a handful of well-shaped kernels.
    size_multiple: int = 8
    # Weaker than the first recipe's (0.3 / 9 / 0.2 at the end): with those the model underfit
    # (augmented train top-1 ~70% under val 86%) and the strongest stage added nothing.
    dropout: tuple[float, float] = (0.1, 0.2)
    # RandAugment magnitude on the paper's 0-10 scale (torchvision with 11 magnitude bins).
    randaug: tuple[float, float] = (2.0, 7.0)
    randaug_ops: int = 2
    mixup: tuple[float, float] = (0.0, 0.1)
    # 0.08 (ImageNet's default) crops too hard for 9k images and ~40 epochs.
    crop_scale_min: float = 0.25
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    min_lr: float = 1e-5
    ema_decay: float = 0.998
    # Train-test resolution discrepancy (FixRes; the paper evaluates B0 at 224 after training at
    # 192): random-resized crops magnify objects ~1.2x, so the full 160 px image is evaluated
    # resized to 176 px (1.2 x the last stage's 144). The val cache is made with the zoo's own code.
    eval_size: int = 176
    # Val images evaluated after each epoch (a fixed class-balanced subset; the full set after each
    # stage's last epoch). None: the full set every epoch.
    val_images_per_epoch: int | None = 500
    max_images: int | None = None
    max_val_images: int | None = None
    bf16: bool = True
    channels_last: bool = True
    seed: int = 0
    # Knowledge distillation (serving/train/distill.py): a zoo ImageNet-1k classifier whose logits
    # over the data's classes teach the student on its own augmented batch. None: labels only.
    teacher: str | None = None
    # Share of the loss from the teacher; the rest is the label cross-entropy.
    kd_weight: float = 0.5
    kd_temperature: float = 1.0
    # The teacher's input side (the student's batch resized); 0: the student's own size.
    teacher_size: int = 0
    # "int8": the teacher quantized by NNCF on the run's own train images (OpenVINO on the CPU):
    # the teacher 1.65x faster than f32 at 160 px here (an epoch ~7%), top-1 agreeing on 99%.
    # "f32": as trained.
    teacher_precision: str = "f32"

    def __post_init__(self) -> None:
        checks = [
            (self.stages >= 1, f"--stages must be at least 1, got {self.stages}"),
            (
                self.epochs >= self.stages,
                f"--epochs ({self.epochs}) must be at least --stages ({self.stages}): every stage "
                "trains one epoch or more",
            ),
            (
                0 < self.min_size <= self.max_size,
                f"image sizes must satisfy 0 < min ({self.min_size}) <= max ({self.max_size})",
            ),
            (self.size_multiple >= 1, f"size multiple must be positive, got {self.size_multiple}"),
            (self.eval_size > 0, f"--eval-size must be positive, got {self.eval_size}"),
            (self.batch_size >= 2, f"--batch-size must be at least 2 (batch norm), got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}"),
            (0 < self.crop_scale_min <= 1, f"crop scale must be in (0, 1], got {self.crop_scale_min}"),
            (0 <= self.ema_decay < 1, f"EMA decay must be in [0, 1), got {self.ema_decay}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (all(0 <= d < 1 for d in self.dropout), f"dropout must be in [0, 1), got {self.dropout}"),
            (all(0 <= m <= 10 for m in self.randaug), f"RandAugment magnitude is 0-10, got {self.randaug}"),
            (all(a >= 0 for a in self.mixup), f"mixup alpha must be non-negative, got {self.mixup}"),
            (0 <= self.kd_weight <= 1, f"--kd-weight must be in [0, 1], got {self.kd_weight}"),
            (self.kd_temperature > 0, f"--kd-temperature must be positive, got {self.kd_temperature}"),
            (self.teacher_size >= 0, f"--teacher-size must be 0 or more, got {self.teacher_size}"),
            (
                self.teacher_precision in TEACHER_PRECISIONS,
                f"--teacher-precision must be one of {', '.join(TEACHER_PRECISIONS)}, "
                f"got {self.teacher_precision!r}",
            ),
        ]
        for limit in (self.max_images, self.max_val_images, self.val_images_per_epoch):
            checks.append((limit is None or limit > 0, f"image limits must be positive, got {limit}"))
        for ok, msg in checks:
            if not ok:
                raise RtqError(msg)

    def schedule(self) -> list[Stage]:
        """The per-stage sizes and regularization; remainder epochs go to the last (largest) stages."""
        base, extra = divmod(self.epochs, self.stages)
        out: list[Stage] = []
        first = 0
        for i in range(self.stages):
            t = i / (self.stages - 1) if self.stages > 1 else 1.0
            size = self.min_size + (self.max_size - self.min_size) * t
            size = max(self.size_multiple, int(round(size / self.size_multiple)) * self.size_multiple)
            epochs = base + (1 if i >= self.stages - extra else 0)
            out.append(
                Stage(
                    index=i,
                    first_epoch=first,
                    epochs=epochs,
                    image_size=min(size, max(self.max_size, self.size_multiple)),
                    dropout=_lerp(self.dropout, t),
                    randaug_magnitude=_lerp(self.randaug, t),
                    mixup_alpha=_lerp(self.mixup, t),
                )
            )
            first += epochs
        return out

    def stage_of(self, epoch: int) -> Stage:
        for stage in self.schedule():
            if stage.first_epoch <= epoch <= stage.last_epoch:
                return stage
        raise RtqError(f"epoch {epoch} is outside the {self.epochs}-epoch schedule")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RtqError(f"checkpoint config has unknown fields {unknown} (from another rtq version)")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        # Checkpoints from before the field existed distilled from the f32 teacher.
        values.setdefault("teacher_precision", "f32")
        return cls(**values)


def _lerp(pair: tuple[float, float], t: float) -> float:
    return round(pair[0] + (pair[1] - pair[0]) * t, 6)
