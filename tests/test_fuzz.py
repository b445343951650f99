"""Fuzzed ModelInfer against a real edge server and a real Triton (CI-sized; `rtq bench reliability`
runs 10,000 cases): every answer a well-formed status of the right class, no crash, bounded memory."""

from __future__ import annotations

import os
import socket
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from PIL import ImageFile
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from serving.bench.fuzz import (
    CATEGORIES,
    CaseGenerator,
    FuzzResult,
    ModelInfo,
    compare,
    fuzz_table_markdown,
    png_bytes,
    run_fuzz,
)
from serving.edge.server import EdgeConfig, EdgeServer
from serving.edge.tensors import MAX_ASPECT_RATIO, decode_image
from serving.errors import RtqError
from serving.models.preprocessing import MAX_IMAGE_PIXELS, Preprocessing
from serving.triton.launcher import TritonConfig, TritonServer

MODEL = "efficientnet_lite0-int8-onnxruntime"
LIMIT = 8 * 1024 * 1024
SEED = 8
EDGE_CASES = 800
TRITON_CASES = 150
INFO = ModelInfo(MODEL, "input", (3, 224, 224), 8, ("logits",))
PP = Preprocessing(224, 0.875, (127.0,) * 3, (128.0,) * 3)
# Resident memory the edge server may gain over the first run: decoding buffers (a 36-Mpixel JPEG
# is under the pixel limit) that the allocator keeps for reuse; 400-700 MiB here, and the
# 10,000-case run swings between 400 and 1000 MiB without a trend. A bomb that gets through
# costs many GiB.
EDGE_RSS_GROWTH_MB = 1024
# Sending the same cases again may not raise the peak much further: a leak of ~1 MiB per request
# would add 400 MiB.
EDGE_RSS_REPEAT_MB = 256
REPEAT_CASES = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def edge_runs(small_repository: Path) -> tuple[FuzzResult, FuzzResult]:
    """The fuzz run, then its first REPEAT_CASES cases again on the same server."""
    srv = EdgeServer(
        EdgeConfig(small_repository, grpc_port=0, metrics_port=None, models=[MODEL], max_message_bytes=LIMIT)
    ).start()
    target = f"127.0.0.1:{srv.grpc_port}"
    try:
        # The server runs in this process, so its memory is ours.
        first = run_fuzz(target, MODEL, EDGE_CASES, SEED, pid=os.getpid(), max_message_bytes=LIMIT)
        again = run_fuzz(target, MODEL, REPEAT_CASES, SEED, pid=os.getpid(), max_message_bytes=LIMIT)
        return first, again
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def edge_result(edge_runs: tuple[FuzzResult, FuzzResult]) -> FuzzResult:
    return edge_runs[0]


def test_edge_server_answers_every_fuzzed_request_with_the_right_status(edge_runs):
    r, again = edge_runs
    assert r.crashes == 0, r.crash_reason
    assert r.sent == EDGE_CASES and len(r.cases) == EDGE_CASES
    assert r.malformed == 0, r.malformed_examples
    wrong = [f"{c.index} {c.category} ({c.note}): {c.code} {c.detail}" for c in r.unexpected]
    assert not wrong, "\n".join(wrong[:10])
    # No answer is an unhandled exception or a hang.
    assert not any(c.code in ("UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED") for c in r.cases)
    assert all(c.detail and "\n" not in c.detail for c in r.cases if c.code != "OK")
    # Every category was sent (each case's code is in its category's class: `unexpected` above), and
    # the refusal categories were refused with their own code.
    assert set(r.codes) == set(CATEGORIES)
    for category in ("shape", "datatype", "byte_count", "names", "image_bomb"):
        assert r.codes[category].get("INVALID_ARGUMENT", 0) >= 0.9 * sum(r.codes[category].values())
    assert set(r.codes["model"]) == {"NOT_FOUND"} and set(r.codes["oversize"]) == {"RESOURCE_EXHAUSTED"}
    assert r.codes["valid"] == {"OK": sum(r.codes["valid"].values())}
    # Bombs are refused fast: from the header, not after decoding.
    assert max(c.seconds for c in r.cases if c.category == "image_bomb" and c.code != "OK") < 2.0
    assert r.rss_before_mb and r.rss_after_mb and r.rss_peak_mb >= r.rss_after_mb
    assert r.rss_growth_mb < EDGE_RSS_GROWTH_MB, (r.rss_before_mb, r.rss_peak_mb, r.rss_after_mb)
    # The same cases answer the same way, and memory does not climb with them.
    assert [c.code for c in again.cases] == [c.code for c in r.cases[:REPEAT_CASES]]
    assert again.crashes == 0 and again.malformed == 0
    assert again.rss_peak_mb < r.rss_peak_mb + EDGE_RSS_REPEAT_MB, (r.rss_peak_mb, again.rss_peak_mb)


