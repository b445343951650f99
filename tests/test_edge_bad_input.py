"""Bad input against a real edge server: a precise gRPC status and message, the server keeps serving,
and the failure is counted by code in the metrics scrape."""

from __future__ import annotations

import io
import struct
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub

from serving.edge.server import EdgeConfig, EdgeServer

MODEL = "efficientnet_lite0-int8-onnxruntime"
LABELS = {"model": MODEL, "precision": "int8", "backend": "onnxruntime"}
NO_MODEL = {"model": "", "precision": "", "backend": ""}
LIMIT = 8 * 1024 * 1024
IMAGE = (3, 224, 224)


def request(
    shape=(1, *IMAGE), datatype="FP32", raw: bytes | None = None, name="input", model=MODEL, version=""
) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    req.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is None:
        raw = np.zeros(shape, np.float32).tobytes()
    req.raw_input_contents.append(raw)
    return req


def images(*blobs: bytes) -> pb.ModelInferRequest:
    raw = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    return request(shape=(len(blobs),), datatype="BYTES", raw=raw)


def huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buf, format="PNG")  # 48 Mpixel, a few KB compressed
    return buf.getvalue()


def tall_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 100_000)).save(buf, format="PNG")  # a few hundred bytes; resized: 256x25600000
    return buf.getvalue()


def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, format="GIF")
    return buf.getvalue()


# A palette PNG whose IDAT length is off by three: PIL raises SyntaxError (not OSError) loading it.
BROKEN_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000300000002801030000008249eb3200000003504c5445000000a77a3dda"
    "0000001449444154789c63fccfc0c0c0c0c0c4304abdff69a1500042d0014fc164ccbb0000000049454e44ae426082"
)


def raw_and_typed() -> pb.ModelInferRequest:
    req = request()
    req.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
    return req


def with_nan() -> pb.ModelInferRequest:
    x = np.zeros((1, *IMAGE), np.float32)
    x[0, 1, 5, 5] = np.nan
    x[0, 2, 7, 7] = np.inf
    return request(raw=x.tobytes())


def typed_uint8_over_255() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    t = req.inputs.add(name="input", datatype="UINT8", shape=[1, *IMAGE])
    t.contents.uint_contents.extend([300] + [0] * (int(np.prod(IMAGE)) - 1))
    return req


def two_inputs() -> pb.ModelInferRequest:
    req = request()
    req.inputs.add(name="extra", datatype="FP32", shape=[1, *IMAGE])
    req.raw_input_contents.append(np.zeros((1, *IMAGE), np.float32).tobytes())
    return req


def unknown_output() -> pb.ModelInferRequest:
    req = request()
    req.outputs.add(name="probabilities")
    return req


def zero_topk() -> pb.ModelInferRequest:
    req = request()
    out = req.outputs.add(name="logits")
    out.parameters["classification"].int64_param = 0
    return req


def bad_label() -> pb.ModelInferRequest:
    req = request()
    req.parameters["label"].string_param = "cat"
    return req


