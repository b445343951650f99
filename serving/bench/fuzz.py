"""Fuzzing ModelInfer: seeded hostile requests sent as raw gRPC messages to the edge server or Triton.

Every case is generated from (seed, index) alone, so a run is reproducible, a failing case can be
rebuilt from its index, and two servers fuzzed with the same seed see byte-identical requests
(`compare` lines them up case by case). Requests are serialized here and sent through an identity
serializer, so nothing on the client side (tritonclient's checks, protobuf's) filters them; some
payloads are not protobufs at all.

Public entry points:
  run_fuzz(target, model, count, seed, pid, ...) -> FuzzResult
  compare(edge, triton) -> list[DiffRow]        (cases both runs sent, grouped by their two codes)
  fuzz_table_markdown(results, diffs)  -> str   (per-category status counts, then the differences)
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import random
import struct
import time
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np
from PIL import Image
from tritonclient.grpc import service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
LIVE_METHOD = "/inference.GRPCInferenceService/ServerLive"
OK = "OK"

# Per block of 50 cases; "oversize" is rare because each one moves tens of MiB over loopback.
WEIGHTS = {
    "valid": 3,
    "shape": 6,
    "datatype": 4,
    "byte_count": 6,
    "names": 5,
    "model": 3,
    "parameters": 5,
    "bytes_payload": 7,
    "image_bomb": 4,
    "not_protobuf": 6,
    "oversize": 1,
}
CATEGORIES = tuple(WEIGHTS)
# What the edge server may answer per category: a refusal of the right class, or OK where the case
# is a valid request (or may have stayed one after a mutation).
_INVALID = frozenset({"INVALID_ARGUMENT"})
EXPECTED: dict[str, frozenset[str]] = {
    "valid": frozenset({OK}),
    "shape": _INVALID,
    "datatype": _INVALID,
    "byte_count": _INVALID,
    "names": _INVALID,
    "model": frozenset({"NOT_FOUND"}),
    "parameters": frozenset({OK, "INVALID_ARGUMENT"}),
    "bytes_payload": frozenset({OK, "INVALID_ARGUMENT"}),
    "image_bomb": _INVALID,
    "not_protobuf": frozenset({OK, "INVALID_ARGUMENT", "NOT_FOUND"}),
    "oversize": frozenset({"RESOURCE_EXHAUSTED"}),
}

_ITEMSIZE = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
}
_I64_MAX = 2**63 - 1


@dataclass(frozen=True)
class ModelInfo:
    """What the generator needs to know about the model: read from the server's ModelConfig."""

    name: str
    input_name: str
    dims: tuple[int, ...]  # without the batch dimension
    max_batch: int
    outputs: tuple[str, ...]

    @property
    def image_bytes(self) -> int:
        return 4 * math.prod(self.dims)


@dataclass(frozen=True)
class Case:
    index: int
    category: str
    note: str  # one line saying what is hostile about it
    payload: bytes  # exactly what goes on the wire
    expect: frozenset[str] | None = None  # codes the edge server may answer; None: EXPECTED[category]

    @property
    def allowed(self) -> frozenset[str]:
        return self.expect if self.expect is not None else EXPECTED[self.category]


@dataclass
class CaseResult:
    index: int
    category: str
    note: str
    code: str  # gRPC status code name, "OK" for an answer
    detail: str
    seconds: float
    expected: bool  # the code is in EXPECTED[category] (the edge server's contract)


@dataclass
class FuzzResult:
    target: str
    model: str
    seed: int
    count: int  # cases asked for
    sent: int = 0
    wall_s: float = 0.0
    crashes: int = 0  # 1 when the server stopped answering ServerLive (or its process died)
    crash_reason: str = ""
    malformed: int = 0  # replies that are not a ModelInferResponse, or outputs with the wrong byte count
    malformed_examples: list[str] = field(default_factory=list)
    rss_before_mb: float | None = None
    rss_peak_mb: float | None = None
    rss_after_mb: float | None = None
    live_checks: int = 0
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def codes(self) -> dict[str, dict[str, int]]:
        """category -> status code -> cases."""
        out: dict[str, Counter] = defaultdict(Counter)
        for c in self.cases:
            out[c.category][c.code] += 1
        return {cat: dict(out[cat].most_common()) for cat in CATEGORIES if cat in out}

    @property
    def totals(self) -> dict[str, int]:
        return dict(Counter(c.code for c in self.cases).most_common())

    @property
    def unexpected(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.expected]

    @property
    def rss_growth_mb(self) -> float | None:
        if self.rss_before_mb is None or self.rss_after_mb is None:
            return None
        return self.rss_after_mb - self.rss_before_mb

    def slowest(self) -> dict[str, float]:
        """category -> slowest answer, seconds (a refusal should be fast; a hang shows here)."""
        out: dict[str, float] = {}
        for c in self.cases:
            out[c.category] = max(out.get(c.category, 0.0), c.seconds)
        return out

    def to_dict(self, with_cases: bool = False) -> dict:
        d = asdict(self)
        if not with_cases:
            d.pop("cases")
        d.update(
            codes=self.codes,
            totals=self.totals,
            unexpected=len(self.unexpected),
            rss_growth_mb=self.rss_growth_mb,
            slowest_s=self.slowest(),
        )
        return d


