"""Arguments and entry point of `rtq sensitivity` (kept here so serving/cli.py stays a thin index)."""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.settings import PROJECT_ROOT, default_results_dir


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a compression ratio like 5.5, got {text!r}") from None
    if value <= 1:
        raise argparse.ArgumentTypeError(f"a compression ratio must exceed 1, got {value}")
    return value


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("model", help="zoo model (see `rtq models`)")
    sp.add_argument("--weights", default=None, help="local checkpoint (default: the zoo's)")
    sp.add_argument("--images", type=int, default=256, help="imagenet-calib images (default: 256)")
    sp.add_argument("--bits", type=int, nargs="+", default=[2, 4], help="weight widths (default: 2 4)")
    sp.add_argument(
        "--act-bits",
        type=int,
        nargs="*",
        default=[4, 8],
        help="activation widths (default: 4 8; none to skip)",
    )
    sp.add_argument("--out", default=str(default_results_dir()), help="results folder (default: %(default)s)")
    sp.add_argument(
        "--from",
        dest="from_json",
        default=None,
        metavar="JSON",
        help="reuse a sensitivity result instead of measuring again",
    )
    sp.add_argument(
        "--allocate",
        type=_ratio,
        nargs="+",
        default=[],
        metavar="RATIO",
        help="write a mixed-precision plan per target compression ratio vs FP32 (e.g. 5.5 8)",
    )
    sp.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=[2, 4, 8],
        help="widths the allocation may use (default: 2 4 8)",
    )
    # Choices spelled out: plan.METHODS would import onnx while every rtq command builds its parser.
    sp.add_argument(
        "--method",
        default=None,
        choices=["rtn", "rtn-bc", "adaround", "adaround-oc"],
        help="rounding method of allocated plans (default: adaround)",
    )
    sp.add_argument(
        "--asymmetric",
        action="store_true",
        help="allocated plans give weights below 8 bits a per-channel zero point "
        "(at 2 bits a symmetric grid has one positive level: -2, -1, 0, 1)",
    )
    sp.add_argument(
        "--plan-dir",
        default=str(PROJECT_ROOT / "specs" / "plans"),
        help="where allocated plans go (default: %(default)s)",
    )
    sp.add_argument("--list-layers", action="store_true", help="print the quantizable layers and exit")


def main(args: argparse.Namespace, command: str) -> int:
    from serving.errors import RtqError
    from serving.quantize.lowbit import ACT_BITS, WEIGHT_BITS
    from serving.quantize.sensitivity_report import allocate_plans, load_results, run_sensitivity

    bad = [b for b in args.bits if b not in WEIGHT_BITS] + [b for b in args.act_bits if b not in ACT_BITS]
    if bad:
        raise RtqError(
            f"unsupported widths {bad}; weights take {list(WEIGHT_BITS)}, activations {list(ACT_BITS)}"
        )
    if args.images < 16:
        raise RtqError(f"sensitivity needs at least 16 images, got {args.images}")
    if (args.method is not None or args.asymmetric) and not args.allocate:
        raise RtqError("--method and --asymmetric shape allocated plans: add --allocate RATIO")
    if args.list_layers:
        import tempfile

        import onnx

        from serving.quantize.graph import layers_of
        from serving.quantize.sensitivity_report import fp32_export

        with tempfile.TemporaryDirectory() as tmp:
            path, _ = fp32_export(args.model, args.weights, Path(tmp))
            for layer in layers_of(onnx.load(str(path))):
                print(f"{layer.name}\t{layer.component}\t{layer.params}")
        return 0
    if args.from_json:
        payload, results = load_results(Path(args.from_json))
        if payload.get("model") != args.model:
            raise RtqError(f"{args.from_json} measured {payload.get('model')}, not {args.model}")
    else:
        payload = run_sensitivity(
            args.model, args.weights, Path(args.out), args.images, tuple(args.bits), tuple(args.act_bits),
            command, args.data_root, progress=not args.quiet,
        )  # fmt: skip
        from serving.quantize.sensitivity import Sensitivity

        results = [Sensitivity(**r) for r in payload["layers"]]
        for h in payload["hypotheses"]:
            print(f"{h['verdict']:>14}: {h['hypothesis']}")
    if args.allocate:
        widths = tuple(args.widths)
        allocate_plans(
            args.model,
            args.weights,
            results,
            args.allocate,
            widths,
            Path(args.plan_dir),
            method=args.method or "adaround",
            symmetric=not args.asymmetric,
        )
    return 0
