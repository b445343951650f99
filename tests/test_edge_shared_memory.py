"""Triton's system shared memory extension on the edge server, through tritonclient's own shm helpers."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from serving.edge.server import EdgeConfig, EdgeServer

ORT = "efficientnet_lite0-int8-onnxruntime"
FRAME = (1, 3, 224, 224)
FRAME_BYTES = 4 * int(np.prod(FRAME))
LOGITS_BYTES = 4 * 1000


@pytest.fixture(scope="module")
def server(small_repository: Path):
    srv = EdgeServer(EdgeConfig(small_repository, grpc_port=0, metrics_port=0, models=[ORT])).start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server: EdgeServer):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture()
def region():
    """A /dev/shm object holding two frames then room for two logits rows; unlinked afterwards."""
    key = f"/rtq-test-{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region("frames", key, 2 * FRAME_BYTES + 2 * LOGITS_BYTES)
    yield key, handle
    shm.destroy_shared_memory_region(handle)


def frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, *FRAME[1:]), dtype=np.float32)


def shm_input(offset: int) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("input", list(FRAME), "FP32")
    inp.set_shared_memory("frames", FRAME_BYTES, offset=offset)
    return inp


def plain_logits(client, x: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(ORT, [inp]).as_numpy("logits")


def test_frames_in_shared_memory_give_the_same_logits_as_in_the_request(server, client, region):
    key, handle = region
    assert "system_shared_memory" in client.get_server_metadata().extensions
    client.register_system_shared_memory("frames", key, 2 * FRAME_BYTES + 2 * LOGITS_BYTES)
    status = client.get_system_shared_memory_status().regions["frames"]
    assert (status.key, status.byte_size) == (key, 2 * FRAME_BYTES + 2 * LOGITS_BYTES)
    x = frames(0)
    shm.set_shared_memory_region(handle, [x])
    expected = [plain_logits(client, x[i : i + 1]) for i in (0, 1)]

    # Input and output through shared memory: the response carries neither.
    out = grpcclient.InferRequestedOutput("logits")
    out.set_shared_memory("frames", LOGITS_BYTES, offset=2 * FRAME_BYTES + LOGITS_BYTES)
    result = client.infer(ORT, [shm_input(FRAME_BYTES)], outputs=[out])
    assert result.get_response().ByteSize() < 400
    written = shm.get_contents_as_numpy(handle, np.float32, [2 * FRAME_BYTES // 4 + 2 * 1000])
    np.testing.assert_array_equal(written[-1000:].reshape(1, 1000), expected[1])

    # Input through shared memory, logits in the response; the client rewrites the frame between calls.
    np.testing.assert_array_equal(client.infer(ORT, [shm_input(0)]).as_numpy("logits"), expected[0])
    shm.set_shared_memory_region(handle, [x[1:]], offset=0)
    np.testing.assert_array_equal(client.infer(ORT, [shm_input(0)]).as_numpy("logits"), expected[1])

    client.unregister_system_shared_memory("frames")
    with pytest.raises(InferenceServerException, match="unknown shared memory region 'frames'"):
        client.infer(ORT, [shm_input(0)])
    assert client.get_system_shared_memory_status().regions == {}
    np.testing.assert_array_equal(plain_logits(client, x[:1]), expected[0])  # still serving


def test_bad_registrations_and_slices_are_clear_errors_and_nothing_else_changes(
    server, client, region, tmp_path
):
    key, handle = region
    size = 2 * FRAME_BYTES + 2 * LOGITS_BYTES
    for name, bad_key, offset, byte_size, message in [
        ("a", "/../etc/passwd", 0, 16, "must name an object directly in /dev/shm"),
        ("a", "/dev/shm/x", 0, 16, "must name an object directly in /dev/shm"),
        ("a", "/rtq-no-such-object", 0, 16, "no shared memory object"),
        ("a", key, size - 8, 16, "past its end"),
        ("", key, 0, 16, "needs a name"),
    ]:
        with pytest.raises(InferenceServerException, match=message):
            client.register_system_shared_memory(name, bad_key, byte_size, offset=offset)
    # A symlink in /dev/shm is not followed (it could point anywhere the server may write).
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 64)
    link = Path("/dev/shm") / f"rtq-link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(target)
    try:
        with pytest.raises(InferenceServerException, match="cannot open shared memory object"):
            client.register_system_shared_memory("a", "/" + link.name, 16)
    finally:
        link.unlink()
    assert client.get_system_shared_memory_status().regions == {}

    client.register_system_shared_memory("frames", key, size)
    with pytest.raises(InferenceServerException, match="already registered"):
        client.register_system_shared_memory("frames", key, size)
    x = frames(1)
    shm.set_shared_memory_region(handle, [x])
    inp = grpcclient.InferInput("input", list(FRAME), "FP32")
    inp.set_shared_memory("frames", FRAME_BYTES, offset=size - 16)
    with pytest.raises(InferenceServerException, match="past the end of shared memory region 'frames'"):
        client.infer(ORT, [inp])
    inp.set_shared_memory("frames", FRAME_BYTES // 2)  # half a frame for a whole frame's shape
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
        client.infer(ORT, [inp])
    out = grpcclient.InferRequestedOutput("logits")
    out.set_shared_memory("frames", LOGITS_BYTES // 2)  # too small for the logits
    with pytest.raises(InferenceServerException, match="holds 2000"):
        client.infer(ORT, [shm_input(0)], outputs=[out])
    out.set_shared_memory("nope", LOGITS_BYTES)  # unknown: refused before compute
    with pytest.raises(InferenceServerException, match="unknown shared memory region 'nope'"):
        client.infer(ORT, [shm_input(0)], outputs=[out])
    both = grpcclient.InferInput("input", list(FRAME), "FP32")
    both.set_data_from_numpy(x[:1])
    both._input.parameters["shared_memory_region"].string_param = "frames"
    both._input.parameters["shared_memory_byte_size"].int64_param = FRAME_BYTES
    with pytest.raises(InferenceServerException, match="both shared memory and data"):
        client.infer(ORT, [both])
    np.testing.assert_array_equal(
        client.infer(ORT, [shm_input(0)]).as_numpy("logits"), plain_logits(client, x[:1])
    )
    # Shared memory does not get around the message size limit (32 MiB here).
    big_key = f"/rtq-test-big-{uuid.uuid4().hex[:8]}"
    big = shm.create_shared_memory_region("big", big_key, 40 << 20)
    try:
        client.register_system_shared_memory("big", big_key, 40 << 20)
        huge = grpcclient.InferInput("input", [56, 3, 224, 224], "FP32")
        huge.set_shared_memory("big", 56 * FRAME_BYTES)
        with pytest.raises(InferenceServerException, match="above this server's limit"):
            client.infer(ORT, [huge])
        client.unregister_system_shared_memory("big")
    finally:
        shm.destroy_shared_memory_region(big)
    # The client truncates its object while registered: an error, not SIGBUS in the server.
    os.truncate("/dev/shm/" + key.lstrip("/"), FRAME_BYTES // 2)
    with pytest.raises(InferenceServerException, match="was truncated"):
        client.infer(ORT, [shm_input(0)])
    assert client.is_server_live()


def test_shared_memory_can_be_turned_off(small_repository: Path, region):
    key, _ = region
    srv = EdgeServer(
        EdgeConfig(small_repository, grpc_port=0, metrics_port=0, models=[ORT], shared_memory=False)
    ).start()
    try:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        assert "system_shared_memory" not in c.get_server_metadata().extensions
        with pytest.raises(InferenceServerException, match="shared memory is turned off"):
            c.register_system_shared_memory("frames", key, 64)
        with pytest.raises(InferenceServerException, match="shared memory is turned off"):
            c.infer(ORT, [shm_input(0)])
        c.close()
    finally:
        srv.stop()
    assert os.path.exists("/dev/shm/" + key.lstrip("/"))  # the server never unlinks a client's object
