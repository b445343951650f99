"""KServe v2 tensors in and out: checks every input against the model before anything is computed.

Accepted for a model whose input is FP32 [N, 3, H, W]:
  FP32  [N, 3, H, W]  already normalised (the model's own input)
  UINT8 [N, 3, H, W]  resized and cropped pixels; normalised here with the model's preprocessing
  BYTES [N] or [N, 1] encoded JPEG/PNG images; decoded and preprocessed here exactly as in eval
Contents come either typed (`contents.fp32_contents`, ...) or in `raw_input_contents`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import grpc
import numpy as np

from serving.errors import RtqError
from serving.models.preprocessing import Preprocessing, load_image, preprocess

_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
SUPPORTED = ("FP32", "UINT8", "BYTES")
# Far wider than any camera frame or panorama a classifier is given (see decode_image).
MAX_ASPECT_RATIO = 32


# A status message travels in a trailer; clients refuse trailers above 8 KiB by default, and an
# answer they cannot read is worse than a shortened message.
MAX_MESSAGE_CHARS = 1000


def shown(text: str, limit: int = 64) -> str:
    """A client-supplied string as it may appear in a message: printable and bounded."""
    clipped = text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"
    return clipped if clipped.isprintable() else repr(clipped)[1:-1]


class RequestError(Exception):
    """A request the server refuses: a gRPC status code and a one-line message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str):
        message = " ".join(message.split())
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.code = code
        self.message = message


class Refused(RequestError):
    """Turned away without compute so the admitted requests keep their latency: queue full, a
    deadline out of reach, shutting down. Its answer time is the server's refusal time."""


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def split_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """The BYTES raw layout: each element is a 4-byte little-endian length, then the bytes."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise invalid(f"input '{name}': BYTES raw contents end inside a length prefix")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise invalid(f"input '{name}': BYTES element of {n} bytes runs past the end of the contents")
        items.append(raw[pos : pos + n])
        pos += n
    if len(items) != count:
        raise invalid(f"input '{name}': shape asks for {count} BYTES elements, contents hold {len(items)}")
    return items


def join_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def batch_size(
    shape: Sequence[int], name: str, datatype: str, image_shape: tuple[int, ...], max_batch_size: int
) -> int:
    """Check the declared shape; returns N."""
    shape = list(shape)
    if datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise invalid(f"input '{name}': BYTES images need shape [N] or [N, 1], got {shape}")
    elif len(shape) != 1 + len(image_shape) or tuple(shape[1:]) != tuple(image_shape):
        expected = ", ".join(str(d) for d in image_shape)
        raise invalid(f"input '{name}': shape {shape} does not match [N, {expected}]")
    n = shape[0]
    if n < 1:
        raise invalid(f"input '{name}': empty batch (shape {shape}); send at least one image")
    if n > max_batch_size:
        raise invalid(f"input '{name}': batch of {n} is above this model's max_batch_size {max_batch_size}")
    return n


def numeric_input(tensor, raw: bytes | None, image_shape: tuple[int, ...], max_batch_size: int) -> np.ndarray:
    """FP32 or UINT8 tensor -> NCHW array, checked: FP32 finite and as sent (already normalised),
    UINT8 as sent (pixels; the caller normalises them, off the event loop)."""
    name, datatype = tensor.name, tensor.datatype
    n = batch_size(tensor.shape, name, datatype, image_shape, max_batch_size)
    shape = (n, *image_shape)
    count = int(np.prod(shape))
    dtype = _DTYPES[datatype]
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise invalid(
                f"input '{name}': {len(raw)} bytes of raw contents, but {datatype} {list(shape)} "
                f"needs {count * dtype.itemsize}"
            )
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    else:
        typed = tensor.contents.fp32_contents if datatype == "FP32" else tensor.contents.uint_contents
        if len(typed) != count:
            field = "fp32_contents" if datatype == "FP32" else "uint_contents"
            raise invalid(f"input '{name}': {len(typed)} values in {field}, but {list(shape)} needs {count}")
        if datatype == "UINT8":
            values = np.asarray(typed, dtype=np.uint32)
            if values.max(initial=0) > 255:
                raise invalid(f"input '{name}': UINT8 value {int(values.max())} is above 255")
            arr = values.astype(np.uint8).reshape(shape)
        else:
            arr = np.asarray(typed, dtype=np.float32).reshape(shape)
    if datatype == "UINT8":
        return arr
    flat = arr.reshape(-1)
    # A dot product is NaN/Inf whenever any element is (and ~4x cheaper than isfinite().all());
    # only then, or on overflow of huge finite values, is the exact element-wise check run.
    if not np.isfinite(np.dot(flat, flat)) and not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise invalid(f"input '{name}': {bad} NaN or Inf values; inputs must be finite")
    return arr


def image_bytes(tensor, raw: bytes | None, max_batch_size: int) -> list[bytes]:
    n = batch_size(tensor.shape, tensor.name, "BYTES", (), max_batch_size)
    if raw is not None:
        return split_bytes(raw, n, tensor.name)
    items = list(tensor.contents.bytes_contents)
    if len(items) != n:
        raise invalid(f"input '{tensor.name}': shape asks for {n} images, bytes_contents hold {len(items)}")
    return items


def image_format(data: bytes) -> str | None:
    """The container format by its magic bytes, if it is one the server decodes."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def decode_image(data: bytes, pp: Preprocessing) -> np.ndarray:
    """One untrusted encoded image -> float32 CHW, or RtqError. Beyond the pixel limit that
    load_image checks before decoding: only the formats cameras and our datasets produce reach PIL
    (each of its other parsers is attack surface, and EPS runs Ghostscript), and the aspect ratio
    is bounded, because the short-side resize scales the long side with it (a 1x100000 PNG of a
    few hundred bytes would become a 256x25600000 image: many GB)."""
    if image_format(data) is None:
        raise RtqError(f"not a JPEG, PNG, WebP or BMP image (starts with {data[:8]!r})")
    img = load_image(data)
    w, h = img.size
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise RtqError(f"image is {w}x{h}; aspect ratios above {MAX_ASPECT_RATIO}:1 are refused")
    return preprocess(img, pp)