# -- images ----------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, idat: bytes | None = None, extra: Sequence[bytes] = ()) -> bytes:
    """A grayscale PNG written by hand, so the header may declare any size. Without `idat`, the pixel
    data are real (all zero) and compress to almost nothing: a bomb if the size is large."""
    if idat is None:
        z = zlib.compressobj(9)
        row = bytes(width + 1)  # filter byte + one byte per pixel
        # Repeating one compressed row keeps a 40-Mpixel image cheap to build.
        parts, left = [], height
        while left:
            k = min(left, 4096)
            parts.append(z.compress(row * k))
            left -= k
        idat = b"".join(parts) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"".join(
        [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header), *extra, _chunk(b"IDAT", idat), _chunk(b"IEND", b"")]
    )


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header (SOF0/SOF2) of a real JPEG to declare another size."""
    out = bytearray(jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = out.find(marker)
        if at >= 0:
            struct.pack_into(">HH", out, at + 5, height, width)
            return bytes(out)
    raise ValueError("no SOF0/SOF2 marker")


class _Images:
    """Seeded pools of real and hostile encoded images, built once per generator."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.good: list[bytes] = []
        for w, h in ((32, 24), (64, 64), (97, 41), (300, 200)):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(pixels, "RGB")
            self.good += [_encode(img, "JPEG", quality=80), _encode(img, "PNG")]
        gray = Image.fromarray(rng.integers(0, 256, (50, 60), dtype=np.uint8), "L")
        self.good += [_encode(gray, "PNG"), _encode(gray, "JPEG", progressive=True)]
        palette = Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8), "RGB").quantize(16)
        self.good.append(_encode(palette, "PNG"))
        base_jpeg = self.good[2]
        small_idat = zlib.compress(bytes(1000))
        text_bomb = _chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(bytes(16 * 1024 * 1024), 9))
        # (what, bytes, may it be decoded): all but one are refused before any pixel is decoded.
        self.bombs: list[tuple[str, bytes, bool]] = [
            ("PNG declaring 60000x60000, 1 KB of data", png_bytes(60000, 60000, small_idat), False),
            ("PNG declaring 65535x65535", png_bytes(65535, 65535, small_idat), False),
            ("PNG 7000x6000 of real zeros (42 Mpixel, compresses to ~40 KB)", png_bytes(7000, 6000), False),
            ("PNG 10000x10000 header, truncated data", png_bytes(10000, 10000, small_idat), False),
            ("PNG 1x100000 (extreme aspect ratio)", png_bytes(1, 100000), False),
            ("PNG 100000x1 (extreme aspect ratio)", png_bytes(100000, 1), False),
            ("PNG 2x1000000 (extreme aspect ratio)", png_bytes(2, 1_000_000), False),
            ("PNG with a 16 MiB zTXt text bomb", png_bytes(16, 16, extra=[text_bomb]), False),
            ("PNG declaring 0x0", png_bytes(0, 0, small_idat), False),
            ("JPEG declaring 65500x65500", jpeg_with_size(base_jpeg, 65500, 65500), False),
            ("JPEG declaring 8000x6000 (48 Mpixel)", jpeg_with_size(base_jpeg, 8000, 6000), False),
            ("JPEG declaring 6000x6000, 6 KB of scan data", jpeg_with_size(base_jpeg, 6000, 6000), True),
            ("JPEG declaring 1x60000", jpeg_with_size(base_jpeg, 1, 60000), False),
            ("JPEG declaring 0x0", jpeg_with_size(base_jpeg, 0, 0), False),
        ]
        # Other formats PIL can parse: not what the edge server takes, and each a parser to attack.
        tiny = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "RGB")
        self.other: list[tuple[str, bytes]] = [
            (fmt, _encode(tiny, fmt)) for fmt in ("GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM", "TGA")
        ]
        self.other += [
            ("EPS header", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100000 100000\n"),
            ("PSD header", b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 3, 60000, 60000, 8, 3)),
        ]


@functools.lru_cache(maxsize=4)
def _images(seed: int) -> _Images:
    return _Images(seed)


