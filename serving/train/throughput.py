"""Measure what one training step and one val batch cost, to size the default schedule.

`python -m serving.train.throughput --sizes 96 128 160 --threads 1`: for each image size, bf16 on and
off, the full step `rtq train` runs (augmentation in-process, normalize, mixup, forward, backward,
AdamW, EMA) on real imagenette images, plus val forward at the eval size. Wall time only means
something on an idle machine; CPU seconds per image also hold on a shared one (with one thread:
two OpenMP threads on an oversubscribed machine mostly wait on each other).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from serving.train.config import TrainConfig
from serving.train.data import (
    Augment,
    AugmentedImages,
    balanced_subset,
    cached_array,
    open_folders,
    train_store_preprocessing,
)
from serving.train.loop import build_model, eval_preprocessing, normalize_batch


def _cpu() -> float:
    return time.process_time()


def measure(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, size: int, steps: int) -> dict:
    from timm.utils import ModelEmaV3

    stage = cfg.schedule()[-1]  # the strongest regularization: the dearest augmentation
    pp = eval_preprocessing(cfg)
    model = build_model(cfg, 10, stage)
    model.train()
    ema = ModelEmaV3(model, decay=cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = AugmentedImages(images, labels, Augment(size, cfg.crop_scale_min, cfg.randaug_ops, 9.0))
    bs = cfg.batch_size
    aug_cpu = step_cpu = wall = 0.0
    for i in range(steps + 1):  # step 0 builds the kernels for this shape: not timed
        t0, c0 = time.perf_counter(), _cpu()
        idx = [(int(j) % len(labels), i * bs + k) for k, j in enumerate(range(i * bs, (i + 1) * bs))]
        batch = [ds[j] for j in idx]
        c1 = _cpu()
        x = normalize_batch(torch.stack([b[0] for b in batch]), pp, cfg.channels_last)
        y = torch.tensor([b[1] for b in batch])
        lam = 0.8
        x = x.mul(lam).add_(x.flip(0), alpha=1 - lam)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model, step=i + 1)
        if i:
            aug_cpu += c1 - c0
            step_cpu += _cpu() - c1
            wall += time.perf_counter() - t0
    n = steps * bs
    return {
        "size": size,
        "bf16": cfg.bf16,
        "images": n,
        "wall_img_s": round(n / wall, 1),
        "cpu_ms_per_img_augment": round(1000 * aug_cpu / n, 2),
        "cpu_ms_per_img_step": round(1000 * step_cpu / n, 2),
    }


@torch.no_grad()
def measure_eval(cfg: TrainConfig, images: np.ndarray, batches: int) -> dict:
    pp = eval_preprocessing(cfg)
    model = build_model(cfg, 10, cfg.schedule()[-1]).eval()
    c = w = 0.0
    n = 0
    for i in range(batches + 1):
        x = normalize_batch(torch.from_numpy(np.array(images[i * 64 : (i + 1) * 64])), pp, cfg.channels_last)
        t0, c0 = time.perf_counter(), _cpu()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            model(x)
        if i:
            c += _cpu() - c0
            w += time.perf_counter() - t0
            n += len(x)
    return {
        "eval_size": cfg.eval_size,
        "bf16": cfg.bf16,
        "wall_img_s": round(n / w, 1),
        "cpu_ms_per_img": round(1000 * c / n, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m serving.train.throughput")
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160])
    p.add_argument("--steps", type=int, default=4, help="timed steps per setting (batch 64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=".cache/train/data")
    p.add_argument("--data-root", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from pathlib import Path

    base = TrainConfig()
    folders = open_folders(base.data, Path(args.data_root) if args.data_root else None)
    train_split = balanced_subset(folders.train, 1000)
    pp = eval_preprocessing(base)
    images = cached_array(train_split, train_store_preprocessing(pp.mean, pp.std), Path(args.cache_dir))
    val = cached_array(balanced_subset(folders.val, 320), pp, Path(args.cache_dir))
    print(json.dumps({"loadavg": os.getloadavg(), "threads": args.threads}))
    for bf16 in (True, False):
        cfg = TrainConfig(bf16=bf16)
        for size in args.sizes:
            print(json.dumps(measure(cfg, images, train_split.labels, size, args.steps)), flush=True)
        print(json.dumps(measure_eval(cfg, val, 4)), flush=True)


if __name__ == "__main__":
    main()
