"""`inference.GRPCInferenceService` (KServe v2, Triton's dialect) on grpc.aio, using tritonclient's protobufs.

The event loop only checks and converts tensors; models compute on their own instance threads
(serving/edge/batching.py), and image decoding runs in a small thread pool, so one busy model
never stalls requests to another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from serving import __version__ as rtq_version
from serving.edge.auth import TokenCheck
from serving.edge.batching import CannotMeetDeadline, Expired, ModelStopped, Pending, QueueFull
from serving.edge.metrics import UNKNOWN, EdgeMetrics
from serving.edge.models import ServedModel
from serving.edge.shared_memory import BYTE_SIZE, REGION, SharedMemoryRegions, Slice, tensor_slice
from serving.edge.tensors import (
    Refused,
    RequestError,
    classification,
    decode_images,
    image_bytes,
    invalid,
    join_bytes,
    numeric_input,
    parse_labels,
    shown,
)

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "rtq-edge"
EXTENSIONS = ("classification", "model_repository", "statistics")
_NOT_FOUND = grpc.StatusCode.NOT_FOUND
log = logging.getLogger(__name__)


class InferenceService:
    def __init__(
        self,
        models: dict[str, ServedModel],
        metrics: EdgeMetrics,
        token: TokenCheck,
        max_message_bytes: int,
        decode_threads: int = 2,
        shared_memory: SharedMemoryRegions | None = None,
    ):
        self.models = models
        self.shm = shared_memory if shared_memory is not None else SharedMemoryRegions()
        self.metrics = metrics
        self.token = token
        self.max_message_bytes = max_message_bytes
        self.loading_done = False
        self.draining = False
        self._decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")

    # -- helpers -------------------------------------------------------------------------------
    def _model(self, name: str, version: str, need_ready: bool = True) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise RequestError(_NOT_FOUND, f"unknown model '{shown(name)}'; this server has: {known}")
        if version not in ("", served.version):
            raise RequestError(
                _NOT_FOUND,
                f"unknown version '{shown(version)}' of model '{name}'; available: {served.version}",
            )
        if need_ready and not served.ready:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"model '{name}' is not ready: {served.reason}")
        return served

    async def _guard(self, context, fn):
        """Run a non-inference RPC: token check first, RequestError -> gRPC status."""
        try:
            self.token.check(context.invocation_metadata())
            return fn()
        except RequestError as exc:
            await context.abort(exc.code, exc.message)

    # -- health and metadata ---------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return await self._guard(context, lambda: pb.ServerLiveResponse(live=True))

    async def ServerReady(self, request, context):
        def ready():
            ok = self.loading_done and not self.draining and any(m.ready for m in self.models.values())
            return pb.ServerReadyResponse(ready=ok)

        return await self._guard(context, ready)

    async def ModelReady(self, request, context):
        def ready():
            served = self.models.get(request.name)
            ok = served is not None and served.ready and request.version in ("", served.version)
            return pb.ModelReadyResponse(ready=ok)

        return await self._guard(context, ready)

    async def ServerMetadata(self, request, context):
        return await self._guard(
            context,
            lambda: pb.ServerMetadataResponse(
                name=SERVER_NAME,
                version=rtq_version,
                extensions=[*EXTENSIONS, *(["system_shared_memory"] if self.shm.enabled else [])],
            ),
        )

    # -- system shared memory (serving/edge/shared_memory.py) --------------------------------------
    async def SystemSharedMemoryRegister(self, request, context):
        def register():
            self.shm.register(request.name, request.key, request.offset, request.byte_size)
            return pb.SystemSharedMemoryRegisterResponse()

        return await self._guard(context, register)

    async def SystemSharedMemoryUnregister(self, request, context):
        def unregister():
            self.shm.unregister(request.name)
            return pb.SystemSharedMemoryUnregisterResponse()

        return await self._guard(context, unregister)

    async def SystemSharedMemoryStatus(self, request, context):
        def status():
            response = pb.SystemSharedMemoryStatusResponse()
            for r in self.shm.status(request.name):
                response.regions[r.name].CopyFrom(
                    pb.SystemSharedMemoryStatusResponse.RegionStatus(
                        name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
                    )
                )
            return response

        return await self._guard(context, status)

    async def ModelMetadata(self, request, context):
        def metadata():
            served = self._model(request.name, request.version)
            cfg = served.config
            resp = pb.ModelMetadataResponse(
                name=served.name,
                versions=[served.version],
                platform=cfg.platform or cfg.backend or served.labels[2],
            )
            batch = [-1] if cfg.max_batch_size > 0 else []
            for t in cfg.input:
                resp.inputs.add(name=t.name, datatype="FP32", shape=batch + list(t.dims))
            for t in cfg.output:
                resp.outputs.add(name=t.name, datatype="FP32", shape=batch + list(t.dims))
            return resp

        return await self._guard(context, metadata)

    async def ModelConfig(self, request, context):
        def config():
            served = self._model(request.name, request.version, need_ready=False)
            if served.config is None:
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"model '{served.name}' has no readable config: {served.reason}",
                )
            return pb.ModelConfigResponse(config=served.config)

        return await self._guard(context, config)

    async def RepositoryIndex(self, request, context):
        def index():
            resp = pb.RepositoryIndexResponse()
            for name in sorted(self.models):
                m = self.models[name]
                if request.ready and not m.ready:
                    continue
                state = "READY" if m.ready else ("LOADING" if m.reason == "loading" else "UNAVAILABLE")
                resp.models.add(name=name, version=m.version, state=state, reason=m.reason)
            return resp

        return await self._guard(context, index)

    async def ModelStatistics(self, request, context):
        def statistics():
            if request.name:
                chosen = [self._model(request.name, request.version, need_ready=False)]
            else:
                chosen = [self.models[n] for n in sorted(self.models)]
            resp = pb.ModelStatisticsResponse()
            for m in chosen:
                s = m.stats
                with s.lock:
                    ms = resp.model_stats.add(
                        name=m.name,
                        version=m.version,
                        last_inference=s.last_inference_ms,
                        inference_count=s.inference_count,
                        execution_count=s.execution_count,
                    )
                    st = ms.inference_stats
                    st.success.count, st.success.ns = s.success_count, s.success_ns
                    st.fail.count, st.fail.ns = s.fail_count, s.fail_ns
                    st.queue.count, st.queue.ns = s.queue_count, s.queue_ns
                    st.compute_infer.count, st.compute_infer.ns = s.infer_count, s.infer_ns
            return resp

        return await self._guard(context, statistics)

    # -- inference -------------------------------------------------------------------------------
    async def ModelInfer(self, raw: bytes, context):
        start = time.monotonic()
        remaining = context.time_remaining()
        deadline = None if remaining is None else start + remaining
        served: ServedModel | None = None
        labels = UNKNOWN
        inflight = None
        # Recorded before the status goes out, so a scrape right after any answer already counts it.
        code: grpc.StatusCode | None = None
        try:
            self.token.check(context.invocation_metadata())
            if len(raw) > self.max_message_bytes:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"request of {len(raw)} bytes is above this server's limit of "
                    f"{self.max_message_bytes} bytes; send fewer images per request",
                )
            try:
                request = pb.ModelInferRequest.FromString(raw)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError type varies by implementation
                raise invalid("request is not a valid ModelInferRequest message") from None
            known = self.models.get(request.model_name)
            if known is not None:  # count failures of a known model (e.g. bad version) under its labels
                labels = known.labels
            served = self._model(request.model_name, request.model_version)
            labels = served.labels
            inflight = self.metrics.inflight.labels(*labels)
            inflight.inc()
            response = await self._infer(served, request, deadline, start)
            code = grpc.StatusCode.OK
            self._record(served, labels, code, start, inflight)
            return response
        except RequestError as exc:
            code = exc.code
            self._record(served, labels, code, start, inflight)
            try:
                await context.abort(exc.code, exc.message)
            finally:  # abort returns (raising) once the status is on its way: that is the refusal time
                if isinstance(exc, Refused):
                    self.metrics.refusal_seconds.labels(*labels, code.name).observe(time.monotonic() - start)
        except asyncio.CancelledError:
            # gRPC cancels the handler when the client's deadline passes or the client goes away.
            expired = deadline is not None and time.monotonic() >= deadline - 0.002
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            self._record(served, labels, code, start, inflight)
            raise
        except Exception as exc:  # noqa: BLE001 - a bug of ours: still a clear status, never UNKNOWN
            if code is not None:  # failed after the answer was recorded (serializing it)
                raise
            code = grpc.StatusCode.INTERNAL
            self._record(served, labels, code, start, inflight)
            log.exception("ModelInfer failed")
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            await context.abort(code, f"internal error: {type(exc).__name__}: {first}")

    def _record(
        self, served: ServedModel | None, labels, code: grpc.StatusCode, start: float, inflight
    ) -> None:
        if inflight is not None:
            inflight.dec()
        self.metrics.count(labels, code.name)
        if served is None:
            return
        elapsed = time.monotonic() - start
        self.metrics.request_seconds.labels(*labels).observe(elapsed)
        with served.stats.lock:
            if code == grpc.StatusCode.OK:
                served.stats.success_count += 1
                served.stats.success_ns += int(elapsed * 1e9)
            else:
                served.stats.fail_count += 1
                served.stats.fail_ns += int(elapsed * 1e9)

    async def _infer(self, served: ServedModel, request, deadline: float | None, start: float):
        cfg = served.config
        names = [t.name for t in request.inputs]
        if served.input_name not in names or len(names) != 1:
            listed = [shown(n) for n in names[:4]] + (["..."] if len(names) > 4 else [])
            raise invalid(
                f"model '{served.name}' takes exactly one input '{served.input_name}'; "
                f"request has {listed or 'none'}"
            )
        tensor = request.inputs[0]
        raws = request.raw_input_contents
        if raws and len(raws) != len(request.inputs):
            raise invalid(f"{len(raws)} raw_input_contents for {len(request.inputs)} inputs")
        raw = raws[0] if raws else None
        if raw is not None and tensor.contents.ByteSize():
            raise invalid(f"input '{tensor.name}': both raw_input_contents and typed contents; send one")
        in_shm = tensor_slice(tensor.parameters, f"input '{tensor.name}'")
        if in_shm is not None:
            if raw is not None or tensor.contents.ByteSize():
                raise invalid(f"input '{tensor.name}': both shared memory and data in the request; send one")
            if in_shm.byte_size > self.max_message_bytes:  # the same bound as a request's own bytes
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"input '{tensor.name}': {in_shm.byte_size} bytes of shared memory is above this "
                    f"server's limit of {self.max_message_bytes} bytes; send fewer images per request",
                )
            raw = self.shm.read(in_shm, f"input '{tensor.name}'")
        max_batch = max(1, cfg.max_batch_size)
        if tensor.datatype in ("FP32", "UINT8"):
            batch = numeric_input(tensor, raw, served.image_shape, max_batch)
        elif tensor.datatype == "BYTES":
            images = image_bytes(tensor, raw, max_batch)
            loop = asyncio.get_running_loop()
            batch = await loop.run_in_executor(
                self._decode_pool, decode_images, images, served.preprocessing, tensor.name
            )
        else:
            raise invalid(
                f"input '{tensor.name}': datatype {shown(tensor.datatype) or 'missing'} is not "
                "supported; send FP32 or UINT8 [N, 3, H, W] tensors or BYTES encoded images"
            )
        n = int(batch.shape[0])
        truth = parse_labels(request.parameters["label"], n) if "label" in request.parameters else None
        outputs = self._requested_outputs(served, request)

        if deadline is not None and time.monotonic() >= deadline:
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the request was queued")
        prepare = served.normalize if batch.dtype == np.uint8 else None
        logits = await self._submit(served, batch, deadline, start, prepare)

        if truth is not None:
            top1 = logits.argmax(axis=1)
            self.metrics.labelled.labels(*served.labels).inc(n)
            self.metrics.correct.labels(*served.labels).inc(int(np.sum(top1 == np.asarray(truth))))
        response = pb.ModelInferResponse(model_name=served.name, model_version=served.version, id=request.id)
        for name, k, out_shm in outputs:
            if k:
                data = join_bytes(classification(logits, k, served.class_names))
                out = response.outputs.add(name=name, datatype="BYTES", shape=[n, min(k, logits.shape[1])])
            else:
                data = np.ascontiguousarray(logits, dtype="<f4").tobytes()
                out = response.outputs.add(name=name, datatype="FP32", shape=list(logits.shape))
            if out_shm is None:
                response.raw_output_contents.append(data)
                continue
            self.shm.write(out_shm, data, f"output '{name}'")
            out.parameters[REGION].string_param = out_shm.region
            out.parameters[BYTE_SIZE].int64_param = len(data)
            response.raw_output_contents.append(b"")  # one entry per output keeps the others in place
        return response

    def _requested_outputs(self, served: ServedModel, request) -> list[tuple[str, int, Slice | None]]:
        """(name, top-k or 0 for raw logits, shared memory slice or None) per requested output; all
        outputs as logits in the response by default. A bad slice fails here, before compute."""
        known = [o.name for o in served.config.output]
        if not request.outputs:
            return [(n, 0, None) for n in known]
        chosen = []
        for out in request.outputs:
            if out.name not in known:
                raise invalid(f"unknown output '{shown(out.name)}'; model '{served.name}' has {known}")
            k = 0
            if "classification" in out.parameters:
                k = int(out.parameters["classification"].int64_param)
                if k < 1:
                    raise invalid(f"output '{out.name}': classification count must be >= 1, got {k}")
            where = tensor_slice(out.parameters, f"output '{out.name}'")
            if where is not None:
                self.shm.check(where, f"output '{out.name}'")
            chosen.append((out.name, k, where))
        return chosen

    async def _submit(
        self,
        served: ServedModel,
        batch: np.ndarray,
        deadline: float | None,
        start: float,
        prepare: Callable[[np.ndarray], np.ndarray] | None,
    ):
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(result, exc) -> None:
            if not future.done():
                if exc is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(result)

        def done(result, exc) -> None:  # called on an instance thread
            loop.call_soon_threadsafe(settle, result, exc)

        try:
            served.batcher.submit(Pending(batch, deadline, done, prepare=prepare))
        except CannotMeetDeadline:
            raise Refused(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "cannot meet the deadline: the work queued ahead takes longer; refused on arrival",
            ) from None
        except QueueFull:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model '{served.name}' queue is full ({served.batcher.policy.max_queue_size} "
                "requests); retry with backoff or add instances",
            ) from None
        except ModelStopped:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "server is shutting down") from None
        try:
            return await future
        except Expired:
            waited = 1000 * (time.monotonic() - start)
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline passed after {waited:.1f} ms in the queue; dropped before compute",
            ) from None
        except ModelStopped:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down") from None
        except RequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - runtime failure of this batch
            raise RequestError(
                grpc.StatusCode.INTERNAL, f"inference failed: {str(exc).strip().splitlines()[0][:200]}"
            ) from None

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self.shm.close()


def unary(fn, req, resp) -> grpc.RpcMethodHandler:
    """A unary method that takes and answers the given protobuf messages."""
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
    )


def generic_handler(service: InferenceService) -> grpc.GenericRpcHandler:
    """Method table for the service. ModelInfer takes raw bytes so the size limit is ours to answer."""
    methods = {
        "ServerLive": unary(service.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": unary(service.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": unary(service.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": unary(service.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": unary(service.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelConfig": unary(service.ModelConfig, pb.ModelConfigRequest, pb.ModelConfigResponse),
        "ModelStatistics": unary(
            service.ModelStatistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse
        ),
        "RepositoryIndex": unary(
            service.RepositoryIndex, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse
        ),
        "SystemSharedMemoryRegister": unary(
            service.SystemSharedMemoryRegister,
            pb.SystemSharedMemoryRegisterRequest,
            pb.SystemSharedMemoryRegisterResponse,
        ),
        "SystemSharedMemoryUnregister": unary(
            service.SystemSharedMemoryUnregister,
            pb.SystemSharedMemoryUnregisterRequest,
            pb.SystemSharedMemoryUnregisterResponse,
        ),
        "SystemSharedMemoryStatus": unary(
            service.SystemSharedMemoryStatus,
            pb.SystemSharedMemoryStatusRequest,
            pb.SystemSharedMemoryStatusResponse,
        ),
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            service.ModelInfer,
            request_deserializer=None,
            response_serializer=pb.ModelInferResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)
