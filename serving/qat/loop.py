"""`rtq qat`: fold, wrap, calibrate, then train the fake-quantized student against the FP32 teacher.

Phases of progressive bit reduction (8 -> 4 -> 2 by default) each restart a cosine learning rate;
the last phase is at the plan's own bits and is what gets exported. Training runs in fp32: the
rounding of w / s has to be exact, and bf16 keeps only 8 bits of mantissa.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from serving.models.preprocessing import Preprocessing
from serving.models.zoo import LoadedModel
from serving.qat.config import QatConfig
from serving.qat.fake_quant import EAGER, Kernels
from serving.qat.fold import fold_batchnorm
from serving.qat.integers import save_integers
from serving.qat.prepare import (
    Phase,
    QuantLayer,
    calibrate,
    prepare,
    progressive_phases,
    set_bits,
    track_oscillations,
    use_kernels,
)
from serving.quantize.plan import PrecisionPlan
from serving.train.distill import distillation_loss
from serving.train.loop import normalize_batch

Log = Callable[[str], None]
TeacherFn = Callable[[torch.Tensor], torch.Tensor]  # normalized batch -> the frozen teacher's logits
EVAL_BATCH = 100
CHECKPOINT_FORMAT = "rtq-qat/1"
CHECKPOINT = "last.pt"  # in the run's --out folder, rewritten after every epoch, removed when done


@dataclass
class QatData:
    """uint8 train store (N x 3 x S x S, augmented on the fly), labels, val images at eval size."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    pp: Preprocessing  # the model's: mean and std for both splits
    source: str


@dataclass
class QatResult:
    plan_path: Path
    integers_path: Path
    summary: dict
    history: list[dict] = field(default_factory=list)
    student: nn.Module | None = None  # the fake-quantized model as trained


def _normalize(x: torch.Tensor, data: QatData, device: str) -> torch.Tensor:
    return normalize_batch(x, data.pp, False, device)


@torch.no_grad()
def evaluate(model: nn.Module, data: QatData, device: str) -> dict:
    model.eval()
    correct, t0 = 0, time.perf_counter()
    for i in range(0, len(data.val_labels), EVAL_BATCH):
        x = _normalize(torch.from_numpy(np.array(data.val_images[i : i + EVAL_BATCH])), data, device)
        y = torch.from_numpy(data.val_labels[i : i + EVAL_BATCH]).to(device)
        correct += int((model(x).argmax(1) == y).sum())
    n = len(data.val_labels)
    return {"top1": correct / n, "images": n, "seconds": round(time.perf_counter() - t0, 2)}


def _loss(student_logits, teacher_logits, y, cfg: QatConfig, lam: float = 1.0) -> torch.Tensor:
    if not cfg.kd:
        ce = F.cross_entropy(student_logits, y)
        return ce if lam == 1.0 else lam * ce + (1 - lam) * F.cross_entropy(student_logits, y.flip(0))
    return distillation_loss(student_logits, teacher_logits, cfg.temperature)