# -- the generator ---------------------------------------------------------------------------------
_DATATYPES = [
    "BOOL",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "BF16",
    "FP64",
    "",
    "fp32",
    "FLOAT",
    "FP32 ",
    " FP32",
    "FP32\x00",
    "TYPE_FP32",
    "STRING",
    "UINT8\n",
    "\u0424\u041f32",
    "A" * 10_000,
]
_BAD_NAMES = [
    "",
    "INPUT",
    "input ",
    "in put",
    "../input",
    "input\x00",
    "\x00",
    "\u202einput",
    "x" * 100_000,
    "input\nX-Injected: 1",
    "%s%s%s%n",
    "\ufffe",
]
_BAD_MODELS = [
    "",
    "resnet50",
    "../../../../etc/passwd",
    "..",
    ".",
    "/",
    "%2e%2e%2fetc",
    "m" * 100_000,
    "\x00",
    "name\nwith newline",
    "\u0000\u200b",
]
_BAD_VERSIONS = ["0", "2", "-1", "01", "1 ", "1\x00", "latest", "../1", "9" * 40, "1" * 10_000]
_HOSTILE_INTS = [0, -1, -2, 1, 2, 3, 224, 2**31 - 1, 2**31, 2**32 + 1, 2**62, _I64_MAX, -(2**63), -(2**31)]


def _param(rng: random.Random, p: pb.InferParameter) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        p.bool_param = rng.random() < 0.5
        return f"bool {p.bool_param}"
    if kind == 1:
        p.int64_param = rng.choice(_HOSTILE_INTS)
        return f"int64 {p.int64_param}"
    if kind == 2:
        p.uint64_param = rng.choice([0, 1, 2**63, 2**64 - 1])
        return f"uint64 {p.uint64_param}"
    if kind == 3:
        p.double_param = rng.choice([0.0, -1.5, math.inf, -math.inf, math.nan, 1e308])
        return f"double {p.double_param}"
    p.string_param = rng.choice(
        ["", "3", "3,7", "cat", "1," * 5000, "\x00", "-1", "1e5", "99999999999999999999"]
    )
    return f"string {p.string_param[:12]!r}"


