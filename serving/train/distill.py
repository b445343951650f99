"""Knowledge distillation from an ImageNet-1k classifier of the zoo into a model trained on a subset
of its classes (imagenette's class folders are ImageNet wnids, so the teacher's logits for those
classes are the teacher's answer over them).

The teacher sees the student's own augmented and mixed batch: consistent views are what make
distillation work on small data (Beyer et al. 2022, "a good teacher is patient and consistent");
labels precomputed on the whole image disagree with a random crop of a quarter of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from serving.errors import RtqError

# Any batch and image size: the student's size changes with every progressive-learning stage.
TEACHER_BATCH_SHAPE = [-1, 3, -1, -1]


@dataclass(frozen=True)
class Teacher:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]  # teacher-normalized N x 3 x H x W -> all logits
    class_index: torch.Tensor  # data class i -> the teacher's logit index
    mean: torch.Tensor  # 1 x 3 x 1 x 1, the teacher's own normalization (pixel scale)
    std: torch.Tensor
    size: int  # input side; 0 runs the teacher at the student's size
    runtime: str
    graph: Any = None  # the OpenVINO model (CPU only): what int8 quantization starts from
    precision: str = "f32"


def load_teacher(
    name: str,
    classes: Sequence[str],
    size: int = 0,
    device: str = "cpu",
    threads: int = 2,
    precision: str = "f32",
) -> Teacher:
    """The zoo model `name` with its trained weights, frozen, reading the data's classes. `precision`
    is only checked here (int8 needs the CPU's OpenVINO path); `quantize_teacher` quantizes."""
    from serving.models.zoo import class_wnids, create_model, get_spec

    if precision == "int8" and device != "cpu":
        raise _int8_needs_openvino(name, device)

    spec = get_spec(name)
    if spec.classes != "imagenet-1k":
        raise RtqError(
            f"teacher {name!r} predicts {spec.classes} classes; a teacher must be an ImageNet-1k "
            "classifier, whose classes include the data's"
        )
    wnids = class_wnids(spec.classes)
    missing = [c for c in classes if c not in wnids]
    if missing:
        raise RtqError(
            f"{len(missing)} class folders are not ImageNet wnids (e.g. {missing[0]!r}), so the teacher "
            f"{name!r} has no logit for them; distill only on data named by ImageNet wnids"
        )
    loaded = create_model(name)  # raises with the way to get the weights if they are not here
    if not loaded.trained:
        raise RtqError(f"teacher {name!r} has no trained weights in the zoo; pick a model that has")
    module = loaded.module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    graph = None
    if device == "cpu":
        graph = openvino_graph(module)
        forward, runtime = openvino_forward(graph, threads), "openvino"
    else:
        forward, runtime = _torch_forward(module.to(device)), "torch"
    pp = spec.preprocessing
    return Teacher(
        name=name,
        forward=forward,
        class_index=torch.tensor([wnids.index(c) for c in classes], device=device),
        mean=torch.tensor(pp.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
        std=torch.tensor(pp.std, dtype=torch.float32, device=device).view(1, 3, 1, 1),
        size=size,
        runtime=runtime,
        graph=graph,
    )


def openvino_graph(module: nn.Module) -> Any:
    # On the CPU the teacher runs on OpenVINO: 2-2.5x faster than eager PyTorch for Lite0 here (2.1 vs
    # 5.1 ms per image at 112 px, batch 64, 2 threads; PyTorch's emulated bf16 was 16x slower still).
    import openvino as ov

    return ov.convert_model(module, example_input=torch.zeros(1, 3, 64, 64), input=TEACHER_BATCH_SHAPE)


def openvino_forward(graph: Any, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import openvino as ov

    from serving.runtimes.signal_stack import keep_signal_stack

    # f32 keeps the teacher's logits those of the PyTorch model (bf16 was no faster without AMX).
    with keep_signal_stack():  # the CPU plugin is created here: see serving/runtimes/signal_stack.py
        compiled = ov.Core().compile_model(
            graph, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
        )
    request = compiled.create_infer_request()

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(np.array(out))

    return forward


def _torch_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    module = module.to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return module(x.contiguous(memory_format=torch.channels_last)).float()

    return forward


def quantize_teacher(
    teacher: Teacher, images: np.ndarray, threads: int = 2, batch: int = 64
) -> tuple[Teacher, float]:
    """The teacher with INT8 weights and activations (NNCF, calibrated on `images`: N x 3 x H x W uint8
    train images, whole frames), and the share of those images whose top-1 over the data's classes
    it keeps. Calibrated on the run's own data, not ImageNet: these are the inputs it will see."""
    if teacher.graph is None:
        raise _int8_needs_openvino(teacher.name, teacher.runtime)
    from serving.quantize.int8_openvino import quantize_int8

    x = _teacher_input(teacher, torch.from_numpy(images).float())
    quantized = quantize_int8(teacher.graph, x.numpy())
    int8 = replace(teacher, forward=openvino_forward(quantized, threads), precision="int8")
    classes = teacher.class_index.cpu()
    kept = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch].contiguous()
            kept += int(
                (teacher.forward(xb)[:, classes].argmax(1) == int8.forward(xb)[:, classes].argmax(1)).sum()
            )
    return int8, kept / max(1, len(x))


def _int8_needs_openvino(name: str, where: str) -> RtqError:
    return RtqError(
        f"an int8 teacher runs on OpenVINO on the CPU; {name} would run on {where} here "
        "(use --teacher-precision f32)"
    )


@torch.no_grad()
def teacher_logits(
    teacher: Teacher, x: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """The teacher's logits over the data's classes for the student's normalized batch `x`."""
    s_mean = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s_std = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    # Normalization is affine, so this is exact for mixed batches too.
    return teacher.forward(_teacher_input(teacher, x.float() * s_std + s_mean))[:, teacher.class_index]


def _teacher_input(teacher: Teacher, pixels: torch.Tensor) -> torch.Tensor:
    """0-255 pixels, N x 3 x H x W, normalized the teacher's way and resized to its input side."""
    xt = (pixels - teacher.mean.to(pixels.device)) / teacher.std.to(pixels.device)
    if teacher.size and teacher.size != xt.shape[-1]:
        # Upsampling adds no detail, but Lite0 reads objects at the scale it was trained on: the
        # 80 px view upsampled to 160 is right on 87% of imagenette val, at 80 px on 73%.
        xt = F.interpolate(xt, size=(teacher.size, teacher.size), mode="bilinear", antialias=True)
    return xt.contiguous()


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T^2 so its gradients keep their scale as T
    changes (Hinton et al. 2015)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