def _lr_factor(step: int, total: int) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class ParameterAverage:
    """An exponential average of a module's parameters (not its buffers: oscillation counters and
    frozen masks are not quantities to average). Its decay ramps up from 0 as (1 + t) / (10 + t), so
    the first steps after the start are not weighed by the starting point.

    Not torch's AveragedModel: that keeps a second module, while evaluation and export here go
    through the student's own (compiled) quantizers, so the averages are swapped into it in place."""

    def __init__(self, module: nn.Module, decay: float, state: dict | None = None) -> None:
        self.decay = decay
        self.names, self.params = map(list, zip(*module.named_parameters(), strict=True))
        self.steps = int(state["steps"]) if state is not None else 0
        if state is not None:  # a resumed run's
            saved = state["averages"]
            self.averages = [saved[n].to(p.device) for n, p in zip(self.names, self.params, strict=True)]
        else:
            self.averages = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.averages, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live parameters with the averages in place (the same tensors: compiled
        kernels see no new inputs); a second call swaps back."""
        for p, a in zip(self.params, self.averages, strict=True):
            live = p.detach().clone()
            p.copy_(a)
            a.copy_(live)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "averages": dict(zip(self.names, self.averages, strict=True))}


def _batches(data: QatData, cfg: QatConfig, size: int, epoch: int, workers: int):
    from serving.train.data import Augment, AugmentedImages, EpochBatches, worker_init

    aug = Augment(size, cfg.crop_scale_min, 0, 0.0)  # crop + flip only: the teacher is the target
    return torch.utils.data.DataLoader(
        AugmentedImages(data.train_images, data.train_labels, aug),
        batch_sampler=EpochBatches(len(data.train_labels), cfg.batch_size, cfg.seed, 1000 + epoch),
        num_workers=workers,
        worker_init_fn=worker_init if workers else None,
        generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch),
    )


def _calibration_batches(data: QatData, cfg: QatConfig, size: int, device: str):
    from serving.train.data import balanced_indices

    idx = balanced_indices(data.train_labels, cfg.calibration_images)
    for i in range(0, len(idx), EVAL_BATCH):
        x = _normalize(torch.from_numpy(np.array(data.train_images[idx[i : i + EVAL_BATCH]])), data, device)
        # Whole stored frames at the training size: the ranges of what training will show.
        yield F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def make_student(
    loaded: LoadedModel, plan: PrecisionPlan, size: int, kernels: Kernels = EAGER, device: str = "cpu"
) -> tuple[nn.Module, nn.Module, list[QuantLayer], list[str]]:
    """(frozen teacher, BN-folded student with every layer wrapped per `plan`, its layers, the folded
    batch norms): still to be calibrated."""
    teacher = loaded.module.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)
    folded = fold_batchnorm(student, torch.zeros(1, 3, size, size, device=device))
    layers = prepare(student, plan)
    use_kernels(layers, kernels)
    for p in student.parameters():
        p.requires_grad_(True)
    return teacher, student, layers, folded


def make_optimizer(student: nn.Module, cfg: QatConfig) -> torch.optim.Optimizer:
    """AdamW, the quantizers' steps and offsets at their own learning rate."""
    quant_params = [p for n, p in student.named_parameters() if ".weight_q." in n or ".input_q." in n]
    ids = {id(p) for p in quant_params}
    model_params = [p for p in student.parameters() if id(p) not in ids]
    return torch.optim.AdamW(
        [{"params": model_params, "lr": cfg.lr}, {"params": quant_params, "lr": cfg.step_lr}],
        weight_decay=0.0,
    )


def teacher_forward(teacher: nn.Module, cfg: QatConfig, device: str) -> TeacherFn:
    """The frozen teacher as the training step calls it: on OpenVINO on the CPU (faster than eager
    PyTorch: `rtq bench qat-step`; V2-B0's logits agree within 2e-6), else itself."""
    if not cfg.kd or not cfg.epochs or torch.device(device).type != "cpu":  # no step needs a faster one
        return teacher
    from serving.train.distill import openvino_forward, openvino_graph

    return openvino_forward(openvino_graph(teacher), torch.get_num_threads())


def train_step(
    teacher: TeacherFn,
    student: nn.Module,
    layers: list[QuantLayer],
    opt: torch.optim.Optimizer,
    cfg: QatConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    lam: float = 1.0,
    freeze_threshold: float | None = None,
) -> tuple[torch.Tensor, int]:
    """One optimizer step on a normalized batch (mixed with itself reversed by `lam`); (loss, weights
    frozen so far). `freeze_threshold`: pin weights oscillating more often (None: none yet)."""
    if lam != 1.0:
        x = lam * x + (1 - lam) * x.flip(0)
    with torch.no_grad():
        t_logits = teacher(x) if cfg.kd else None
    loss = _loss(student(x), t_logits, y, cfg, lam)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    opt.step()
    return loss, track_oscillations(layers, cfg.osc_momentum, freeze_threshold)