class CaseGenerator:
    """Case i of a seed is always the same bytes (given the same model), whatever else was generated."""

    def __init__(self, model: ModelInfo, seed: int, max_message_bytes: int = 32 * 1024 * 1024):
        self.model = model
        self.seed = seed
        self.max_message_bytes = max_message_bytes
        self.images = _images(seed)
        schedule = [c for c, w in WEIGHTS.items() for _ in range(w)]
        random.Random(0).shuffle(schedule)
        self.schedule = schedule
        self._zeros = bytes(model.image_bytes * model.max_batch)
        self._builders: dict[str, Callable[[random.Random], tuple]] = {
            c: getattr(self, f"_{c}") for c in CATEGORIES
        }

    def case(self, index: int) -> Case:
        category = self.schedule[index % len(self.schedule)]
        rng = random.Random(self.seed * 1_000_003 + index)
        built = self._builders[category](rng)
        return Case(index, category, *built)

    def cases(self, count: int):
        return (self.case(i) for i in range(count))

    # -- helpers ---------------------------------------------------------------------------------
    def _request(self, model: str | None = None) -> pb.ModelInferRequest:
        return pb.ModelInferRequest(model_name=self.model.name if model is None else model)

    def _fp32(self, rng: random.Random, n: int = 1) -> tuple[pb.ModelInferRequest, str]:
        req = self._request()
        req.inputs.add(name=self.model.input_name, datatype="FP32", shape=[n, *self.model.dims])
        value = rng.choice([0.0, 0.5, -2.0, 1e30])
        if value == 0.0:
            raw = self._zeros[: n * self.model.image_bytes]
        else:
            raw = np.full((n, *self.model.dims), value, "<f4").tobytes()
        req.raw_input_contents.append(raw)
        return req, f"FP32 [{n}, ...] filled with {value}"

    def _bytes_request(self, items: Sequence[bytes], shape: list[int] | None = None) -> pb.ModelInferRequest:
        req = self._request()
        req.inputs.add(name=self.model.input_name, datatype="BYTES", shape=shape or [len(items)])
        req.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in items))
        return req

    # -- categories ------------------------------------------------------------------------------
    def _valid(self, rng: random.Random) -> tuple[str, bytes]:
        m = self.model
        kind = rng.randrange(6)
        n = rng.randint(1, min(2, m.max_batch))
        if kind == 0:
            req, note = self._fp32(rng, n)
        elif kind == 1:
            req = self._request()
            t = req.inputs.add(name=m.input_name, datatype="FP32", shape=[1, *m.dims])
            t.contents.fp32_contents.extend(np.zeros(math.prod(m.dims), np.float32))
            note = "FP32 typed fp32_contents"
        elif kind == 2:
            req = self._request()
            req.inputs.add(name=m.input_name, datatype="UINT8", shape=[n, *m.dims])
            req.raw_input_contents.append(bytes([rng.randrange(256)]) * (n * math.prod(m.dims)))
            note = f"UINT8 [{n}, ...] pixels"
        elif kind == 3:
            items = [rng.choice(self.images.good) for _ in range(n)]
            req = self._bytes_request(items, rng.choice([[n], [n, 1]]))
            note = f"BYTES {n} valid JPEG/PNG"
        elif kind == 4:
            req, note = self._fp32(rng, 1)
            k = rng.choice([1, 5, 1000, 5000])
            req.outputs.add(name=rng.choice(m.outputs)).parameters["classification"].int64_param = k
            note += f", top-{k} classification"
        else:
            req, note = self._fp32(rng, 1)
            req.id = rng.choice(["", "abc", "\u00e9\u00e8", "i" * 5000])
            req.outputs.add(name=m.outputs[0])
            note += f", id of {len(req.id)} chars, output named"
        return note, req.SerializeToString()

    def _shape(self, rng: random.Random) -> tuple[str, bytes]:
        m = self.model
        dims = list(m.dims)
        kind = rng.randrange(10)
        if kind == 0:
            shape: list[int] = []
        elif kind == 1:
            shape = [rng.choice(_HOSTILE_INTS)]
        elif kind == 2:  # hostile batch dimension
            shape = [rng.choice([0, -1, -(2**63), 2**62, _I64_MAX, m.max_batch + 1, 2**31]), *dims]
        elif kind == 3:  # one hostile image dimension
            shape = [1, *dims]
            shape[rng.randrange(1, len(shape))] = rng.choice(_HOSTILE_INTS[:2] + _HOSTILE_INTS[7:])
        elif kind == 4:
            shape = [1, *dims[:-1]]  # rank too low
        elif kind == 5:
            shape = [1, *dims, 1]  # rank too high
        elif kind == 6:
            shape = [1] * rng.choice([8, 64, 1000])
        elif kind == 7:
            shape = [1, *dims[1:], dims[0]]  # NHWC
        elif kind == 8:
            shape = [1, *dims]
            shape[rng.randrange(1, len(shape))] += rng.choice([-1, 1])
        else:
            shape = [rng.choice(_HOSTILE_INTS) for _ in range(rng.randint(2, 6))]
        raw = rng.choice([b"", self._zeros[: m.image_bytes], b"\0" * rng.randrange(1, 64)])
        req = self._request()
        req.inputs.add(name=m.input_name, datatype=rng.choice(["FP32", "FP32", "UINT8"]), shape=shape)
        req.raw_input_contents.append(raw)
        shown = shape if len(shape) <= 8 else f"[1] * {len(shape)}"
        return f"shape {shown} with {len(raw)} raw bytes", req.SerializeToString()

    def _datatype(self, rng: random.Random) -> tuple[str, bytes]:
        m = self.model
        dt = rng.choice(_DATATYPES)
        req = self._request()
        req.inputs.add(name=m.input_name, datatype=dt, shape=[1, *m.dims])
        # The byte count the datatype asks for, so only the datatype is wrong.
        req.raw_input_contents.append(bytes(_ITEMSIZE.get(dt, 4) * math.prod(m.dims)))
        return f"datatype {dt[:20]!r}", req.SerializeToString()

    def _byte_count(self, rng: random.Random) -> tuple[str, bytes]:
        m = self.model
        n = rng.randint(1, min(2, m.max_batch))
        dt = rng.choice(["FP32", "UINT8"])
        exact = n * math.prod(m.dims) * (4 if dt == "FP32" else 1)
        req = self._request()
        t = req.inputs.add(name=m.input_name, datatype=dt, shape=[n, *m.dims])
        kind = rng.randrange(6)
        if kind == 0:
            size = rng.choice([0, 1, exact - 1, exact + 1, exact // 2, exact * 2 if n == 1 else exact - 4])
            req.raw_input_contents.append(bytes(size))
            note = f"{dt} [{n}, ...] with {size} raw bytes (needs {exact})"
        elif kind == 1:
            count = rng.choice([0, 1, 10, exact // (4 if dt == "FP32" else 1) - 1])
            if dt == "FP32":
                t.contents.fp32_contents.extend([0.0] * count)
            else:
                t.contents.uint_contents.extend([0] * count)
            note = f"{dt} [{n}, ...] with {count} typed values"
        elif kind == 2:
            req.raw_input_contents.extend([bytes(exact), bytes(exact)])
            note = "two raw_input_contents for one input"
        elif kind == 3:
            note = "no contents at all"
        elif kind == 4:
            # Typed contents of the wrong type: int_contents for a FP32/UINT8 input.
            t.contents.int_contents.extend([0] * (exact // (4 if dt == "FP32" else 1)))
            note = f"{dt} [{n}, ...] with int_contents"
        else:
            # Both raw and typed contents: ambiguous, which one would be used?
            req.raw_input_contents.append(bytes(exact))
            t.contents.fp32_contents.extend([1.0] * 4)
            note = f"{dt} [{n}, ...] with raw and typed contents"
        return note, req.SerializeToString()

    def _names(self, rng: random.Random) -> tuple[str, bytes]:
        m = self.model
        kind = rng.randrange(6)
        if kind == 0:
            bad = rng.choice(_BAD_NAMES)
            req = self._request()
            req.inputs.add(name=bad, datatype="FP32", shape=[1, *m.dims])
            req.raw_input_contents.append(self._zeros[: m.image_bytes])
            note = f"input named {bad[:20]!r}"
        elif kind == 1:
            req, note = self._fp32(rng)
            extra = rng.choice([m.input_name, "extra"])
            req.inputs.add(name=extra, datatype="FP32", shape=[1, *m.dims])
            req.raw_input_contents.append(self._zeros[: m.image_bytes])
            note = f"second input {extra!r}"
        elif kind == 2:
            req = self._request()
            note = "no inputs"
        elif kind == 3:
            req, note = self._fp32(rng)
            bad = rng.choice(_BAD_NAMES)
            req.outputs.add(name=bad)
            note = f"output named {bad[:20]!r}"
        elif kind == 4:
            req, note = self._fp32(rng)
            for _ in range(rng.choice([2, 50])):
                req.outputs.add(name=rng.choice([*m.outputs, "nope"]))
            note = f"{len(req.outputs)} requested outputs, some unknown"
            if all(o.name in m.outputs for o in req.outputs):
                req.outputs.add(name="nope")
        else:
            req = self._request()
            for i in range(rng.choice([2, 100])):
                req.inputs.add(name=f"input{i}", datatype="FP32", shape=[1])
                req.raw_input_contents.append(b"\0\0\0\0")
            note = f"{len(req.inputs)} inputs, none named {m.input_name!r}"
        return note, req.SerializeToString()

    def _model(self, rng: random.Random) -> tuple[str, bytes]:
        req, note = self._fp32(rng)
        if rng.random() < 0.6:
            name = rng.choice(
                [*_BAD_MODELS, self.model.name.upper(), self.model.name + "/1", self.model.name[:-1]]
            )
            req.model_name = name
            note = f"model {name[:30]!r}"
        else:
            version = rng.choice(_BAD_VERSIONS)
            req.model_version = version
            note = f"version {version[:12]!r}"
        return note, req.SerializeToString()

    def _parameters(self, rng: random.Random) -> tuple[str, bytes]:
        m = self.model
        req, _ = self._fp32(rng)
        notes = []
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(4)
            if where == 0:
                key = rng.choice(
                    ["label", "label", "priority", "timeout", "sequence_id", "sequence_start", "x" * 300, ""]
                )
                notes.append(f"request {key[:12]}={_param(rng, req.parameters[key])}")
            elif where == 1:
                key = rng.choice(["classification", "binary_data", "shared_memory_region", "z"])
                out = req.outputs.add(name=m.outputs[0]) if not req.outputs else req.outputs[0]
                notes.append(f"output {key}={_param(rng, out.parameters[key])}")
            elif where == 2:
                key = rng.choice(["shared_memory_region", "shared_memory_byte_size", "binary_data_size", "q"])
                notes.append(f"input {key}={_param(rng, req.inputs[0].parameters[key])}")
            else:
                for i in range(rng.choice([100, 2000])):
                    req.parameters[f"p{i}"].int64_param = i
                notes.append(f"{len(req.parameters)} request parameters")
        return "; ".join(notes), req.SerializeToString()

    def _bytes_payload(self, rng: random.Random) -> tuple[str, bytes]:
        imgs = self.images
        n = rng.randint(1, min(3, self.model.max_batch))
        kind = rng.randrange(9)
        good = rng.choice(imgs.good)
        if kind == 0:
            cut = rng.randrange(len(good))
            items, note = [good[:cut]], f"image truncated to {cut} of {len(good)} bytes"
        elif kind == 1:
            b = bytearray(good)
            for _ in range(rng.randint(1, 16)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            items, note = [bytes(b)], "image with corrupt bytes"
        elif kind == 2:
            items = [rng.randbytes(rng.randrange(0, 2048))]
            note = f"{len(items[0])} random bytes"
        elif kind == 3:
            items, note = [good[: rng.choice([2, 3, 4, 8])]], "magic bytes only"
        elif kind == 4:
            fmt, data = rng.choice(imgs.other)
            items, note = [data], f"{fmt} image"
        elif kind == 5:
            items, note = [b""], "empty image"
        elif kind == 6:  # length prefixes that lie
            body = good
            prefix = rng.choice([len(body) + 1, 2**32 - 1, 2**31, len(body) - 1])
            req = self._request()
            req.inputs.add(name=self.model.input_name, datatype="BYTES", shape=[1])
            raw = struct.pack("<I", prefix) + body + rng.choice([b"", b"\x01", b"\x01\x02\x03"])
            req.raw_input_contents.append(raw)
            return f"BYTES length prefix {prefix} for {len(body)} bytes", req.SerializeToString()
        elif kind == 7:  # shape and element count disagree
            items = [good] * n
            shape = rng.choice([[n + 1], [n, 2], [n, 1, 1], [0], [-1], [2**40]])
            return f"{n} images for BYTES shape {shape}", self._bytes_request(
                items, shape
            ).SerializeToString()
        else:  # typed bytes_contents, some corrupt
            req = self._request()
            t = req.inputs.add(name=self.model.input_name, datatype="BYTES", shape=[n])
            for _ in range(n):
                t.contents.bytes_contents.append(rng.choice([good, good[: len(good) // 2], b"\xff\xd8"]))
            return f"{n} images in bytes_contents", req.SerializeToString()
        # Mixed batches: the bad image may sit behind good ones.
        batch = [rng.choice(imgs.good) for _ in range(n - 1)] + items
        rng.shuffle(batch)
        return f"{note} (batch of {n})", self._bytes_request(batch).SerializeToString()

    def _image_bomb(self, rng: random.Random) -> tuple[str, bytes, frozenset[str] | None]:
        note, data, may_decode = rng.choice(self.images.bombs)
        # 36 Mpixel is under the edge server's limit: decoding it (libjpeg pads the missing scan)
        # is allowed; it only has to stay bounded in time and memory.
        expect = frozenset({OK, "INVALID_ARGUMENT"}) if may_decode else None
        return note, self._bytes_request([data], rng.choice([[1], [1, 1]])).SerializeToString(), expect

    def _not_protobuf(self, rng: random.Random) -> tuple[str, bytes]:
        kind = rng.randrange(8)
        valid = self._fp32(rng)[0].SerializeToString()
        if kind == 0:
            data = rng.randbytes(rng.choice([1, 7, 100, 4096]))
            return f"{len(data)} random bytes", data
        if kind == 1:
            cut = rng.randrange(1, len(valid))
            return f"valid request cut at byte {cut} of {len(valid)}", valid[:cut]
        if kind == 2:
            b = bytearray(valid)
            # Flip bytes in the header part, where tags and lengths live.
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(min(len(b), 200))] ^= 1 << rng.randrange(8)
            return "valid request with flipped header bits", bytes(b)
        if kind == 3:
            return "field with wire type 7", bytes([(5 << 3) | 7]) + rng.randbytes(20)
        if kind == 4:
            return "varint of 11 bytes", b"\x08" + b"\xff" * 10 + b"\x01"
        if kind == 5:
            # model_name (field 1) declaring 2 GiB of bytes, then a few.
            return "length prefix of 2 GiB", b"\x0a\xff\xff\xff\xff\x07abc"
        if kind == 6:
            return "model_name that is not UTF-8", b"\x0a\x04\xff\xfe\xfd\xfc" + valid
        # A tensor nested in a tensor in a tensor ... (field 5 = inputs, itself a message).
        depth = rng.choice([100, 5000])
        data = b""
        for _ in range(depth):
            data = b"\x2a" + _varint(len(data)) + data
        return f"messages nested {depth} deep", data

    def _oversize(self, rng: random.Random) -> tuple[str, bytes]:
        m = self.model
        size = self.max_message_bytes + rng.randint(1, 1024 * 1024)
        req = self._request()
        req.inputs.add(name=m.input_name, datatype="FP32", shape=[1, *m.dims])
        req.raw_input_contents.append(bytes(size))
        return f"{size} raw bytes, above the {self.max_message_bytes}-byte limit", req.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


# -- checking answers ------------------------------------------------------------------------------
def malformed_reason(reply: bytes) -> str | None:
    """Why an OK answer is not a usable ModelInferResponse, or None when it is."""
    try:
        resp = pb.ModelInferResponse.FromString(reply)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
        return f"not a ModelInferResponse: {exc}"
    if not resp.outputs:
        return "no outputs"
    if resp.raw_output_contents and len(resp.raw_output_contents) != len(resp.outputs):
        return f"{len(resp.raw_output_contents)} raw_output_contents for {len(resp.outputs)} outputs"
    for i, out in enumerate(resp.outputs):
        if any(d < 0 for d in out.shape):
            return f"output '{out.name}' has shape {list(out.shape)}"
        elements = math.prod(out.shape)
        if not resp.raw_output_contents:
            return f"output '{out.name}' has no raw contents"
        raw = resp.raw_output_contents[i]
        if out.datatype == "BYTES":
            pos, items = 0, 0
            while pos + 4 <= len(raw):
                (n,) = struct.unpack_from("<I", raw, pos)
                pos += 4 + n
                items += 1
            if pos != len(raw) or items != elements:
                return (
                    f"BYTES output '{out.name}': {items} elements in {len(raw)} bytes for {list(out.shape)}"
                )
        elif out.datatype in _ITEMSIZE:
            if len(raw) != elements * _ITEMSIZE[out.datatype]:
                return f"output '{out.name}' {out.datatype} {list(out.shape)} carries {len(raw)} bytes"
        else:
            return f"output '{out.name}' has datatype {out.datatype!r}"
    return None


# -- running ---------------------------------------------------------------------------------------
def _rss_mb(pid: int | None, children: bool) -> float | None:
    if pid is None:
        return None
    import psutil

    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        if children:
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # a child may exit while we look
                    total += child.memory_info().rss
        return total / 2**20
    except psutil.Error:
        return None


def model_info(channel: grpc.Channel, model: str, metadata: Sequence[tuple[str, str]] = ()) -> ModelInfo:
    """Input name, dims, max batch and outputs from the server's ModelConfig (edge and Triton alike)."""
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelConfig",
        request_serializer=pb.ModelConfigRequest.SerializeToString,
        response_deserializer=pb.ModelConfigResponse.FromString,
    )
    cfg = call(pb.ModelConfigRequest(name=model), timeout=30, metadata=list(metadata)).config
    inp = cfg.input[0]
    return ModelInfo(
        name=model,
        input_name=inp.name,
        dims=tuple(int(d) for d in inp.dims),
        max_batch=max(1, cfg.max_batch_size),
        outputs=tuple(o.name for o in cfg.output),
    )


def _live(channel: grpc.Channel, metadata: Sequence[tuple[str, str]], tries: int = 3) -> str | None:
    """None if the server answers ServerLive with live=true; else why not."""
    call = channel.unary_unary(
        LIVE_METHOD,
        request_serializer=pb.ServerLiveRequest.SerializeToString,
        response_deserializer=pb.ServerLiveResponse.FromString,
    )
    reason = ""
    for attempt in range(tries):
        try:
            if call(pb.ServerLiveRequest(), timeout=5, metadata=list(metadata)).live:
                return None
            reason = "ServerLive answered live=false"
        except grpc.RpcError as exc:
            reason = f"ServerLive failed: {exc.code().name} {exc.details()}"
        time.sleep(1.0 * (attempt + 1))
    return reason


def run_fuzz(
    target: str,
    model: str,
    count: int = 10_000,
    seed: int = 0,
    pid: int | None = None,
    progress: bool = False,
    *,
    timeout_s: float = 20.0,
    concurrency: int = 4,
    check_every: int = 100,
    max_message_bytes: int = 32 * 1024 * 1024,
    rss_children: bool = False,
    metadata: Sequence[tuple[str, str]] = (),
    categories: Sequence[str] | None = None,
) -> FuzzResult:
    """Send `count` generated ModelInfer cases to the server at `target` ("host:port").

    `pid`: the server's process, for resident memory (with `rss_children`, its child processes too:
    Triton's python-backend stubs). `max_message_bytes`: the server's request limit, for the
    "oversize" cases. `categories`: only these (the case indices stay those of the full schedule).
    Stops early, with crashes=1, if the server stops answering ServerLive.
    """
    opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channel = grpc.insecure_channel(target, options=opts)
    result = FuzzResult(target=target, model=model, seed=seed, count=count)
    try:
        info = model_info(channel, model, metadata)
        gen = CaseGenerator(info, seed, max_message_bytes)
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: no client-side checks
        md = list(metadata)
        result.rss_before_mb = _rss_mb(pid, rss_children)
        peak = result.rss_before_mb
        start = time.monotonic()
        window: deque[tuple[Case, grpc.Future, float]] = deque()

        def settle() -> None:
            case, fut, t0 = window.popleft()
            detail = ""
            try:
                reply = fut.result()
                code = OK
                reason = malformed_reason(reply)
                if reason is not None:
                    result.malformed += 1
                    if len(result.malformed_examples) < 20:
                        result.malformed_examples.append(f"case {case.index} ({case.note}): {reason}")
                    detail = reason
            except grpc.RpcError as exc:
                code = exc.code().name
                detail = (exc.details() or "")[:300]
            result.cases.append(
                CaseResult(
                    index=case.index,
                    category=case.category,
                    note=case.note,
                    code=code,
                    detail=detail,
                    seconds=time.monotonic() - t0,
                    expected=code in case.allowed,
                )
            )

        wanted = set(categories) if categories else None
        for i in range(count):
            case = gen.case(i)
            if wanted is not None and case.category not in wanted:
                continue
            window.append((case, call.future(case.payload, timeout=timeout_s, metadata=md), time.monotonic()))
            result.sent += 1
            while len(window) >= concurrency:
                settle()
            if result.sent % check_every == 0:
                while window:
                    settle()
                result.live_checks += 1
                down = _live(channel, md)
                rss = _rss_mb(pid, rss_children)
                if rss is not None:
                    peak = max(peak or 0.0, rss)
                if down is not None:
                    result.crashes, result.crash_reason = 1, f"after {result.sent} cases: {down}"
                    break
                if progress:
                    codes = ", ".join(f"{k} {v}" for k, v in result.totals.items())
                    rss_text = f", RSS {rss:.0f} MiB" if rss is not None else ""
                    print(f"  {result.sent}/{count} cases: {codes}{rss_text}", flush=True)
        while window:
            settle()
        result.wall_s = time.monotonic() - start
        if not result.crashes:
            result.live_checks += 1
            down = _live(channel, md)
            if down is not None:
                result.crashes, result.crash_reason = 1, f"at the end: {down}"
        if pid is not None:
            import psutil

            if not psutil.pid_exists(pid):
                result.crashes, result.crash_reason = 1, f"process {pid} is gone"
        time.sleep(0.5)  # let the server free what the last requests held
        result.rss_after_mb = _rss_mb(pid, rss_children)
        if result.rss_after_mb is not None:
            peak = max(peak or 0.0, result.rss_after_mb)
        result.rss_peak_mb = peak
    finally:
        channel.close()
    return result


# -- comparing and reporting -----------------------------------------------------------------------
@dataclass
class DiffRow:
    category: str
    edge_code: str
    triton_code: str
    cases: int
    example: str  # the note of the first such case
    edge_detail: str
    triton_detail: str

    @property
    def same(self) -> bool:
        return self.edge_code == self.triton_code


def compare(edge: FuzzResult, triton: FuzzResult) -> list[DiffRow]:
    """Case by case over the indices both runs sent (same seed): one row per (category, edge code,
    Triton code), most cases first within a category. Rows with equal codes are kept (`same`)."""
    if edge.seed != triton.seed:
        raise ValueError(f"runs used different seeds ({edge.seed}, {triton.seed}): cases do not line up")
    theirs = {c.index: c for c in triton.cases}
    groups: dict[tuple[str, str, str], list] = {}
    for mine in edge.cases:
        other = theirs.get(mine.index)
        if other is None:
            continue
        key = (mine.category, mine.code, other.code)
        if key in groups:
            groups[key][0] += 1
        else:
            groups[key] = [1, mine.note, mine.detail, other.detail]
    rows = [DiffRow(cat, e, t, n, note, ed, td) for (cat, e, t), (n, note, ed, td) in groups.items()]
    order = {c: i for i, c in enumerate(CATEGORIES)}
    rows.sort(key=lambda r: (order.get(r.category, 99), -r.cases))
    return rows


def _cell(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def fuzz_table_markdown(results: Sequence[FuzzResult], diffs: Sequence[DiffRow] | None = None) -> str:
    """Markdown: a summary per run, status codes per category per run, then where edge and Triton differ."""
    lines = [
        "| server | cases | wall s | crashes | malformed | unexpected | RSS before / peak / after MiB |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.target} | {r.sent} | {r.wall_s:.1f} | {r.crashes} | {r.malformed} | {len(r.unexpected)} "
            f"| {_mb(r.rss_before_mb)} / {_mb(r.rss_peak_mb)} / {_mb(r.rss_after_mb)} |"
        )
    lines += ["", "| category | " + " | ".join(r.target for r in results) + " | slowest s |"]
    lines.append("|---|" + "---|" * len(results) + "---:|")
    for cat in CATEGORIES:
        cells = []
        for r in results:
            codes = r.codes.get(cat, {})
            cells.append(", ".join(f"{k} {v}" for k, v in codes.items()) or "-")
        slowest = max((r.slowest().get(cat, 0.0) for r in results), default=0.0)
        if any(cells_ != "-" for cells_ in cells):
            lines.append(f"| {cat} | " + " | ".join(cells) + f" | {slowest:.2f} |")
    if diffs is not None:
        differing = [d for d in diffs if not d.same]
        lines += [
            "",
            f"Cases both servers got: {sum(d.cases for d in diffs)}; answered differently: "
            f"{sum(d.cases for d in differing)}.",
            "",
            "| category | edge | Triton | cases | example case | edge says | Triton says |",
            "|---|---|---|---:|---|---|---|",
        ]
        for d in differing:
            lines.append(
                f"| {d.category} | {d.edge_code} | {d.triton_code} | {d.cases} | {_cell(d.example, 50)} "
                f"| {_cell(d.edge_detail)} | {_cell(d.triton_detail)} |"
            )
    return "\n".join(lines) + "\n"