CODE = grpc.StatusCode
# (case, request builder, expected code, words the message must hold, labels the failure is counted under)
CASES: list[tuple[str, Callable[[], pb.ModelInferRequest], grpc.StatusCode, str, dict]] = [
    (
        "wrong shape",
        lambda: request(shape=(1, 3, 200, 200)),
        CODE.INVALID_ARGUMENT,
        "shape [1, 3, 200, 200] does not match [N, 3, 224, 224]",
        LABELS,
    ),
    (
        "wrong dtype",
        lambda: request(datatype="INT32"),
        CODE.INVALID_ARGUMENT,
        "datatype INT32 is not supported",
        LABELS,
    ),
    (
        "byte count",
        lambda: request(raw=b"\0" * 1000),
        CODE.INVALID_ARGUMENT,
        "1000 bytes of raw contents, but FP32 [1, 3, 224, 224] needs 602112",
        LABELS,
    ),
    (
        "empty batch",
        lambda: request(shape=(0, *IMAGE), raw=b""),
        CODE.INVALID_ARGUMENT,
        "empty batch",
        LABELS,
    ),
    (
        "batch above max",
        lambda: request(shape=(9, *IMAGE)),
        CODE.INVALID_ARGUMENT,
        "batch of 9 is above this model's max_batch_size 8",
        LABELS,
    ),
    (
        "unknown model",
        lambda: request(model="resnet50"),
        CODE.NOT_FOUND,
        "unknown model 'resnet50'",
        NO_MODEL,
    ),
    (
        "unknown version",
        lambda: request(version="7"),
        CODE.NOT_FOUND,
        f"unknown version '7' of model '{MODEL}'",
        LABELS,
    ),
    (
        "corrupt image",
        lambda: images(b"\xff\xd8\xff\xe0 not really a jpeg"),
        CODE.INVALID_ARGUMENT,
        "image 0: cannot decode image",
        LABELS,
    ),
    (
        "huge image",
        lambda: images(huge_png()),
        CODE.INVALID_ARGUMENT,
        "8000x6000; at most 40000000 pixels",
        LABELS,
    ),
    (
        "extreme aspect ratio",
        lambda: images(tall_png()),
        CODE.INVALID_ARGUMENT,
        "image 0: image is 1x100000; aspect ratios above 32:1 are refused",
        LABELS,
    ),
    ("GIF", lambda: images(gif()), CODE.INVALID_ARGUMENT, "image 0: not a JPEG, PNG, WebP or BMP", LABELS),
    (
        "PIL SyntaxError",
        lambda: images(BROKEN_PNG),
        CODE.INVALID_ARGUMENT,
        f"image 0: cannot decode image of {len(BROKEN_PNG)} bytes: SyntaxError: broken PNG file",
        LABELS,
    ),
    (
        "raw and typed contents",
        raw_and_typed,
        CODE.INVALID_ARGUMENT,
        "both raw_input_contents and typed contents",
        LABELS,
    ),
    (
        "huge model name",
        lambda: request(model="m" * 100_000),
        CODE.NOT_FOUND,
        "unknown model 'mmmm",
        NO_MODEL,
    ),
    (
        "truncated BYTES",
        lambda: request(shape=(1,), datatype="BYTES", raw=struct.pack("<I", 99) + b"abc"),
        CODE.INVALID_ARGUMENT,
        "runs past the end",
        LABELS,
    ),
    ("NaN and Inf", with_nan, CODE.INVALID_ARGUMENT, "2 NaN or Inf values", LABELS),
    ("UINT8 above 255", typed_uint8_over_255, CODE.INVALID_ARGUMENT, "UINT8 value 300 is above 255", LABELS),
    (
        "oversized message",
        lambda: request(shape=(1, 9 * 1024 * 1024 // 4)),
        CODE.RESOURCE_EXHAUSTED,
        f"above this server's limit of {LIMIT} bytes",
        NO_MODEL,
    ),
    (
        "missing input name",
        lambda: request(name="images"),
        CODE.INVALID_ARGUMENT,
        "takes exactly one input 'input'; request has ['images']",
        LABELS,
    ),
    ("two inputs", two_inputs, CODE.INVALID_ARGUMENT, "exactly one input 'input'", LABELS),
    ("unknown output", unknown_output, CODE.INVALID_ARGUMENT, "unknown output 'probabilities'", LABELS),
    ("top-k of 0", zero_topk, CODE.INVALID_ARGUMENT, "classification count must be >= 1", LABELS),
    ("bad label", bad_label, CODE.INVALID_ARGUMENT, "parameter 'label' must be class indices", LABELS),
]


@pytest.fixture(scope="module")
def server(small_repository: Path):
    srv = EdgeServer(
        EdgeConfig(small_repository, grpc_port=0, metrics_port=0, models=[MODEL], max_message_bytes=LIMIT)
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server: EdgeServer):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield GRPCInferenceServiceStub(channel)
    channel.close()


def failures(port: int, code: str, labels: dict) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    want = {**labels, "code": code}
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "rtq_requests_total" and s.labels == want
    )


@pytest.mark.parametrize(("case", "build", "code", "words", "labels"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_precise_status_and_is_counted(server, stub, case, build, code, words, labels):
    before = failures(server.metrics_port, code.name, labels)
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(build(), timeout=30)
    assert exc.value.code() == code, exc.value.details()
    assert words in exc.value.details()
    assert "\n" not in exc.value.details() and len(exc.value.details()) <= 1000
    assert failures(server.metrics_port, code.name, labels) == before + 1
    # ... and the server keeps serving.
    ok = stub.ModelInfer(request(), timeout=30)
    assert np.frombuffer(ok.raw_output_contents[0], dtype="<f4").shape == (1000,)


def test_not_a_protobuf_is_refused(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as exc:
        call(b"\xff\xff\xff\xff garbage", timeout=10)
    channel.close()
    assert (
        exc.value.code() == CODE.INVALID_ARGUMENT and "not a valid ModelInferRequest" in exc.value.details()
    )


def test_metadata_of_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=10)
    assert exc.value.code() == CODE.NOT_FOUND and "unknown model 'nope'" in exc.value.details()