def decode_images(images: Sequence[bytes], pp: Preprocessing, name: str) -> np.ndarray:
    """Encoded images -> float32 NCHW through the model's own preprocessing (slow: run off the loop)."""
    out = []
    for i, data in enumerate(images):
        try:
            out.append(decode_image(data, pp))
        except RtqError as exc:
            raise invalid(f"input '{shown(name)}' image {i}: {exc}") from None
        except MemoryError:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"input '{shown(name)}' image {i}: out of memory decoding it",
            ) from None
        except Exception as exc:  # noqa: BLE001 - PIL's parsers raise SyntaxError, struct.error, ... on junk
            raise invalid(
                f"input '{shown(name)}' image {i}: cannot decode image: {type(exc).__name__}: {exc}"
            ) from None
    return np.stack(out)


def classification(logits: np.ndarray, k: int, labels: Sequence[str]) -> list[bytes]:
    """Triton's classification extension: per image, the top k as b"score:index:label", best first."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [
        f"{logits[row, idx]:.6f}:{idx}:{labels[idx] if idx < len(labels) else ''}".encode()
        for row in range(logits.shape[0])
        for idx in top[row]
    ]


def parse_labels(param, n: int) -> list[int]:
    """The optional request parameter 'label': an int (one image) or "i,j,..." (one per image)."""
    kind = param.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        values = [int(getattr(param, kind))]
    elif kind == "string_param":
        try:
            values = [int(v) for v in param.string_param.split(",") if v.strip()]
        except ValueError:
            raise invalid(
                f'parameter \'label\' must be class indices like "3" or "3,7", got '
                f"{param.string_param[:40]!r}"
            ) from None
    else:
        raise invalid("parameter 'label' must be an integer class index or a comma-separated string of them")
    if len(values) != n:
        raise invalid(f"parameter 'label' holds {len(values)} labels for a batch of {n}")
    return values
