"""ONNX Runtime INT8 activation ranges: the rarest extremes cut for unbounded activations only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from serving.quantize.int8_onnxruntime import CHUNK_IMAGES, has_unbounded_activations, quantize_int8

SIDE = 48


def _model(path: Path, activation: str) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["conv"], pads=[1, 1, 1, 1])]
    inits = [w, b]
    if activation == "silu":
        nodes += [
            helper.make_node("Sigmoid", ["conv"], ["gate"]),
            helper.make_node("Mul", ["conv", "gate"], ["act"]),
        ]
    else:  # ReLU6, as in Lite0
        inits += [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
        nodes.append(helper.make_node("Clip", ["conv", "lo", "hi"], ["act"]))
    nodes.append(helper.make_node("Conv", ["act", "w2"], ["logits"]))
    inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (2, 4, 1, 1)).astype(np.float32), "w2"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, SIDE, SIDE])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _scale_of(path: Path, tensor: str) -> float:
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] == tensor:
            return float(inits[n.input[1]])
    raise AssertionError(f"{tensor} is not quantized")


@pytest.mark.parametrize("activation", ["silu", "relu6"])
def test_a_few_outlier_values_set_the_range_only_where_activations_are_bounded(tmp_path, activation):
    src = _model(tmp_path / f"{activation}.onnx", activation)
    assert has_unbounded_activations(onnx.load(str(src))) == (activation == "silu")
    rng = np.random.default_rng(1)
    n = CHUNK_IMAGES + 13  # calibrated in passes, the last one short
    calib = rng.normal(0, 1, (n, 3, SIDE, SIDE)).astype(np.float32)
    calib[7, :, 0, 0] = 60.0  # one corner pixel far outside the rest: 16 conv outputs of ~600,000
    dst = quantize_int8(src, tmp_path / f"{activation}-int8.onnx", calib)
    # The first activation's range as the calibration images give it (ORT fuses Conv + Clip, so with
    # ReLU6 the quantized tensor is the clipped one).
    tensor = "conv" if activation == "silu" else "act"
    probe = onnx.load(str(src))
    probe.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    s = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [s.run([tensor], {"input": calib[i : i + 1]})[0] for i in range(len(calib))]
    extreme_scale = (max(float(o.max()) for o in outs) - min(0.0, min(float(o.min()) for o in outs))) / 255
    scale = _scale_of(dst, tensor)
    if activation == "silu":
        # The outlier's values are cut: they no longer stretch the grid for all the others.
        assert scale < 0.3 * extreme_scale, (scale, extreme_scale)
        values = np.concatenate([o.ravel() for o in outs])
        lo, hi = np.percentile(values, [0.005, 99.995])  # 99.99% of the values inside the range
        assert scale == pytest.approx((hi - min(0.0, lo)) / 255, rel=0.05), (scale, lo, hi)
    else:
        assert scale == pytest.approx(extreme_scale, rel=0.02)
    # Still a working INT8 model.
    q = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    assert q.run(None, {"input": calib[:1]})[0].shape == (1, 2, SIDE, SIDE)
