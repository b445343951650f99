"""`rtq qat`: BN folding, LSQ quantizers, oscillation freezing, and the integers reaching the packed file."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from serving.errors import RtqError
from serving.models.zoo import LoadedModel, get_spec
from serving.qat.config import QatConfig, preset_plan
from serving.qat.fake_quant import EAGER, ActFakeQuant, WeightFakeQuant, compiled_kernels
from serving.qat.fold import fold_batchnorm
from serving.qat.integers import load_qat_layers
from serving.qat.loop import QatData, run_qat
from serving.qat.prepare import calibrate, prepare, progressive_phases, set_bits
from serving.quantize.plan import load_plan, parse_plan
from serving.quantize.ptq import fake_quantized, logits

RES = 64


def _teacher(seed: int = 0) -> LoadedModel:
    """EfficientNetV2-B0 (10 classes) with non-trivial batch-norm statistics, served at 64 px."""
    import timm

    torch.manual_seed(seed)
    m = timm.create_model("tf_efficientnetv2_b0", num_classes=10)
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    m.eval()
    spec = get_spec("efficientnetv2_b0_imagenette")
    spec = replace(spec, preprocessing=replace(spec.preprocessing, resolution=RES))
    return LoadedModel(spec, m, True, "test teacher", None)


def _data(n_train: int = 48, n_val: int = 20) -> QatData:
    rng = np.random.default_rng(0)
    return QatData(
        train_images=rng.integers(0, 256, (n_train, 3, 80, 80), dtype=np.uint8),
        train_labels=np.arange(n_train) % 10,
        val_images=rng.integers(0, 256, (n_val, 3, RES, RES), dtype=np.uint8),
        val_labels=np.arange(n_val) % 10,
        pp=_teacher().spec.preprocessing,
        source="synthetic",
    )


def test_fold_batchnorm_keeps_the_function_and_leaves_no_batch_norm():
    loaded = _teacher()
    x = torch.randn(2, 3, RES, RES)
    ref = loaded.module(x)
    import copy

    student = copy.deepcopy(loaded.module)
    folded = fold_batchnorm(student, x[:1])
    assert len(folded) > 40 and "conv_stem" in folded
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in student.modules())
    torch.testing.assert_close(student(x), ref, rtol=1e-4, atol=1e-4)


def test_weight_quantizer_grid_gradients_and_freezing():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    q = WeightFakeQuant(4)
    q.reset(w, 4)
    out = q(w)
    ints = out.detach() / q.step().detach().view(-1, 1, 1, 1)
    assert torch.allclose(ints, ints.round(), atol=1e-4) and ints.min() >= -8 and ints.max() <= 7
    out.sum().backward()
    assert w.grad is not None and q.log_step.grad is not None and q.log_step.grad.abs().sum() > 0
    # A weight pushed back and forth across a rounding boundary oscillates and gets pinned.
    with torch.no_grad():
        s = float(q.step()[0])
        w[0, 0, 0, 0] = 0.45 * s
    frozen = 0
    for i in range(200):
        with torch.no_grad():
            w[0, 0, 0, 0] = (0.45 if i % 2 else 0.55) * s
        frozen = q.track(w, momentum=0.9, threshold=0.3)
    assert q.frozen[0, 0, 0, 0] and frozen >= 1
    with torch.no_grad():
        w[0, 0, 0, 0] = 3.0 * s  # far away: the pinned integer still wins
        assert float(q(w)[0, 0, 0, 0]) / s == pytest.approx(float(q.frozen_int[0, 0, 0, 0]), abs=1e-4)
        assert int(q.integers(w)[0, 0, 0, 0]) == int(q.frozen_int[0, 0, 0, 0])
    assert not q.frozen.view(-1)[1:].any()


def test_asymmetric_weight_grid_learns_integer_zero_points():
    """2-bit weights with a zero point per channel: integers 0..3, (q - z) * s, z an integer that
    learns where the grid clips; a channel of mostly positive weights gets two positive levels."""
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)
    w[:3] = w[:3].abs()  # skewed channels: a symmetric 2-bit grid (-2..1) has one positive level
    w.requires_grad_(True)
    sym, asym = WeightFakeQuant(6), WeightFakeQuant(6)
    sym.reset(w, 2)
    asym.reset(w, 2, symmetric=False)
    assert asym.qmin == 0 and asym.qmax == 3 and sym.qmin == -2 and sym.qmax == 1
    z = asym.zero_points().detach()
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 3
    assert (z[:3] <= 1).all()  # more levels above zero than below for the positive channels
    ints = asym.integers(w)
    assert ints.min() >= 0 and ints.max() <= 3
    out = asym(w)
    s = asym.step().detach().view(-1, 1, 1, 1)
    torch.testing.assert_close(out.detach(), (ints - z.view(-1, 1, 1, 1)) * s)
    err = {n: float(((q(w) - w) ** 2)[:3].sum().detach()) for n, q in (("sym", sym), ("asym", asym))}
    assert err["asym"] < 0.8 * err["sym"], err
    out.pow(2).sum().backward()  # some weights clip, so the zero point gets a gradient
    assert asym.zero_point.grad is not None and asym.zero_point.grad.abs().sum() > 0
    assert sym.zero_points().abs().sum() == 0
    qw = asym.spec
    assert not qw.symmetric and qw.bits == 2


def test_activation_quantizer_uses_observed_range_and_keeps_it_when_bits_drop():
    a = ActFakeQuant()
    a.observing = True
    a(torch.linspace(-0.2, 3.0, 1000))
    a.observing = False
    a.set_bits(8)
    y = a(torch.linspace(-0.2, 3.0, 1000))
    assert len(torch.unique(y)) <= 256 and float((y - torch.linspace(-0.2, 3.0, 1000)).abs().max()) < 0.01
    a.set_bits(4)
    y4 = a(torch.linspace(-0.2, 3.0, 1000))
    assert len(torch.unique(y4)) <= 16 and float(y4.max()) == pytest.approx(3.0, abs=0.25)


def _compiled():
    import shutil

    if not any(shutil.which(c) for c in ("g++", "c++", "cc")):
        pytest.skip("no C++ compiler: torch.compile cannot build CPU kernels here")
    notes: list[str] = []
    kernels = compiled_kernels(log=notes.append)
    assert kernels.name == "compiled", notes  # a compiler is here, so the fused kernels must work
    return kernels


def test_compiled_fake_quantizers_compute_the_eager_values_and_gradients():
    """Weights (symmetric and asymmetric, some pinned; conv, depthwise and linear shapes) and
    activations: the fused kernels give the eager values exactly and the same gradients."""
    kernels = _compiled()
    torch.manual_seed(0)
    for shape, bits, symmetric in (((16, 8, 3, 3), 2, False), ((24, 1, 3, 3), 4, True), ((10, 32), 4, True)):
        results = []
        for k in (EAGER, kernels):
            w = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.2).requires_grad_(True)
            wq, aq = WeightFakeQuant(shape[0]), ActFakeQuant()
            wq.reset(w, bits, symmetric)
            wq.frozen.view(-1)[::7] = True
            wq.frozen_int.view(-1)[::7] = 1.0
            aq.observing = True
            x = torch.nn.functional.silu(
                torch.randn(4, 16, 9, 9, generator=torch.Generator().manual_seed(2)) * 2
            )
            aq(x)
            aq.observing = False
            aq.set_bits(4)
            wq.kernels = aq.kernels = k
            x.requires_grad_(True)
            out_w, out_a = wq(w), aq(x)
            (
                out_w.square().sum() + (out_a * torch.linspace(-1, 1, out_a.numel()).view_as(out_a)).sum()
            ).backward()
            grads = [t.grad for t in (w, wq.log_step, wq.zero_point, x, aq.log_step, aq.offset)]
            results.append((out_w.detach(), out_a.detach(), grads))
        (ew, ea, eg), (cw, ca, cg) = results
        assert torch.equal(cw, ew) and torch.equal(ca, ea), shape
        assert (
            eg[2] is None if symmetric else eg[2] is not None
        )  # a zero point learns on asymmetric grids only
        for want, got in zip(eg, cg, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_compiled_fake_quantizers_stay_compiled_for_every_input_a_model_gives_them():
    """Training and evaluation, 4-D maps from 1x1 (squeeze-excitation) to image-sized, the classifier's
    2-D input, the image (no gradient), a short last batch: each kernel needs more graphs than
    dynamo's default limit of 8, and past the limit dynamo runs the rest eager without an error."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # earlier tests' graphs would hide how many this one needs
    kernels = _compiled()
    before = dict(counters["frames"])
    shapes = [(8, 16, 12, 12), (8, 3, 40, 40), (8, 32, 1, 1), (8, 64)]
    shapes += [(3, 16, 12, 12), (1, 32, 1, 1), (3, 64)]  # a short last batch
    w_shapes = [(16, 8, 3, 3), (24, 1, 3, 3), (32, 16, 1, 1), (10, 64), (16, 16, 3, 3)]
    for training in (True, False):
        with torch.set_grad_enabled(training):
            for i, shape in enumerate(shapes):
                x = torch.randn(shape).requires_grad_(training and i != 1)  # the image has no gradient
                s, beta = (torch.tensor(v).requires_grad_(training) for v in (0.1, -0.2))
                kernels.act(x, s, beta, 15)
            for shape in w_shapes:
                w = torch.randn(shape).requires_grad_(training)
                c = shape[0]
                s = torch.full((c, 1), 0.05).requires_grad_(training)
                z = torch.zeros(c, 1).requires_grad_(training)
                mask = torch.zeros(c, w[0].numel(), dtype=torch.bool)
                kernels.weight(w.reshape(c, -1), s, z, mask, mask.float(), -8, 7)
    frames = {k: v - before.get(k, 0) for k, v in counters["frames"].items()}
    assert frames["ok"] == frames["total"], frames  # a frame past the limit counts in total, not in ok