def test_triton_survives_the_same_cases(edge_result: FuzzResult, small_repository: Path, tmp_path: Path):
    triton = TritonServer(
        TritonConfig(
            small_repository,
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            models=[MODEL],
            work_dir=tmp_path / "triton",
        )
    ).start()
    try:
        r = run_fuzz(
            f"127.0.0.1:{triton.config.grpc_port}",
            MODEL,
            TRITON_CASES,
            SEED,
            pid=triton.process.pid,
            max_message_bytes=LIMIT,
            rss_children=True,
        )
        alive = triton.process.poll() is None
    finally:
        triton.stop()
    assert alive and r.crashes == 0, r.crash_reason
    assert r.sent == TRITON_CASES and len(r.cases) == TRITON_CASES
    names = {c.name for c in grpc.StatusCode}
    assert all(c.code in names for c in r.cases)
    assert r.rss_before_mb and r.rss_peak_mb
    rows = compare(edge_result, r)
    assert sum(d.cases for d in rows) == TRITON_CASES
    # The edge server takes UINT8 and BYTES images, Triton's FP32-only config does not.
    assert any(not d.same and d.category == "valid" and d.edge_code == "OK" for d in rows)
    table = fuzz_table_markdown([edge_result, r], rows)
    assert "| valid | OK" in table and "answered differently" in table


def test_cases_are_reproducible_from_seed_and_index():
    a, b = CaseGenerator(INFO, 3), CaseGenerator(INFO, 3)
    assert [a.case(i).payload for i in range(60)] == [b.case(i).payload for i in reversed(range(60))][::-1]
    assert a.case(17).payload != CaseGenerator(INFO, 4).case(17).payload
    assert {a.case(i).category for i in range(len(a.schedule))} == set(CATEGORIES)
    # Some of the not-a-protobuf cases really are not one.
    bad = 0
    for i in range(400):
        case = a.case(i)
        if case.category == "not_protobuf":
            try:
                pb.ModelInferRequest.FromString(case.payload)
            except Exception:  # noqa: BLE001
                bad += 1
    assert bad > 5


def test_image_limits_hold_before_any_pixel_is_decoded(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    with pytest.raises(RtqError, match=f"at most {MAX_IMAGE_PIXELS} pixels"):
        decode_image(png_bytes(side, side, idat=b"x"), PP)
    with pytest.raises(RtqError, match="not a JPEG, PNG"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n", PP)
    monkeypatch.undo()
    # A few hundred bytes whose short-side resize would need many GB.
    with pytest.raises(RtqError, match=f"aspect ratios above {MAX_ASPECT_RATIO}:1"):
        decode_image(png_bytes(1, 100_000), PP)
    assert decode_image(png_bytes(40, 30), PP).shape == (3, 224, 224)


class _BrokenServer:
    """Answers ModelInfer with junk bytes or an unhandled exception: what the fuzzer must catch."""

    def __init__(self):
        def infer(raw: bytes, context):
            if raw[:1] == b"\x0a":  # starts with model_name: answer junk
                return b"\xff\xff not a response"
            raise RuntimeError("boom")

        def config(request, context):
            cfg = mc.ModelConfig(name=request.name, max_batch_size=8)
            cfg.input.add(name="input", dims=[3, 224, 224])
            cfg.output.add(name="logits", dims=[1000])
            return pb.ModelConfigResponse(config=cfg)

        def unary(fn, req, resp):
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )

        methods = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
            "ModelConfig": unary(config, pb.ModelConfigRequest, pb.ModelConfigResponse),
            "ServerLive": unary(
                lambda r, c: pb.ServerLiveResponse(live=True), pb.ServerLiveRequest, pb.ServerLiveResponse
            ),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", methods),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def test_the_fuzzer_catches_malformed_answers_unknown_statuses_and_a_dead_server():
    broken = _BrokenServer()
    r = run_fuzz(
        f"127.0.0.1:{broken.port}", MODEL, 60, SEED, check_every=20, categories=["valid", "not_protobuf"]
    )
    assert r.malformed > 0 and r.malformed_examples
    assert r.totals.get("UNKNOWN", 0) > 0 and r.unexpected
    assert r.crashes == 0
    broken.server.stop(0).wait()
    with pytest.raises(grpc.RpcError):  # nothing listens: the model's config cannot even be read
        run_fuzz(f"127.0.0.1:{broken.port}", MODEL, 10, SEED)
