"""A KServe v2 endpoint that answers every ModelInfer at once with zero logits, computing nothing.

Two measurements need a server that costs (almost) nothing: the floor under every real server's
batch-1 latency (client + gRPC transport + a Python gRPC handler, no model), and the load
generator's own capacity (how many frames per second it sends on time when the server is never
the bottleneck), as perf_analyzer is checked against an empty model.

    python -m serving.bench.null_server --port 8011 --model efficientnet_lite0-int8-openvino
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
import time

import grpc
from tritonclient.grpc import service_pb2 as pb

from serving.edge.service import SERVICE, unary
from serving.errors import RtqError
from serving.settings import PROJECT_ROOT

NAME = "rtq-null"
CLASSES = 1000


class NullService:
    """Ready for `models`; ModelInfer answers logits of zeros, one row per image of the first input."""

    def __init__(self, models: list[str], classes: int = CLASSES):
        self.models = set(models)
        self.classes = classes
        self.answered = 0

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self.models)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=NAME, version="0", extensions=[])

    async def RepositoryIndex(self, request, context):
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(name=m, version="1", state="READY") for m in sorted(self.models)]
        )

    async def ModelInfer(self, request, context):
        if request.model_name not in self.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name!r}")
        self.answered += 1
        return null_response(request, self.classes)


def null_response(request: pb.ModelInferRequest, classes: int = CLASSES) -> pb.ModelInferResponse:
    """Zero FP32 logits for as many images as the first input's first dimension holds."""
    batch = int(request.inputs[0].shape[0]) if request.inputs and request.inputs[0].shape else 1
    response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
    out = response.outputs.add()
    out.name, out.datatype = "logits", "FP32"
    out.shape.extend([batch, classes])
    response.raw_output_contents.append(bytes(4 * batch * classes))
    return response


def _handler(service: NullService) -> grpc.GenericRpcHandler:
    methods = {
        "ServerLive": unary(service.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": unary(service.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": unary(service.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": unary(service.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "RepositoryIndex": unary(
            service.RepositoryIndex, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse
        ),
        "ModelInfer": unary(service.ModelInfer, pb.ModelInferRequest, pb.ModelInferResponse),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


async def serve(host: str, port: int, models: list[str]) -> None:
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    )
    server.add_generic_rpc_handlers((_handler(NullService(models)),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"null server on {host}:{bound}", flush=True)
    await stop.wait()
    await server.stop(1)


def start(models: list[str], timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """This server in a process of its own on a free loopback port, once it answers ServerReady."""
    import tritonclient.grpc as grpcclient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "serving.bench.null_server", "--port", str(port)]
    for m in models:
        cmd += ["--model", m]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"127.0.0.1:{port}"
    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RtqError(f"the null server exited with code {proc.returncode}")
            try:
                if client.is_server_ready(client_timeout=2):
                    return proc, url
            except Exception:  # noqa: BLE001, S110 - not listening yet
                pass
            time.sleep(0.2)
        stop(proc)
        raise RtqError(f"the null server did not come up on {url} within {timeout:.0f} s")
    finally:
        client.close()


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8011, help="gRPC port (0: any free one, printed)")
    ap.add_argument("--model", action="append", required=True, help="a model name to answer for (repeatable)")
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        ap.error(f"--port must be 0-65535, got {args.port}")
    asyncio.run(serve(args.host, args.port, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