def test_fake_quantizers_fall_back_to_eager_when_compiling_fails_or_differs(monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return call

    notes: list[str] = []
    monkeypatch.setattr(torch, "compile", broken)
    assert compiled_kernels(log=notes.append) is EAGER
    assert "torch.compile failed: InvalidCxxCompiler" in notes[-1] and "--no-compile" in notes[-1]

    def off_by_a_step(fn, **kwargs):  # a compiler that rounds differently must not train other integers
        return lambda *args: fn(*args) + 1e-3

    monkeypatch.setattr(torch, "compile", off_by_a_step)
    assert compiled_kernels(log=notes.append) is EAGER
    assert "differs from eager" in notes[-1]


def test_rtq_bench_qat_step_times_both_kernels(tmp_path: Path, monkeypatch, capsys):
    import json

    import serving.models.zoo as zoo
    from serving.bench import qat_step

    _compiled()
    monkeypatch.setattr(zoo, "create_model", lambda name, weights=None: _teacher())
    parser = argparse.ArgumentParser()
    qat_step.add_arguments(parser)
    args = parser.parse_args(
        ["--plans", "w2a4", "--image-size", "32", "--batch-size", "4", "--steps", "1", "--warmup", "1",
         "--rounds", "2", "--out", str(tmp_path), "-q"]
    )  # fmt: skip
    assert qat_step.main(args, "pytest") == 0
    (result,) = tmp_path.glob("qat-step-*.json")
    payload = json.loads(result.read_text())
    (row,) = payload["rows"]
    assert row["plan"] == "w2a4" and payload["image_size"] == 32 and payload["batch_size"] == 4
    assert payload["setups"] == ["compiled", "eager", "eager-torch-teacher"]
    samples = row["samples_ms_per_image"]
    assert set(samples) == set(payload["setups"]) and all(len(v) == 2 for v in samples.values())  # 2 rounds
    ms = row["ms_per_image"]
    assert row["speedup"]["kernels"] == pytest.approx(ms["eager"] / ms["compiled"], rel=1e-2)
    assert row["speedup"]["total"] == pytest.approx(ms["eager-torch-teacher"] / ms["compiled"], rel=1e-2)
    assert "| w2a4 |" in capsys.readouterr().out

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda *a: fn(*a) + 1.0)
    with pytest.raises(RtqError, match="nothing to compare: fake quantizers run eager"):
        qat_step.main(args, "pytest")


