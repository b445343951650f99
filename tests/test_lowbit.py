"""Below 8 bits: quantizers, plans, allocation, learned rounding, packing and packed variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from serving.errors import RtqError
from serving.quantize.graph import initializer, layers_of
from serving.quantize.lowbit import WeightQuant, activation_qparams, quantize_weight
from serving.quantize.mixed import allocate
from serving.quantize.packing import is_packed, pack, unpack
from serving.quantize.plan import load_plan, parse_plan
from serving.quantize.sensitivity import Sensitivity, by_component, hypotheses, measure
from serving.repository import layout
from serving.runtimes import open_runner
from serving.runtimes.signal_stack import keep_signal_stack

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def fp32(small_repository: Path) -> tuple[Path, onnx.ModelProto]:
    path = small_repository / "efficientnet_lite0-fp32-onnxruntime" / "1" / "model.onnx"
    return path, onnx.load(str(path))


@pytest.fixture(scope="module")
def calib(data_root: Path) -> np.ndarray:
    from serving.models.zoo import get_spec
    from serving.quantize.calibration import calibration_inputs

    return calibration_inputs("imagenet-calib", get_spec("efficientnet_lite0").preprocessing, 32, data_root,
                              progress=False)  # fmt: skip


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_quantizer_stays_on_its_grid(bits: int, symmetric: bool):
    w = RNG.standard_normal((16, 8, 3, 3)).astype(np.float32)
    if bits == 8 and not symmetric:
        with pytest.raises(RtqError, match="asymmetric 8-bit"):
            quantize_weight(w, WeightQuant(bits, symmetric=symmetric))
        return
    spec = WeightQuant(bits, symmetric=symmetric)
    q = quantize_weight(w, spec)
    assert q.q.min() >= spec.qmin and q.q.max() <= spec.qmax and q.scale.shape == (16,)
    s = q.scale[:, None, None, None]
    z = q.zero_point[:, None, None, None].astype(np.float32)
    inside = (w >= (spec.qmin - z) * s) & (w <= (spec.qmax - z) * s)
    err = np.abs(q.dequantize() - w)
    assert (err <= s / 2 + 1e-6)[inside].all()  # nearest grid point inside the clipping range
    per_tensor = quantize_weight(w, WeightQuant(bits, per_channel=False, symmetric=symmetric))
    assert per_tensor.scale.shape == ()


def test_scale_search_beats_max_scaling_at_4_bits():
    w = RNG.standard_t(3, size=(32, 64, 1, 1)).astype(np.float32)  # heavy tails, like real weights
    mse = {s: float(((quantize_weight(w, WeightQuant(4, search_scale=s)).dequantize() - w) ** 2).mean())
           for s in (True, False)}  # fmt: skip
    assert mse[True] < mse[False]


def test_bad_widths_are_refused():
    with pytest.raises(RtqError, match="weight bits 5"):
        WeightQuant(5)
    with pytest.raises(RtqError, match="activation bits 6"):
        activation_qparams(0.0, 1.0, 6)
    scale, zp = activation_qparams(-1.0, 3.0, 8)
    assert scale == pytest.approx(4 / 255) and 0 < zp < 255


def test_plans_parse_strictly(fp32, tmp_path: Path):
    _, model = fp32
    layers = layers_of(model)
    plan = parse_plan({"name": "w4a8", "weights": {"bits": 4}, "components": {"stem": 8},
                       "layers": {"classifier": {"bits": 8}, "blocks.1.0.conv_dw": 2}})  # fmt: skip
    bits = {layer.name: plan.bits_for(layer) for layer in layers}
    assert bits["conv_stem"] == 8 and bits["classifier"] == 8 and bits["blocks.1.0.conv_dw"] == 2
    assert bits["blocks.2.0.conv_pw"] == 4
    cases = [
        ({"name": "x", "bogus": 1}, "unknown field"),
        ({"name": "int8"}, "not fp32/fp16/int8"),
        ({"name": "x", "weights": {"bits": 5}}, "5 bits not supported"),
        ({"name": "x", "components": {"attention": 4}}, "unknown components"),
        ({"name": "x", "method": "gptq"}, "method 'gptq' unknown"),
        ({"name": "x", "calibration_images": 4}, ">= 16"),
    ]
    for data, message in cases:
        with pytest.raises(RtqError, match=message):
            parse_plan(data)
    with pytest.raises(RtqError, match="unknown layers"):
        parse_plan({"name": "x", "layers": {"blocks.99.conv": 4}}).check_layers(layers)
    (tmp_path / "p.yaml").write_text("name: [\n")
    with pytest.raises(RtqError, match="not valid YAML"):
        load_plan(tmp_path / "p.yaml")


def test_layers_are_typed_by_component(fp32):
    comps = {layer.name: layer.component for layer in layers_of(fp32[1])}
    assert comps["conv_stem"] == "stem" and comps["classifier"] == "classifier"
    assert comps["conv_head"] == "head" and comps["blocks.1.0.conv_dw"] == "depthwise"
    assert comps["blocks.1.0.conv_pw"] == "pw_expand" and comps["blocks.1.0.conv_pwl"] == "project"
    assert comps["blocks.0.0.conv_pw"] == "project"  # depthwise-separable block: no expansion
    assert len(comps) == 50


def test_sensitivity_measures_single_layers(fp32, calib):
    only = {"conv_stem", "blocks.1.0.conv_dw", "blocks.5.1.conv_pw"}
    results = measure(fp32[1], calib[:16], (2, 8), (4,), progress=False, only=only)
    assert {r.layer for r in results} == only and len(results) == 9
    w8 = [r for r in results if r.kind == "weight" and r.bits == 8]
    w2 = {r.layer: r for r in results if r.kind == "weight" and r.bits == 2}
    for r in w8:
        assert r.kl < w2[r.layer].kl  # fewer bits, further from FP32
    assert all(0 <= r.agreement <= 1 for r in results)
    assert {g["component"] for g in by_component(results)} == {"stem", "depthwise", "pw_expand"}
    assert hypotheses(results, bits=2)  # verdicts computed on what was measured


def test_knapsack_meets_the_budget_and_spends_bits_where_they_matter(fp32, tmp_path: Path):
    _, model = fp32
    layers = layers_of(model)
    # Synthetic sensitivities: only the depthwise layers suffer at low bits.
    sens = [Sensitivity(layer.name, layer.component, layer.params, 0.0, "weight", b, 1.0,
                        (1.0 if layer.component == "depthwise" else 0.001) / b)
            for layer in layers for b in (2, 4)]  # fmt: skip
    fp32_bytes = 18_655_090
    alloc = allocate(layers, sens, fp32_bytes, 5.5)
    assert alloc.estimated_bytes <= alloc.budget_bytes == int(fp32_bytes / 5.5)
    dw = [alloc.bits[layer.name] for layer in layers if layer.component == "depthwise"]
    assert all(b == 8 for b in dw)  # depthwise weights are tiny: keeping them at 8 bits is cheap
    assert alloc.bits["classifier"] < 8
    with pytest.raises(RtqError, match="cannot be met"):
        allocate(layers, sens, fp32_bytes, 40.0)
    from serving.quantize.mixed import mixed_plan
    from serving.quantize.plan import save_plan

    plan = load_plan(save_plan(mixed_plan("m", alloc, symmetric=False), tmp_path / "m.yaml"))
    by_name = {layer.name: layer for layer in layers}
    assert not plan.quant_for(by_name["classifier"]).symmetric  # low bits get a zero point
    eight = [name for name, b in alloc.bits.items() if b == 8]
    assert eight and all(plan.quant_for(by_name[n]).symmetric for n in eight)  # int8 storage cannot


def test_the_allocated_size_is_the_built_file_size(small_repository: Path, fp32, calib, tmp_path: Path):
    from serving.quantize.lowbit_export import build_lowbit
    from serving.quantize.mixed import mixed_plan, qdq_overhead

    path, model = fp32
    layers = layers_of(model)
    # Synthetic: a loss per weight that falls with width, so big layers go low first.
    sens = [Sensitivity(la.name, la.component, la.params, 0.0, "weight", b, 1.0, 1 / b / la.params)
            for la in layers for b in (2, 4)]  # fmt: skip
    int8 = layout.open_variant(small_repository, "efficientnet_lite0-int8-onnxruntime")
    overhead = qdq_overhead(int8.manifest["file_bytes"], layers)
    alloc = allocate(layers, sens, path.stat().st_size, 7.0, overhead_bytes=overhead)
    assert {2, 4, 8} <= set(alloc.bits.values())  # a real mix of packed widths
    dst = tmp_path / "mixed.onnx"
    build_lowbit(
        path, mixed_plan("m7", alloc, method="rtn", calibration_images=16), calib, dst, log=lambda m: None
    )
    built = dst.stat().st_size
    assert abs(built - alloc.estimated_bytes) < 0.01 * built, (built, alloc.estimated_bytes)
    assert built <= alloc.budget_bytes * 1.01


def test_learned_rounding_beats_nearest_on_a_real_layer(fp32, calib):
    import torch

    from serving.quantize.ptq import _pad, _torch_layer, adaround, layer_input

    _, model = fp32
    layer = next(lay for lay in layers_of(model) if lay.name == "blocks.2.0.conv_dw")
    w, b = initializer(model, layer.weight), initializer(model, layer.bias)
    x = layer_input(model, layer, calib[:8])
    rtn = quantize_weight(w, WeightQuant(4))
    learned = adaround(layer, w, b, rtn, x, x, iters=150)
    xt = _pad(layer, x)
    target = _torch_layer(layer, torch.from_numpy(w), torch.from_numpy(b), xt)

    def err(q) -> float:
        return float(((_torch_layer(layer, torch.from_numpy(q.dequantize()), torch.from_numpy(b), xt)
                       - target) ** 2).mean())  # fmt: skip

    assert learned.q.min() >= -8 and learned.q.max() <= 7
    assert err(learned) < err(rtn)


def test_packing_round_trips_and_refuses_values_outside_the_width():
    from onnx import TensorProto, helper, numpy_helper

    q = np.array([[-8, 7], [0, -1]], np.int8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], axis=0)], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [numpy_helper.from_array(q, "w"), numpy_helper.from_array(np.array([0.5, 0.25], np.float32), "s"),
         numpy_helper.from_array(np.zeros(2, np.int8), "z")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    packed = pack(model, {"w": 4})
    assert is_packed(packed) and packed.opset_import[0].version == 21
    assert np.array_equal(numpy_helper.to_array(unpack(packed).graph.initializer[0]), q)
    with pytest.raises(ValueError, match="outside int2"):
        pack(model, {"w": 2})


def test_packed_w4a8_variant_runs_on_int8_kernels_on_both_backends(
    small_repository: Path, fp32, calib, tmp_path: Path
):
    from serving.quantize.lowbit_export import build_lowbit

    path, model = fp32
    plan = parse_plan({"name": "w4a8", "method": "rtn-bc", "weights": {"bits": 4},
                       "components": {"stem": 8, "classifier": 8}, "calibration_images": 16})  # fmt: skip
    dst = tmp_path / "w4a8.onnx"
    info = build_lowbit(path, plan, calib, dst, log=lambda m: None)
    assert info["packed"] == {"int4": 48}
    int8 = layout.open_variant(small_repository, "efficientnet_lite0-int8-onnxruntime")
    assert dst.stat().st_size < 0.7 * int8.manifest["file_bytes"]
    x = calib[:4]
    with open_runner("onnxruntime", dst, "w4a8") as ort_runner, open_runner("openvino", dst, "w4a8") as ov:
        a, b = ort_runner.infer(x), ov.infer(x)
        assert ov.conv_precisions() == {"u8": 49}  # every conv on INT8 kernels, none dequantized per run
        # ORT fuses DQ -> Conv -> Q only when each bias scale is input scale x weight scale.
        assert ort_runner.conv_kernels() == {"int8": 49}
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.75
    with pytest.raises(RtqError, match="activations have no integer kernels"):
        build_lowbit(path, parse_plan({"name": "w4a4", "activations": {"bits": 4}}), calib, dst)


def test_a_spec_with_a_plan_builds_served_packed_variants(tmp_path: Path, data_root: Path):
    from serving.repository.build import build
    from serving.repository.spec import parse_spec

    (tmp_path / "w4.yaml").write_text(
        "name: w4bc\nmethod: rtn-bc\nweights: {bits: 4}\ncomponents: {stem: 8, classifier: 8}\n"
        "calibration_images: 16\n"
    )
    spec_data = {"models": [{"model": "efficientnet_lite0", "precisions": [], "plans": ["w4.yaml"],
                             "backends": ["onnxruntime", "openvino"]}],
                 "calibration_images": 16, "eval_images": 32}  # fmt: skip
    spec = parse_spec(spec_data, str(tmp_path / "spec.yaml"))
    manifests = build(spec, tmp_path / "repo", "test", data_root, tmp_path / "cache", progress=False,
                      log=lambda m: None)  # fmt: skip
    assert [m["variant"] for m in manifests] == ["efficientnet_lite0-w4bc-onnxruntime",
                                                 "efficientnet_lite0-w4bc-openvino"]  # fmt: skip
    for m in manifests:
        assert m["model_file"] == "model.onnx" and m["lowbit"]["packed"] == {"int4": 48}
        assert 4.0 < m["weight_bits"] < 6.5 and m["compression_vs_fp32"] > 4.5
        assert m["agreement_fp32"]["imagenet-val"] > 0.5
    assert manifests[0]["runtime"]["conv_kernels"] == {"int8": 49}
    assert manifests[1]["runtime"]["conv_precisions"] == {"u8": 49}
    with pytest.raises(RtqError, match="precision plan missing.yaml not found"):
        parse_spec({"models": [{"model": "efficientnet_lite0", "plans": ["missing.yaml"]}]},
                   str(tmp_path / "spec.yaml"))  # fmt: skip


def test_input_moment_is_the_mean_outer_product_of_im2col_rows():
    import torch
    import torch.nn.functional as F

    from serving.quantize.graph import Layer
    from serving.quantize.ptq import input_moment

    x = RNG.standard_normal((6, 4, 9, 9)).astype(np.float32)
    dw = Layer("dw", "Conv", "w", None, "x", "depthwise", (4, 1, 3, 3), (2, 2), (1, 1, 1, 1), group=4)
    u = F.unfold(F.pad(torch.from_numpy(x), (1, 1, 1, 1)), 3, stride=2).double()  # (6, 36, 25)
    rows = u.permute(1, 0, 2).reshape(4, 9, -1)
    expect = (rows @ rows.transpose(1, 2) / rows.shape[-1]).numpy()
    assert np.allclose(input_moment(dw, x), expect)
    fc = Layer("fc", "Gemm", "w", None, "x", "classifier", (3, 5))
    v = RNG.standard_normal((7, 5))
    assert np.allclose(input_moment(fc, v), (v.T @ v / 7)[None])


def test_clipping_for_the_output_beats_clipping_for_the_weights_on_the_output():
    # Inputs with one dominant direction: the weight error that matters is the one along it.
    d = 64
    basis = np.linalg.qr(RNG.standard_normal((d, d)))[0]
    x = RNG.standard_normal((4096, d)) * np.geomspace(30, 0.1, d) @ basis.T
    moment = (x.T @ x / len(x))[None]
    w = RNG.standard_t(3, size=(32, d)).astype(np.float32)
    spec = WeightQuant(2)

    def out_err(q) -> float:
        e = q.dequantize() - w
        return float(np.einsum("od,de,oe->", e, moment[0], e))

    assert out_err(quantize_weight(w, spec, moment)) < 0.9 * out_err(quantize_weight(w, spec))
    with pytest.raises(RtqError, match="per channel"):
        quantize_weight(w, WeightQuant(2, per_channel=False), moment)


def test_learned_rounding_is_kept_only_where_it_beats_nearest_on_unseen_images(fp32, calib):
    from serving.quantize.ptq import input_moment, layer_input, validated_rounding

    _, model = fp32
    layers = {lay.name: lay for lay in layers_of(model)}
    # A classifier fed 20 pooled vectors has 1.28M rounding choices: learned rounding memorizes them.
    fc = layers["classifier"]
    w, b = initializer(model, fc.weight), initializer(model, fc.bias)
    x = layer_input(model, fc, calib[:20])
    qw = quantize_weight(w, WeightQuant(2), input_moment(fc, x[:16]))
    assert validated_rounding(fc, w, b, qw, x, x, iters=60)[1] == "nearest"
    # A pointwise conv at 112 px sees 12,544 rows of 32 per image: learned rounding generalizes.
    pw = layers["blocks.1.0.conv_pw"]
    w, b = initializer(model, pw.weight), initializer(model, pw.bias)
    x = layer_input(model, pw, calib[:10])
    qw = quantize_weight(w, WeightQuant(2), input_moment(pw, x[:8]))
    assert validated_rounding(pw, w, b, qw, x, x, iters=400)[1] == "adaround"


@pytest.mark.parametrize("bits", [2, 4])
def test_asymmetric_weights_pack_signed_and_unpack_to_zero_point_free_int8(bits: int):
    from onnx import TensorProto, helper, numpy_helper

    from serving.quantize.lowbit_export import signed_storage

    w = (RNG.standard_normal((6, 5)) + np.linspace(-1, 2, 6)[:, None]).astype(np.float32)  # off-centre rows
    qw = quantize_weight(w, WeightQuant(bits, symmetric=False))
    assert qw.q.min() >= 0 and qw.q.max() == 2**bits - 1 and qw.zero_point.any()
    q, zp = signed_storage(qw)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], axis=0)], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 5])],
        [numpy_helper.from_array(q, "w"), numpy_helper.from_array(qw.scale, "s"),
         numpy_helper.from_array(zp, "z")],
    )  # fmt: skip
    packed = pack(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), {"w": bits})
    assert is_packed(packed)
    import onnxruntime as ort

    for model in (packed, unpack(packed)):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert np.allclose(sess.run(None, {})[0], qw.dequantize())
    unpacked = {t.name: numpy_helper.to_array(t) for t in unpack(packed).graph.initializer}
    assert unpacked["w"].dtype == np.int8 and not unpacked["z"].any()


def _qdq_conv_silu_conv() -> onnx.ModelProto:
    """x -> Q/DQ -> Conv -> Q/DQ -> SiLU (Sigmoid, Mul) -> Q/DQ -> Conv -> y, plus the SiLU output added
    back after the second conv (a DQ read by a conv and an Add): the layout of ORT's QDQ graphs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(128), "zp"),
        numpy_helper.from_array(rng.integers(-7, 8, (8, 3, 3, 3)).astype(np.int8), "w1"),
        numpy_helper.from_array(rng.integers(-7, 8, (8, 8, 1, 1)).astype(np.int8), "w2"),
        numpy_helper.from_array(np.full(8, 0.02, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(8, np.int8), "wz"),
    ]  # fmt: skip

    def qdq(src: str, dst: str) -> list[onnx.NodeProto]:
        return [helper.make_node("QuantizeLinear", [src, "s", "zp"], [f"{dst}_q"]),
                helper.make_node("DequantizeLinear", [f"{dst}_q", "s", "zp"], [dst])]  # fmt: skip

    nodes = [
        *qdq("x", "xq"),
        helper.make_node("DequantizeLinear", ["w1", "ws", "wz"], ["w1f"], axis=0),
        helper.make_node("DequantizeLinear", ["w2", "ws", "wz"], ["w2f"], axis=0),
        helper.make_node("Conv", ["xq", "w1f"], ["c1"], pads=[1, 1, 1, 1]),
        *qdq("c1", "c1q"),
        helper.make_node("Sigmoid", ["c1q"], ["sg"]),
        helper.make_node("Mul", ["c1q", "sg"], ["silu"]),
        *qdq("silu", "siluq"),
        helper.make_node("Conv", ["siluq", "w2f"], ["c2"]),
        helper.make_node("Add", ["c2", "siluq"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_openvino_keeps_activation_qdq_on_conv_inputs_only(tmp_path: Path):
    """The conv-output Q/DQ that ORT's QLinearConv wants cost OpenVINO a Convert, Subtract and
    Multiply per tensor before a float op (EfficientNetV2's SiLU; measured on the real model, this toy
    is fused either way): dropped for OpenVINO only, and the convs stay INT8."""
    import onnxruntime as ort
    import openvino as ov
    from onnx import numpy_helper

    from serving.runtimes.openvino_runner import clip_qdq_off_conv_inputs

    model = _qdq_conv_silu_conv()
    onnx.checker.check_model(model)
    slim = onnx.ModelProto()
    slim.CopyFrom(model)
    assert clip_qdq_off_conv_inputs(slim) == 3  # Sigmoid and Mul read c1's Clip, Add silu's
    nodes = {n.output[0]: n for n in slim.graph.node}
    kept = [n.output[0] for n in slim.graph.node if n.op_type == "DequantizeLinear"]
    assert kept == ["xq", "w1f", "w2f", "siluq"]  # conv inputs and weights; c1's pair is gone
    assert {"c1_q", "c1q"}.isdisjoint(nodes) and nodes["y"].input[1] == "siluq_clip"
    assert list(nodes["sg"].input) == ["c1q_clip"] and list(nodes["silu"].input) == ["c1q_clip", "sg"]
    # The Clip keeps the pair's range: ORT folds ReLU6 into it, and dropping it lost the activation.
    bounds = {t.name: numpy_helper.to_array(t) for t in slim.graph.initializer}
    lo, hi = float(bounds["c1q_clip_lo"]), float(bounds["c1q_clip_hi"])
    assert (lo, hi) == pytest.approx((0.05 * (0 - 128), 0.05 * (255 - 128)))
    onnx.checker.check_model(slim)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16), dtype=np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = session.run(None, {"x": x})[0]
    path = tmp_path / "slim.onnx"
    onnx.save(slim, str(path))
    with keep_signal_stack():  # a CPU plugin in the test process: see serving/runtimes/signal_stack.py
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = compiled.create_infer_request().infer({0: x})[0]
    # One rounding fewer: the same function up to the quantization steps it no longer rounds to.
    assert np.abs(out - ref).max() < 0.5 and np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99
    ops = compiled.get_runtime_model().get_ordered_ops()
    info = [(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
            for op in ops]  # fmt: skip
    assert [p for t, p in info if t == "Convolution"] == ["u8", "u8"], info  # still INT8 convs


def test_lowbit_pareto_plot_draws_the_exact_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The kernel column depends on the CPU (u8 x s8 saturates without VNNI); the plot must not."""
    from matplotlib.figure import Figure

    from serving.bench.lowbit import _pareto_plot

    drawn: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), save(self, *a, **k)))
    rows = [
        {"variant": "fp32", "method": "fp32", "mixed": False, "file_bytes": 16e6, "top1": 0.75},
        {"variant": "int8", "method": "int8", "mixed": False, "file_bytes": 4e6, "top1": 0.70,
         "top1_exact": 0.74},
    ]  # fmt: skip
    _pareto_plot(rows, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 0
    points = [tuple(c.get_offsets()[0]) for c in drawn[0].axes[0].collections]
    assert points == [(16.0, 75.0), (4.0, 74.0)]