def run_qat(
    loaded: LoadedModel,
    plan: PrecisionPlan,
    data: QatData,
    cfg: QatConfig,
    out: Path,
    device: str = "cpu",
    workers: int = 1,
    command: str = "",
    log: Log = print,
    progress: bool = False,
    fp32: dict | None = None,
    resume: dict | None = None,
    kernels: Kernels = EAGER,
) -> QatResult:
    """Train, export the integers and a build plan (`method: qat`) into `out`; return what was written.

    `fp32`: the teacher's `evaluate` result on `data` when the caller has it (an ablation grid
    evaluates the teacher once, not once per cell). `resume`: a checkpoint `read_checkpoint` gave;
    training goes on after its last finished epoch, as the uninterrupted run would have. `kernels`:
    the fake quantizers' (`compiled_kernels()`: the same values, a faster step)."""
    torch.manual_seed(cfg.seed)
    size = cfg.image_size or loaded.spec.preprocessing.resolution
    teacher, student, layers, folded = make_student(loaded, plan, size, kernels, device)
    seen = calibrate(student, layers, _calibration_batches(data, cfg, size, device))
    t_forward = teacher_forward(teacher, cfg, device)
    phases = progressive_phases(plan, cfg.progressive, cfg.epochs, cfg.phase_epochs) if cfg.epochs else [
        Phase(min(q.target_bits for q in layers), plan.act_bits, 0)
    ]  # fmt: skip
    log(
        f"{loaded.spec.name}: {len(folded)} batch norms folded, {len(layers)} layers wrapped, "
        f"{seen} calibration images, {kernels.name} fake quantizers; phases "
        + ", ".join(f"W{p.weight_bits}A{p.act_bits} x{p.epochs}" for p in phases)
    )
    t_start = time.perf_counter()
    if resume is not None:
        fp32 = resume["fp32"]  # the same images: no second teacher pass
    fp32 = fp32 or evaluate(teacher, data, device)
    log(f"teacher FP32 top-1 {fp32['top1']:.4f} on {fp32['images']} val images")
    history: list[dict] = []
    epoch = 0
    mix_rng = np.random.default_rng(cfg.seed)
    elapsed_before = 0.0
    resumed_with: list[str] = list(resume.get("resumed_with", [])) if resume is not None else []
    if resume is not None:
        history, epoch = list(resume["history"]), int(resume["epoch"])
        mix_rng.bit_generator.state = resume["mix_rng"]
        elapsed_before = float(resume["elapsed_s"])
        log(f"resuming after epoch {epoch}/{cfg.epochs}")
    # Where each phase starts, in epochs: a resumed run skips the phases it finished.
    starts = np.cumsum([0] + [p.epochs for p in phases])
    restored = resume is None or epoch == 0
    val = None  # the student's last evaluation, while its bits have not changed since
    average: ParameterAverage | None = None  # of the last phase, when cfg.ema_decay asks for one
    for pi, phase in enumerate(phases):
        done_here = max(0, min(epoch - int(starts[pi]), phase.epochs))
        if not restored and done_here < phase.epochs:
            # The state was saved at the bits of the phase its last epoch was in: set those first (they
            # shape every buffer), load it, then step to this phase's bits as the unbroken run did.
            saved = max(j for j, p in enumerate(phases) if p.epochs and starts[j] < epoch)
            set_bits(layers, phases[saved].weight_bits, phases[saved].act_bits)
            student.load_state_dict(resume["student"])
            restored = True
        set_bits(layers, phase.weight_bits, phase.act_bits)
        val = None
        if phase.epochs == 0 or done_here == phase.epochs:
            continue
        opt = make_optimizer(student, cfg)
        base = [g["lr"] for g in opt.param_groups]
        steps_per_epoch = max(1, len(data.train_labels) // cfg.batch_size)
        total = steps_per_epoch * phase.epochs
        freeze_from = int(cfg.freeze_after * total) if phase.weight_bits < 8 else total + 1
        step = done_here * steps_per_epoch
        if resume is not None and done_here:  # mid-phase: its optimizer goes on (a new phase starts afresh)
            opt.load_state_dict(resume["optimizer"])  # `base` was read before: the schedule's peak rates
        if cfg.ema_decay and pi == len(phases) - 1:
            kept = resume.get("average") if resume is not None and done_here else None
            average = ParameterAverage(student, cfg.ema_decay, kept)
        for _ in range(phase.epochs - done_here):
            t0 = time.perf_counter()
            loss_sum, n_seen, frozen = 0.0, 0, 0
            loader = _batches(data, cfg, size, epoch, workers)
            tag = f"W{phase.weight_bits}A{phase.act_bits}"
            bar = _progress(progress, steps_per_epoch, f"{tag} epoch {epoch + 1}")
            student.eval()  # no dropout: the student follows the teacher, it is not regularized
            for x, y in loader:
                for g, lr in zip(opt.param_groups, base, strict=True):
                    g["lr"] = lr * _lr_factor(step, total)
                x = _normalize(x, data, device)
                y = y.to(device)
                lam = float(mix_rng.beta(cfg.mixup, cfg.mixup)) if cfg.mixup > 0 else 1.0
                threshold = cfg.freeze_threshold if step >= freeze_from else None
                loss, frozen = train_step(t_forward, student, layers, opt, cfg, x, y, lam, threshold)
                if average is not None:
                    average.update()
                loss_sum += float(loss.detach()) * len(y)
                n_seen += len(y)
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / n_seen:.4f}", frozen=frozen, refresh=False)
            if bar is not None:
                bar.close()
            del loader
            val = evaluate(student, data, device)
            live_top1 = val["top1"]
            if average is not None:  # the average is what gets exported: its accuracy is the figure
                average.swap()
                val = evaluate(student, data, device)
                average.swap()
            epoch += 1
            record = {
                "epoch": epoch,
                "weight_bits": phase.weight_bits,
                "act_bits": phase.act_bits,
                "loss": loss_sum / max(1, n_seen),
                "val_top1": val["top1"],
                **({"val_top1_last_step": live_top1} if average is not None else {}),
                "frozen_weights": frozen,
                "seconds": round(time.perf_counter() - t0, 1),
                "images_per_second": round(n_seen / max(1e-9, time.perf_counter() - t0), 1),
            }
            history.append(record)
            if epoch < cfg.epochs:  # saved before it is announced: a Ctrl-C after the line keeps it
                save_checkpoint(out / CHECKPOINT, {
                    "format": CHECKPOINT_FORMAT, "model": loaded.spec.name,
                    "weights_sha256": loaded.weights_sha256, "plan": plan.to_dict(), "config": asdict(cfg),
                    "command": command, "epoch": epoch, "history": history, "fp32": fp32,
                    "mix_rng": mix_rng.bit_generator.state, "student": student.state_dict(),
                    "optimizer": opt.state_dict(), "resumed_with": resumed_with,
                    "average": average.state_dict() if average is not None else None,
                    "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                })  # fmt: skip
            averaged = f" (averaged; last step {live_top1:.4f})" if average is not None else ""
            log(
                f"epoch {epoch}/{cfg.epochs} {tag}: loss {record['loss']:.4f} "
                f"val top-1 {val['top1']:.4f}{averaged} (FP32 {fp32['top1']:.4f}), {frozen} weights frozen, "
                f"{record['images_per_second']:.0f} img/s"
            )
    if average is not None:
        average.swap()  # for good: the export below writes the averaged student's integers
    final = val or evaluate(student, data, device)
    summary = {
        "model": loaded.spec.name,
        "plan": plan.name,
        "teacher_sha256": loaded.weights_sha256,
        "fp32_top1": fp32["top1"],
        "qat_top1": final["top1"],
        "delta_pp": round(100 * (final["top1"] - fp32["top1"]), 2),
        "val_images": final["images"],
        "weight_bits": {q.name: q.weight_q.bits for q in layers},
        "act_bits": plan.act_bits,
        "frozen_weights": sum(int(q.weight_q.frozen.sum()) for q in layers if q.weight_q.frozen.numel()),
        "wall_s": round(elapsed_before + time.perf_counter() - t_start, 1),
        "kernels": kernels.name,
    }
    log(
        f"done: {plan.name} fake-quantized top-1 {final['top1']:.4f} vs FP32 {fp32['top1']:.4f} "
        f"({summary['delta_pp']:+.2f} pp) in {summary['wall_s'] / 60:.1f} min"
    )
    if resumed_with:
        summary["resumed_with"] = resumed_with
    result = export(loaded, plan, layers, cfg, data, summary, history, out, command, device)
    (out / CHECKPOINT).unlink(missing_ok=True)  # finished: nothing left to resume
    result.student = student
    return result


def save_checkpoint(path: Path, ckpt: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous epoch's checkpoint whole


def read_checkpoint(path: Path) -> dict:
    """An `rtq qat` checkpoint (its --out folder's last.pt, or the folder itself)."""
    from serving.errors import RtqError

    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise RtqError(
            f"no QAT checkpoint at {path}: `rtq qat` writes {CHECKPOINT} into its --out folder after each "
            "epoch and removes it when the run finishes"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many unrelated types for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RtqError(f"cannot read QAT checkpoint {path}: {first[:160]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RtqError(f"{path} is not an `rtq qat` checkpoint (`rtq train --resume` takes rtq train's)")
    return ckpt


def export(
    loaded: LoadedModel,
    plan: PrecisionPlan,
    layers: list[QuantLayer],
    cfg: QatConfig,
    data: QatData,
    summary: dict,
    history: list[dict],
    out: Path,
    command: str,
    device: str,
) -> QatResult:
    out.mkdir(parents=True, exist_ok=True)
    name = f"{plan.name}qat" if not plan.name.endswith("qat") else plan.name
    integers = out / f"{name}.npz"
    meta = {
        "model": loaded.spec.name,
        "weights_sha256": loaded.weights_sha256,
        "plan": plan.to_dict(),
        "config": asdict(cfg),
        "command": command,
        "data": data.source,
        "summary": summary,
        "device": device,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__},
    }
    sha = save_integers(
        integers, {q.name: q.quantized() for q in layers}, meta, {q.name: q.input_grid() for q in layers}
    )
    kd = "QAT+KD" if cfg.kd else "QAT"
    prog = "progressive " + "->".join(str(b) for b in cfg.progressive) if cfg.progressive else "direct"
    if cfg.phase_epochs:
        prog += f" ({'+'.join(map(str, cfg.phase_epochs))} epochs)"
    if cfg.mixup:
        prog += f", mixup {cfg.mixup:g}"
    if cfg.ema_decay:
        prog += f", weights averaged (EMA {cfg.ema_decay:g})"
    deploy = {
        "name": name,
        "method": "qat",
        "description": (
            f"{loaded.spec.name}: {kd} ({prog}, {cfg.epochs} epochs) of plan {plan.name}, trained at "
            f"A{plan.act_bits}, fake-quantized top-1 {summary['qat_top1']:.4f} vs FP32 "
            f"{summary['fp32_top1']:.4f}; served with 8-bit activations (the integer kernels there are)"
        ),
        "weights": {"bits": plan.weights.bits, "per_channel": True, "symmetric": plan.weights.symmetric},
        "activations": {"bits": 8},
        "components": {k: {"bits": v} for k, v in plan.components.items()},
        "layers": {k: {"bits": v} for k, v in plan.layers.items()},
        "calibration_images": plan.calibration_images,
        "qat_file": integers.name,
        "qat_sha256": sha,
    }
    plan_path = out / f"{name}.yaml"
    plan_path.write_text(yaml.safe_dump(deploy, sort_keys=False))
    log_payload = {"summary": summary, "history": history, "config": asdict(cfg), "command": command}
    tmp = out / ".log.json.tmp"
    tmp.write_text(json.dumps(log_payload, indent=2) + "\n")
    os.replace(tmp, out / "log.json")
    if history:
        from serving.qat.curves import plot_run

        title = f"{loaded.spec.name} {kd} {plan.name} ({prog})"
        plot_run(history, summary["fp32_top1"], title, out / "curves.png")
    return QatResult(plan_path, integers, summary, history)


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False)