def test_progressive_phases_step_down_to_the_plan():
    w2a4 = preset_plan("w2a4")
    phases = progressive_phases(w2a4, (8, 4, 2), 7)
    assert [(p.weight_bits, p.act_bits) for p in phases] == [(8, 8), (4, 4), (2, 4)]
    assert [p.epochs for p in phases] == [2, 2, 3]  # the shipped phase gets the remainder
    assert [p.weight_bits for p in progressive_phases(preset_plan("w4a8"), (8, 4, 2), 2)] == [8, 4]
    assert [p.weight_bits for p in progressive_phases(w2a4, (), 3)] == [2]
    with pytest.raises(RtqError, match="cannot cover"):
        progressive_phases(w2a4, (8, 4, 2), 2)
    # An uneven split puts the epochs at the bits that ship.
    split = progressive_phases(w2a4, (4, 2), 6, (1, 5))
    assert [(p.weight_bits, p.epochs) for p in split] == [(4, 1), (2, 5)]
    for bad in ((1, 4), (6,), (0, 6)):
        with pytest.raises(RtqError, match="--phase-epochs"):
            progressive_phases(w2a4, (4, 2), 6, bad)
    with pytest.raises(RtqError, match="sum to --epochs"):
        QatConfig(epochs=4, phase_epochs=(1, 5))


