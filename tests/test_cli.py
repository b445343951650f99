"""The `rtq` CLI as users run it: real subprocesses, exit codes, one-line errors, JSON out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RTQ = [sys.executable, "-m", "serving.cli"]


def rtq(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*RTQ, *args], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_help_lists_the_subcommands():
    out = rtq("--help").stdout
    for cmd in ("build", "eval", "variants", "models", "bench"):
        assert cmd in out
    assert "offline" in rtq("bench", "--help").stdout


def test_building_the_cli_imports_no_framework():
    """Every command (the edge server included) builds the whole parser: a framework imported there
    (torch: ~300 MB resident) would weigh on all of them."""
    code = (
        "import sys; from serving.cli import parser; parser(); "
        "print(sorted(m for m in ('torch', 'timm', 'openvino', 'onnxruntime', 'nncf', 'matplotlib', "
        "'locust') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_models_json():
    rows = json.loads(rtq("models", "--json").stdout)
    assert {r["model"] for r in rows} >= {
        "efficientnet_lite0",
        "efficientnetv2_b0",
        "efficientnetv2_s",
        "efficientnet_edgetpu_s",
    }


def test_eval_writes_json_beside_fp32(small_repository: Path, data_root: Path, tmp_path: Path):
    out = tmp_path / "eval.json"
    proc = rtq(
        "eval",
        "efficientnet_lite0-int8-openvino",
        "--repository",
        str(small_repository),
        "--data",
        str(data_root / "imagenet-val"),
        "--limit",
        "40",
        "--json",
        str(out),
        "-q",
    )
    result = json.loads(out.read_text())
    assert result["n"] == 40
    for key in ("top1", "top1_fp32", "agreement_fp32", "top5"):
        assert 0.0 <= result[key] <= 1.0
    assert result["agreement_fp32"] >= 0.9
    lo, hi = result["top1_ci95"]
    assert lo <= result["top1"] <= hi
    assert "agreement with FP32" in proc.stdout


def test_eval_restricts_to_the_models_classes_on_any_folder(
    small_repository: Path, data_root: Path, tmp_path: Path
):
    out = tmp_path / "nette.json"
    rtq(
        "eval",
        "efficientnet_lite0-fp32-onnxruntime",
        "--repository",
        str(small_repository),
        "--data",
        str(data_root / "imagenette" / "val"),
        "--limit",
        "20",
        "--json",
        str(out),
        "-q",
    )
    result = json.loads(out.read_text())
    assert result["n"] == 20 and result["agreement_fp32"] == 1.0


def test_bad_input_is_one_line_and_exit_2(small_repository: Path, tmp_path: Path):
    cases = [
        (["eval", "no-such-variant", "--repository", str(small_repository)], "unknown variant"),
        (["eval", "../etc", "--repository", str(small_repository)], "invalid variant name"),
        (
            [
                "eval",
                "efficientnet_lite0-fp32-onnxruntime",
                "--repository",
                str(small_repository),
                "--data",
                str(tmp_path / "missing"),
            ],
            "not found",
        ),
        (["build", "--spec", str(tmp_path / "missing.yaml")], "does not exist"),
        (["bench", "offline", "--repository", str(tmp_path / "empty")], "holds no variants"),
        (["sensitivity", "efficientnet_lite0", "--asymmetric"], "add --allocate"),
        (["sensitivity", "efficientnet_lite0", "--method", "rtn"], "add --allocate"),
    ]
    for args, message in cases:
        proc = rtq(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("rtq: error:") and message in line, line
    proc = rtq("eval", "x", "--limit", "0", check=False)
    assert proc.returncode == 2 and "positive integer" in proc.stderr
    for bad in ("0", "1.5", "nan"):
        proc = rtq("serve", "--admit-within", bad, check=False)
        assert proc.returncode == 2 and "in (0, 1]" in proc.stderr, proc.stderr
    proc = rtq("serve", "--compute-nice", "20", check=False)
    assert proc.returncode == 2 and "--compute-nice" in proc.stderr, proc.stderr


def test_bench_offline_writes_json_and_markdown_with_verdicts(small_repository: Path, tmp_path: Path):
    rtq(
        "bench",
        "offline",
        "efficientnet_lite0-fp32-openvino",
        "efficientnet_lite0-int8-openvino",
        "--repository",
        str(small_repository),
        "--runs",
        "20",
        "--warmup",
        "2",
        "--batches",
        "1",
        "2",
        "--out",
        str(tmp_path),
        "-q",
    )
    (js,) = tmp_path.glob("offline-*.json")
    result = json.loads(js.read_text())
    assert result["machine"]["cores"] and result["date"] and "bench offline" in result["command"]
    assert [v["latency_ms"]["runs"] for v in result["variants"]] == [20, 20]
    for v in result["variants"]:
        assert v["latency_ms"]["p50"] <= v["latency_ms"]["p99"]
        assert not v["validity"]["valid"] and "< 200" in v["validity"]["reasons"][0]
        assert set(v["throughput_ips"]) == {"1", "2"}
    (s,) = result["speedups"]
    assert s["precision"] == "int8" and s["speedup_p50"] > 0
    assert "INVALID" in js.with_suffix(".md").read_text()


def test_variants_lists_the_repository(small_repository: Path):
    rows = json.loads(rtq("variants", "--repository", str(small_repository), "--json").stdout)
    assert len(rows) == 4
    table = rtq("variants", "--repository", str(small_repository)).stdout
    assert "efficientnet_lite0-int8-openvino" in table and "imagenet-val" in table
