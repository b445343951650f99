"""`rtq`: one CLI for the whole flow (build, eval, bench, ...). Errors are one line, exit code 2."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from serving.errors import RtqError
from serving.settings import DATA_ROOT_ENV, default_repository, default_results_dir


def _command_line() -> str:
    return "rtq " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _console():
    from rich.console import Console

    # Wide enough for the variant table when piped to a file or CI log.
    return Console(width=None if sys.stdout.isatty() else 200)


def _write_json(path: str | None, payload: object) -> None:
    if path is None:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")


def cmd_models(args: argparse.Namespace) -> int:
    from rich.table import Table

    from serving.models.zoo import ZOO

    rows = [
        {
            "model": s.name,
            "timm": s.timm_name,
            "classes": s.classes,
            "input": s.preprocessing.resolution,
            "weights": s.weights.distribution if s.weights else "user-given file",
            "description": s.description,
        }
        for s in ZOO.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="model zoo", title_justify="left")
    for col in rows[0]:
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    _console().print(table)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from serving.repository.build import build
    from serving.repository.spec import load_spec
    from serving.repository.table import variant_table

    spec = load_spec(args.spec)
    if args.eval_images is not None:
        from dataclasses import replace

        spec = replace(spec, eval_images=args.eval_images)
    console = _console()
    log = (lambda msg: None) if args.quiet else (lambda msg: console.print(f"[dim]{msg}[/dim]"))
    manifests = build(
        spec,
        Path(args.repository),
        _command_line(),
        args.data_root,
        progress=not args.quiet,
        log=log,
    )
    _write_json(args.json, manifests)
    console.print(variant_table(manifests, f"built {len(manifests)} variants into {args.repository}"))
    if not any(m["top1"] for m in manifests):
        console.print(
            f"No accuracy columns: point --data-root or {DATA_ROOT_ENV} at a folder holding "
            "imagenet-val/ (labels.csv) and imagenet-calib/."
        )
    return 0


def cmd_variants(args: argparse.Namespace) -> int:
    from serving.repository.layout import list_variants, read_manifest
    from serving.repository.table import variant_table

    repo = Path(args.repository)
    manifests = [read_manifest(repo / n) for n in list_variants(repo)]
    if args.report and manifests:
        from serving.repository.report import write_variants_report

        write_variants_report(manifests, Path(args.report), _command_line())
    if args.json:
        print(json.dumps(manifests, indent=2))
    elif not manifests:
        print(f"{repo} holds no variants; run `rtq build`")
    else:
        _console().print(variant_table(manifests, str(repo)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from serving.bench.evaluate import evaluate_variant

    result = evaluate_variant(
        Path(args.repository),
        args.variant,
        args.data,
        args.data_root,
        args.limit,
        args.threads,
        progress=not args.quiet,
    )
    _write_json(args.json, result)
    a = result
    lo, hi = a["top1_ci95"]
    print(
        f"{a['variant']} on {a['eval_set']} ({a['n']} images): top-1 {100 * a['top1']:.2f}% "
        f"[95% CI {100 * lo:.1f}-{100 * hi:.1f}], top-5 {100 * a['top5']:.2f}%, FP32 top-1 "
        f"{100 * a['top1_fp32']:.2f}%, agreement with FP32 {100 * a['agreement_fp32']:.2f}%"
        + ("" if a["trained"] else "  (untrained model)")
    )
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from serving.quantize.cli import main as sensitivity_main

    return sensitivity_main(args, _command_line())


def cmd_bench_lowbit(args: argparse.Namespace) -> int:
    from serving.bench.lowbit import main as lowbit_main

    return lowbit_main(args, _command_line())


def cmd_bench_qat_step(args: argparse.Namespace) -> int:
    from serving.bench.qat_step import main as qat_step_main

    return qat_step_main(args, _command_line())


def cmd_bench_int8_kernels(args: argparse.Namespace) -> int:
    from serving.bench.int8_kernels import main as int8_kernels_main

    return int8_kernels_main(args, _command_line())


def cmd_bench_qat(args: argparse.Namespace) -> int:
    from serving.qat.ablation import main as qat_ablation_main

    return qat_ablation_main(args, _command_line())


def cmd_bench_offline(args: argparse.Namespace) -> int:
    from serving.bench.offline import run_offline

    run_offline(
        Path(args.repository),
        args.variants,
        Path(args.out),
        runs=args.runs,
        warmup=args.warmup,
        batches=tuple(args.batches),
        threads=args.threads,
        command=_command_line(),
        progress=not args.quiet,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.edge.cli import serve_main

    return serve_main(args)


def cmd_triton(args: argparse.Namespace) -> int:
    from serving.triton.cli import triton_main

    return triton_main(args)


def cmd_bench_serving(args: argparse.Namespace) -> int:
    from serving.bench.serving_bench import bench_main

    return bench_main(args, _command_line())


def cmd_bench_realtime(args: argparse.Namespace) -> int:
    from serving.bench.realtime import main as realtime_main

    return realtime_main(args, _command_line())


def cmd_bench_reliability(args: argparse.Namespace) -> int:
    from serving.bench.reliability import main as reliability_main

    return reliability_main(args, _command_line())


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= low, with `what` naming it in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_nonnegative = _int_at_least(0, "an integer 0 or more")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rtq",
        description="Build, evaluate, serve and benchmark quantized EfficientNet variants.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, data: bool = True) -> None:
        sp.add_argument(
            "--repository",
            default=str(default_repository()),
            help="model repository folder (default: %(default)s)",
        )
        if data:
            sp.add_argument(
                "--data-root",
                type=Path,
                default=None,
                help=f"folder holding imagenet-val/, imagenet-calib/, imagenette/ "
                f"(default: ${DATA_ROOT_ENV} or ../shared/data)",
            )
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    sp = sub.add_parser("models", help="list the model zoo")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=cmd_models)

    sp = sub.add_parser("build", help="build the variants of a spec into the model repository")
    sp.add_argument("--spec", default=None, help="build spec YAML (default: specs/default.yaml)")
    sp.add_argument(
        "--eval-images",
        type=_positive,
        default=None,
        help="evaluate on the first N images only (default: the spec's, else all)",
    )
    sp.add_argument("--json", default=None, metavar="OUT", help="also write the manifests here")
    common(sp)
    sp.set_defaults(func=cmd_build)

    sp = sub.add_parser("variants", help="list the repository's variants with their measured facts")
    sp.add_argument("--json", action="store_true", help="print the manifests as JSON")
    sp.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="also write the table as JSON + Markdown into DIR (e.g. benchmarks/results)",
    )
    common(sp, data=False)
    sp.set_defaults(func=cmd_variants)

    sp = sub.add_parser("eval", help="top-1/top-5 of a variant on a labelled folder, beside FP32")
    sp.add_argument("variant", help="variant name in the repository (see `rtq variants`)")
    sp.add_argument(
        "--data",
        default="imagenet-val",
        help="labelled folder (labels.csv, LOC_val_solution.csv or wnid folders), "
        "a path or a name under the data root (default: %(default)s)",
    )
    sp.add_argument("--limit", type=_positive, default=None, help="first N images only")
    sp.add_argument("--threads", type=_positive, default=2, help="runtime threads (default: 2)")
    sp.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON")
    common(sp)
    sp.set_defaults(func=cmd_eval)

    from serving.quantize.cli import add_arguments as sensitivity_args

    sp = sub.add_parser("sensitivity", help="each layer alone at low bits vs FP32; mixed-precision plans")
    sensitivity_args(sp)
    common(sp)
    sp.set_defaults(func=cmd_sensitivity)

    bench = sub.add_parser("bench", help="benchmarks; results go to benchmarks/results/")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    sp = bsub.add_parser("offline", help="raw runtime latency (batch 1) and best-batch throughput")
    sp.add_argument("variants", nargs="*", help="variant names (default: every variant)")
    sp.add_argument("--runs", type=_positive, default=300, help="timed batch-1 runs (default: 300)")
    sp.add_argument("--warmup", type=_positive, default=30, help="untimed runs first (default: 30)")
    sp.add_argument(
        "--batches",
        type=_positive,
        nargs="+",
        default=[1, 4, 8, 16, 32],
        help="batch sizes for the throughput sweep (default: 1 4 8 16 32)",
    )
    sp.add_argument("--threads", type=_positive, default=2, help="runtime threads (default: 2)")
    sp.add_argument("--out", default=str(default_results_dir()), help="results folder (default: %(default)s)")
    common(sp, data=False)
    sp.set_defaults(func=cmd_bench_offline)

    from serving.bench.lowbit import add_arguments as lowbit_args

    sp = bsub.add_parser("lowbit", help="precision plans built and evaluated side by side; Pareto plot")
    lowbit_args(sp)
    common(sp)
    sp.set_defaults(func=cmd_bench_lowbit)

    from serving.bench.int8_kernels import add_arguments as int8_kernels_args

    sp = bsub.add_parser(
        "int8-kernels", help="ORT's u8s8 vs u8u8 INT8 kernels per variant: top-1, latency, throughput"
    )
    int8_kernels_args(sp)
    common(sp)
    sp.set_defaults(func=cmd_bench_int8_kernels)

    from serving.bench.serving_bench import add_arguments as bench_serving_args
    from serving.edge.cli import add_arguments as serve_args
    from serving.train.cli import add_arguments as train_args
    from serving.triton.cli import add_arguments as triton_args

    # train's own parser carries --data-root and --quiet (no common()).
    train_args(sub.add_parser("train", help="train EfficientNetV2-B0 on imagenette (progressive learning)"))

    from serving.qat.cli import add_arguments as qat_args

    qat_args(sub.add_parser("qat", help="quantization-aware training with distillation; writes a build plan"))

    from serving.qat.ablation import add_arguments as qat_ablation_args

    sp = bsub.add_parser("qat", help="PTQ vs QAT vs QAT+KD (+ progressive) per precision; table + JSON")
    qat_ablation_args(sp)
    sp.set_defaults(func=cmd_bench_qat)

    from serving.bench.qat_step import add_arguments as qat_step_args

    sp = bsub.add_parser(
        "qat-step", help="one rtq qat step: compiled vs eager fake quantizers, OpenVINO vs PyTorch teacher"
    )
    qat_step_args(sp)
    sp.set_defaults(func=cmd_bench_qat_step)

    sp = sub.add_parser("serve", help="edge gRPC server (KServe v2, Triton protocol) + Prometheus metrics")
    serve_args(sp)
    common(sp, data=False)
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("triton", help="run the real tritonserver (nvidia-pytriton) on the repository")
    triton_args(sp)
    common(sp, data=False)
    sp.set_defaults(func=cmd_triton)

    sp = bsub.add_parser("serving", help="edge server vs Triton vs raw runtime: latency, throughput, memory")
    bench_serving_args(sp)
    common(sp)
    sp.set_defaults(func=cmd_bench_serving)

    from serving.bench.realtime import add_arguments as realtime_args

    sp = bsub.add_parser("realtime", help="real-time scenarios + Locust on both servers; HTML report")
    realtime_args(sp)
    common(sp)
    sp.set_defaults(func=cmd_bench_realtime)

    from serving.bench.reliability import add_arguments as reliability_args

    sp = bsub.add_parser(
        "reliability",
        help="fuzzing, 2x overload, SIGTERM under load, soak against real servers; exit 1 if a check fails",
    )
    reliability_args(sp)
    common(sp, data=False)
    sp.set_defaults(func=cmd_bench_reliability)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except RtqError as exc:
        print(f"rtq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rtq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