def test_plan_bits_reach_the_layers_and_first_last_stay_8bit():
    loaded = _teacher()
    x = torch.randn(4, 3, RES, RES)
    fold_batchnorm(loaded.module, x[:1])
    layers = prepare(loaded.module, preset_plan("w2a4"))
    calibrate(loaded.module, layers, [x])
    set_bits(layers, 2, 4)
    bits = {q.name: (q.weight_q.bits, q.input_q.bits) for q in layers}
    assert bits["conv_stem"] == (8, 8)  # the image itself is the stem's input
    assert bits["classifier"] == (8, 4)
    assert bits["blocks.5.0.conv_pwl"] == (2, 4)
    with pytest.raises(RtqError, match="unknown layers"):
        prepare(_teacher().module, parse_plan({"name": "bad", "layers": {"nope.conv": 4}}))
    with pytest.raises(RtqError, match="per-channel weights"):  # what packing stores
        prepare(_teacher().module, parse_plan({"name": "pt", "weights": {"bits": 4, "per_channel": False}}))


@pytest.mark.parametrize("asymmetric", [False, True], ids=["symmetric", "asymmetric"])
def test_qat_integers_are_what_the_build_serves(tmp_path: Path, asymmetric: bool):
    """Train one tiny epoch, then the FP32 graph with the exported integers computes the student."""
    from serving.export.onnx_export import export_onnx
    from serving.qat.cli import resolve_plan

    loaded = _teacher()
    fp32 = export_onnx(loaded, tmp_path / "fp32.onnx")
    cfg = QatConfig(epochs=1, progressive=(), batch_size=16, calibration_images=16, image_size=RES)
    trained = resolve_plan("w4a8", asymmetric=asymmetric)
    assert trained.name == ("w4a8asym" if asymmetric else "w4a8")
    result = run_qat(loaded, trained, _data(), cfg, tmp_path / "qat", log=lambda m: None)
    assert result.summary["weight_bits"]["blocks.1.0.conv_exp"] == 4
    assert result.summary["weight_bits"]["conv_stem"] == 8
    plan = load_plan(result.plan_path)
    assert plan.method == "qat" and Path(plan.qat_file) == result.integers_path and plan.act_bits == 8
    assert plan.weights.symmetric is not asymmetric
    model = onnx.load(str(fp32))
    qlayers = load_qat_layers(model, plan)
    assert {ql.weight.spec.bits for ql in qlayers} == {4, 8}
    by_bits = {ql.weight.spec.bits: ql.weight for ql in qlayers}
    assert by_bits[8].spec.symmetric and by_bits[4].spec.symmetric is not asymmetric
    if asymmetric:
        assert by_bits[4].zero_point.min() >= 0 and by_bits[4].zero_point.max() <= 15
        assert len(np.unique(by_bits[4].zero_point)) > 1  # learned per channel, not one shared value
        other = load_plan(result.plan_path)
        from dataclasses import replace as dc_replace

        other = dc_replace(other, weights=dc_replace(other.weights, symmetric=True))
        with pytest.raises(RtqError, match="asymmetric grid"):
            load_qat_layers(model, other)
        # Packed (signed int4 + zero points), then unpacked as the runners do: every served weight is
        # the trained (q - z) * s.
        from onnx import numpy_helper

        from serving.quantize.lowbit_export import build_lowbit
        from serving.quantize.packing import unpack

        calib = np.random.default_rng(2).normal(size=(16, 3, RES, RES)).astype(np.float32)
        dst = tmp_path / "served.onnx"
        info = build_lowbit(fp32, dc_replace(plan, calibration_images=16), calib, dst, log=lambda m: None)
        assert info["packed"] == {"int4": sum(ql.weight.spec.bits == 4 for ql in qlayers)}
        served = unpack(onnx.load(str(dst)))
        inits = {t.name: numpy_helper.to_array(t) for t in served.graph.initializer}
        want = {ql.layer.weight: ql.weight.dequantize() for ql in qlayers}
        checked = 0
        for node in served.graph.node:
            weight = node.input[0].removesuffix("_quantized")
            if node.op_type == "DequantizeLinear" and weight in want:
                q, s, z = (inits[i] for i in node.input)
                shape = (-1,) + (1,) * (q.ndim - 1)
                got = (q.astype(np.float32) - z.reshape(shape)) * s.reshape(shape)
                np.testing.assert_allclose(got, want[weight], rtol=1e-6, atol=1e-7)
                checked += 1
        assert checked == len(qlayers)
    # The student with activation quantizers off vs the FP32 graph carrying the trained integers.
    student = _student_from(result, loaded)
    x = np.random.default_rng(1).normal(size=(3, 3, RES, RES)).astype(np.float32)
    with torch.no_grad():
        want = student(torch.from_numpy(x)).numpy()
    got = logits(fake_quantized(model, qlayers), x)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_integers_file_holds_the_whole_fake_quantized_student(tmp_path: Path, compiled: bool):
    """Weights, steps and the learned input grids: the student rebuilt from the file alone (eager)
    computes what training left (the served-gap diagnosis in README depends on it), also when it
    trained with the compiled fake quantizers."""
    from serving.qat.cli import resolve_plan
    from serving.qat.integers import load_student

    loaded = _teacher()
    cfg = QatConfig(epochs=1, progressive=(), batch_size=16, calibration_images=16, image_size=RES, mixup=0.4)
    plan = resolve_plan("w4a4", asymmetric=True)  # zero points are part of the file too
    kernels = _compiled() if compiled else EAGER
    result = run_qat(loaded, plan, _data(), cfg, tmp_path / "qat", log=lambda m: None, kernels=kernels)
    assert result.summary["kernels"] == kernels.name
    rebuilt = load_student(loaded, result.integers_path)
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(4, 3, RES, RES)).astype(np.float32))
    with torch.no_grad():
        want, got = result.student.eval()(x), rebuilt(x)
        plain = _student_from(result, loaded)(x)  # same integers, activations not quantized
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)  # the A4 grids are part of what it computes
    bits = {q.name: q.input_q.bits for q in rebuilt.modules() if hasattr(q, "input_q")}
    assert bits["conv_stem"] == 8 and bits["blocks.1.0.conv_exp"] == 4


def _student_from(result, loaded: LoadedModel):
    """Rebuild the student from the exported file alone: folded teacher + the file's integers."""
    import copy

    from serving.qat.integers import read_integers

    m = copy.deepcopy(loaded.module)
    fold_batchnorm(m, torch.zeros(1, 3, RES, RES))
    by_layer, _ = read_integers(result.integers_path)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if name in by_layer and hasattr(mod, "weight"):
                got = by_layer[name]
                shape = (-1,) + (1,) * (mod.weight.dim() - 1)
                step = torch.from_numpy(got["step"]).view(shape)
                zp = torch.from_numpy(got.get("zero_point", np.zeros(len(step), np.int8))).float().view(shape)
                mod.weight.copy_((torch.from_numpy(got["q"]).float() - zp) * step)
                mod.bias.copy_(torch.from_numpy(got["bias"]))
    return m.eval()


def test_qat_plan_and_file_errors(tmp_path: Path):
    with pytest.raises(RtqError, match="method qat and qat_file go together"):
        parse_plan({"name": "x", "method": "qat"})
    with pytest.raises(RtqError, match="unknown QAT plan"):
        preset_plan("w3a3")
    with pytest.raises(RtqError, match="--mixup"):
        QatConfig(mixup=-1.0)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"name": "w4a8qat", "method": "qat", "qat_file": "missing.npz"}))
    plan = load_plan(p)
    assert plan.qat_file == str(tmp_path / "missing.npz")
    with pytest.raises(RtqError, match="do not exist"):
        load_qat_layers(onnx.ModelProto(), plan)


def test_rtq_qat_refuses_data_of_another_label_space(tmp_path: Path, data_root: Path, monkeypatch):
    from serving.qat import cli

    if not (data_root / "imagenet-val").is_dir():
        pytest.skip(f"no data at {data_root}")
    import serving.models.zoo as zoo

    monkeypatch.setattr(zoo, "create_model", lambda name, weights=None: _teacher())
    d = tmp_path / "other"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (d / split / c).mkdir(parents=True)
            (d / split / c / "x.png").write_bytes(b"")
    parser = cli.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--data", str(d), "--epochs", "0", "--out", str(tmp_path / "o")])
    with pytest.raises(RtqError, match="label space"):
        cli.main(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["--progressive", "8,x"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--phase-epochs", "1,0"])
    # A split that cannot run is refused before any data is read.
    args = parser.parse_args(["--plan", "w2a4", "--progressive", "4,2", "--phase-epochs", "1,2,3"])
    with pytest.raises(RtqError, match="--phase-epochs 1,2,3"):
        cli.main(args)


def test_rtq_bench_qat_writes_the_ablation_table(tmp_path: Path, data_root: Path, monkeypatch, capsys):
    """PTQ and progressive QAT+KD side by side on a real imagenette subset (64 px teacher)."""
    if not (data_root / "imagenette" / "train").is_dir():
        pytest.skip(f"no imagenette at {data_root}")
    import json
    import shutil

    import serving.models.zoo as zoo
    from serving.qat import ablation

    monkeypatch.setattr(zoo, "create_model", lambda name, weights=None: _teacher())
    monkeypatch.setattr(ablation, "PROJECT_ROOT", tmp_path)  # caches and cell outputs stay in tmp
    parser = argparse.ArgumentParser()
    ablation.add_arguments(parser)
    args = parser.parse_args(
        ["--precisions", "w4a8", "--methods", "ptq,qat-kd-progressive", "--epochs", "2", "--max-images", "20",
         "--max-val-images", "10", "--batch-size", "8", "--data-root", str(data_root), "--out", str(tmp_path),
         "--threads", "1", "-q"]
    )  # fmt: skip
    assert ablation.main(args, "pytest") == 0
    (js,) = tmp_path.glob("qat-ablation-*.json")
    rows = json.loads(js.read_text())["rows"]
    assert [(r["method"], r["epochs"]) for r in rows] == [("ptq", 0), ("qat-kd-progressive", 2)]
    assert [h["weight_bits"] for h in rows[1]["history"]] == [8, 4]  # stepped down to the plan
    assert all(0 <= r["top1"] <= 1 and r["val_images"] == 10 for r in rows)
    md = js.with_suffix(".md").read_text()
    assert "| w4a8 |" in md and "ptq" in md
    assert js.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" and f"]({js.stem}.png)" in md
    lost = round((rows[1]["top1"] - rows[1]["top1_fp32"]) * 10)  # Δ as a count of the 10 val images
    assert f"| {rows[1]['delta_pts']:+.2f} | {lost:+d} |" in md
    # The same grid again: both cells reused from their folders, nothing trained, even from logs
    # written before a setting existed (it counts as its default).
    for cell_log in (tmp_path / ".cache" / "qat" / "ablation").glob("*-w4a8-*/log.json"):
        older = json.loads(cell_log.read_text())
        del older["config"]["ema_decay"]
        cell_log.write_text(json.dumps(older))
    assert ablation.main(args, "pytest again") == 0
    assert "finished earlier with these settings" in capsys.readouterr().out
    newest = max(tmp_path.glob("qat-ablation-*.json"), key=lambda f: f.stat().st_mtime_ns)
    assert [r["top1"] for r in json.loads(newest.read_text())["rows"]] == [r["top1"] for r in rows]
    # At W8A8 progressive has nothing above the plan's bits: the direct cell's run stands for it.
    w8 = parser.parse_args(
        ["--precisions", "w8a8", "--methods", "qat-kd,qat-kd-progressive", "--epochs", "1",
         "--max-images", "20", "--max-val-images", "10", "--batch-size", "8", "--data-root", str(data_root),
         "--out", str(tmp_path), "--threads", "1", "-q"]
    )  # fmt: skip
    assert ablation.main(w8, "pytest w8") == 0
    assert "the same phases as qat-kd, not trained twice" in capsys.readouterr().out
    newest = max(tmp_path.glob("qat-ablation-*.json"), key=lambda f: f.stat().st_mtime_ns)
    direct, progressive = json.loads(newest.read_text())["rows"]
    assert progressive["same_as"] == "qat-kd" and progressive["top1"] == direct["top1"]
    assert "qat-kd-progressive (= qat-kd)" in newest.with_suffix(".md").read_text()
    cells_dir = tmp_path / ".cache" / "qat" / "ablation"
    assert not (cells_dir / "efficientnetv2_b0_imagenette-w8a8-qat-kd-progressive").exists()
    args.epochs = 1  # progressive 8 -> 4 needs two epochs: refused before any training
    with pytest.raises(RtqError, match="cannot cover"):
        ablation.main(args, "pytest")
    # --collect tabulates finished runs (here the grid's own cells) without training anything.
    cells = sorted(cells_dir.glob("*-w4a8-*"))
    out = tmp_path / "collected"
    collected = parser.parse_args(["--collect", *map(str, cells), "--out", str(out)])
    assert ablation.main(collected, "pytest collect") == 0
    (cjs,) = out.glob("qat-ablation-*.json")
    again = json.loads(cjs.read_text())["rows"]
    assert sorted((r["method"], r["top1"]) for r in again) == sorted((r["method"], r["top1"]) for r in rows)
    assert all(r["command"] and r["run"] for r in again)
    # The same cell trained for longer: both runs are named with their epochs.
    longer = tmp_path / "longer"
    shutil.copytree(cells[-1], longer)
    log = json.loads((longer / "log.json").read_text())
    log["config"]["epochs"] = 6
    (longer / "log.json").write_text(json.dumps(log))
    both = parser.parse_args(["--collect", str(cells[-1]), str(longer), "--out", str(out)])
    assert ablation.main(both, "pytest collect") == 0
    newest = max(out.glob("qat-ablation-*.json"), key=lambda f: f.stat().st_mtime_ns)
    named = sorted(r["method"] for r in json.loads(newest.read_text())["rows"])
    assert named == ["qat-kd-progressive-2ep", "qat-kd-progressive-6ep"], named
    # A run that never pinned oscillating weights is its own method.
    log["config"]["freeze_threshold"] = None
    (longer / "log.json").write_text(json.dumps(log))
    assert ablation.main(both, "pytest collect") == 0
    newest = max(out.glob("qat-ablation-*.json"), key=lambda f: f.stat().st_mtime_ns)
    named = sorted(r["method"] for r in json.loads(newest.read_text())["rows"])
    assert named == ["qat-kd-progressive", "qat-kd-progressive-nofreeze"], named
    log["config"]["ema_decay"] = 0.998  # ... and so is one that exported averaged weights
    (longer / "log.json").write_text(json.dumps(log))
    assert ablation.main(both, "pytest collect") == 0
    newest = max(out.glob("qat-ablation-*.json"), key=lambda f: f.stat().st_mtime_ns)
    named = sorted(r["method"] for r in json.loads(newest.read_text())["rows"])
    assert named == ["qat-kd-progressive", "qat-kd-progressive-nofreeze-ema0.998"], named
    with pytest.raises(RtqError, match="no log.json"):
        ablation.main(parser.parse_args(["--collect", str(tmp_path)]), "pytest")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "log.json").write_text("{}")
    with pytest.raises(RtqError, match="not an `rtq qat` log"):
        ablation.main(parser.parse_args(["--collect", str(tmp_path / "broken")]), "pytest")


def test_parameter_average_follows_the_ramped_decay_and_swaps_back():
    from serving.qat.loop import ParameterAverage

    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.bias.fill_(0.0)
    avg = ParameterAverage(m, 0.5)
    expected = 1.0
    for value in (3.0, 5.0, 7.0):
        with torch.no_grad():
            m.weight.fill_(value)
        avg.update()
        decay = min(0.5, (1 + avg.steps) / (10 + avg.steps))
        expected = decay * expected + (1 - decay) * value
    assert avg.averages[0][0, 0].item() == pytest.approx(expected)
    avg.swap()
    assert m.weight[0, 0].item() == pytest.approx(expected)
    assert avg.averages[0][0, 0].item() == 7.0
    again = ParameterAverage(m, 0.5, avg.state_dict())  # what a checkpoint restores
    assert again.steps == 3 and again.averages[0][0, 0].item() == 7.0
    avg.swap()
    assert m.weight[0, 0].item() == 7.0


@pytest.mark.parametrize(("stop", "ema"), [(1, 0.0), (2, 0.9)], ids=["at-phase-end", "mid-phase-averaged"])
def test_an_interrupted_qat_run_resumes_to_the_same_integers(tmp_path: Path, stop: int, ema: float):
    """Stopped after epoch 1 (the end of the 8-bit phase) or 2 (inside the 4-bit phase, whose weights
    are averaged) of 3, resumed from last.pt: the same student, integers and history as the run that
    was never stopped; the checkpoint is gone once done."""
    from serving.qat.integers import read_integers
    from serving.qat.loop import CHECKPOINT, read_checkpoint

    loaded = _teacher()
    cfg = QatConfig(
        epochs=3, progressive=(8, 4), batch_size=16, calibration_images=16, image_size=RES, mixup=0.4,
        ema_decay=ema,
    )  # fmt: skip
    plan = preset_plan("w4a8")
    whole = run_qat(loaded, plan, _data(), cfg, tmp_path / "whole", workers=0, log=lambda m: None)
    assert not (tmp_path / "whole" / CHECKPOINT).exists()
    assert (tmp_path / "whole" / "curves.png").read_bytes()[:4] == b"\x89PNG"

    def stop_after(msg: str) -> None:
        if msg.startswith(f"epoch {stop}/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_qat(loaded, plan, _data(), cfg, tmp_path / "cut", workers=0, log=stop_after, command="first")
    ckpt = read_checkpoint(tmp_path / "cut")
    assert ckpt["epoch"] == stop and [h["weight_bits"] for h in ckpt["history"]] == [8, 4][:stop]
    ckpt["resumed_with"] = ["second"]
    again = run_qat(loaded, plan, _data(), cfg, tmp_path / "cut", workers=0, log=lambda m: None,
                    command="first", resume=ckpt)  # fmt: skip
    assert not (tmp_path / "cut" / CHECKPOINT).exists()
    assert [h["val_top1"] for h in again.history] == [h["val_top1"] for h in whole.history]
    # Only the last phase is averaged, and its epochs say what the last step alone scored.
    assert ["val_top1_last_step" in h for h in whole.history] == [False, bool(ema), bool(ema)]
    assert again.summary["qat_top1"] == whole.summary["qat_top1"]
    assert again.summary["resumed_with"] == ["second"]
    a, _ = read_integers(whole.integers_path)
    b, _ = read_integers(again.integers_path)
    assert a.keys() == b.keys()
    for name in a:
        for field in a[name]:
            np.testing.assert_array_equal(a[name][field], b[name][field], err_msg=f"{name}/{field}")


def test_rtq_qat_resume_refuses_what_would_not_continue_the_run(tmp_path: Path):
    from serving.qat import cli
    from serving.qat.loop import CHECKPOINT, CHECKPOINT_FORMAT, save_checkpoint

    parser = cli.add_arguments(argparse.ArgumentParser())
    out = tmp_path / "run"
    with pytest.raises(RtqError, match="no QAT checkpoint"):
        cli._resumed(parser.parse_args(["--out", str(out), "--resume"]), "rtq qat --resume")
    cfg = QatConfig(epochs=6, progressive=(4, 2), phase_epochs=(1, 5))
    from dataclasses import asdict

    save_checkpoint(out / CHECKPOINT, {
        "format": CHECKPOINT_FORMAT, "model": "efficientnetv2_b0_imagenette", "weights_sha256": "x",
        "plan": cli.resolve_plan("w2a4", asymmetric=True).to_dict(), "config": asdict(cfg), "command": "c",
    })  # fmt: skip
    ckpt, plan, got, where = cli._resumed(parser.parse_args(["--resume", str(out)]), "rtq qat --resume")
    assert got == cfg and plan.name == "w2a4asym" and not plan.weights.symmetric and where == out
    assert ckpt["resumed_with"] == ["rtq qat --resume"]
    # The same values again are fine; other values are refused, each named.
    cli._resumed(
        parser.parse_args(["--resume", str(out), "--epochs", "6", "--plan", "w2a4", "--asymmetric"]), "r"
    )
    with pytest.raises(RtqError, match=r"--lr 0.001 \(checkpoint: 5e-05\).*--plan w4a4asym"):
        cli._resumed(parser.parse_args(["--resume", str(out), "--lr", "1e-3", "--asymmetric"]), "r")
    with pytest.raises(RtqError, match="not the folder of checkpoint"):
        cli._resumed(parser.parse_args(["--resume", str(out), "--out", str(tmp_path)]), "r")
    (tmp_path / "train.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RtqError, match="cannot read QAT checkpoint"):
        cli._resumed(parser.parse_args(["--resume", str(tmp_path / "train.pt")]), "r")
    torch.save({"format": "rtq-train/1"}, tmp_path / "train.pt")
    with pytest.raises(RtqError, match="not an `rtq qat` checkpoint"):
        cli._resumed(parser.parse_args(["--resume", str(tmp_path / "train.pt")]), "r")
    # A new run into a folder with an unfinished one is refused before anything is loaded.
    with pytest.raises(RtqError, match="holds an unfinished run"):
        cli.main(parser.parse_args(["--out", str(out), "--plan", "w2a4"]))
