"""System shared memory (Triton's `system_shared_memory` extension) for clients on the same host.

A camera process beside the server writes each frame into a region it registered once; a request
then names the region, offset and size instead of carrying the pixels (a 1x3x224x224 FP32 frame is
600 KB that gRPC would otherwise serialize, copy through the socket and parse). tritonclient's
`utils.shared_memory` and `register_system_shared_memory` work unchanged against this server.

Regions are POSIX shared memory objects (files directly in /dev/shm): a key names one object there and
nothing else (no '/' inside it, symlinks refused), and every read and write is checked against the
registered range. Reads and writes are pread/pwrite on the object, not a memory map: a client that
truncates its object after registering gets an error, where touching a mapping past the new end
would kill the server with SIGBUS. Inputs are copied out at request time, so the client may write its
next frame while this one is still queued. Register, unregister, read and write all run on the
server's event loop: no locking.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

from serving.edge.tensors import RequestError, invalid, shown

SHM_ROOT = Path("/dev/shm")
MAX_REGIONS = 256
_KEY = re.compile(r"/?[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
# Request parameters (tritonclient's InferInput/InferRequestedOutput.set_shared_memory).
REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int  # the object, open read-write


@dataclass(frozen=True)
class Slice:
    """Where one tensor lives: `byte_size` bytes at `offset` within a registered region."""

    region: str
    offset: int
    byte_size: int


def tensor_slice(parameters, what: str) -> Slice | None:
    """The shared-memory slice a request tensor's parameters name, or None when they name none."""
    if REGION not in parameters:
        if BYTE_SIZE in parameters or OFFSET in parameters:
            raise invalid(f"{what}: '{BYTE_SIZE}' or '{OFFSET}' without '{REGION}'")
        return None
    region = parameters[REGION].string_param
    if not region:
        raise invalid(f"{what}: '{REGION}' must name a registered region")
    if BYTE_SIZE not in parameters:
        raise invalid(f"{what}: '{REGION}' needs '{BYTE_SIZE}'")
    size = parameters[BYTE_SIZE].int64_param
    offset = parameters[OFFSET].int64_param if OFFSET in parameters else 0
    if size <= 0 or offset < 0:
        raise invalid(f"{what}: shared memory byte size must be > 0 and offset >= 0, got {size} and {offset}")
    return Slice(region, offset, size)


class SharedMemoryRegions:
    def __init__(self, enabled: bool = True, root: Path = SHM_ROOT, max_regions: int = MAX_REGIONS):
        self.enabled = enabled
        self.root = root
        self.max_regions = max_regions
        self._regions: dict[str, Region] = {}

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "shared memory is turned off on this server (rtq serve --no-shared-memory); "
                "send tensors in the request",
            )

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_enabled()
        if not name:
            raise invalid("a shared memory region needs a name")
        if name in self._regions:
            raise RequestError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"shared memory region '{shown(name)}' is already registered; unregister it first",
            )
        if len(self._regions) >= self.max_regions:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_regions} shared memory regions are registered already; unregister some first",
            )
        if not _KEY.fullmatch(key) or key.strip("/") in (".", ".."):
            raise invalid(
                f"shared memory key '{shown(key)}' must name an object directly in {self.root} "
                "(letters, digits, '_', '-', '.'; an optional leading '/')"
            )
        if offset < 0 or byte_size <= 0:
            raise invalid(f"shared memory offset must be >= 0 and byte size > 0: {offset}, {byte_size}")
        path = self.root / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"no shared memory object '{shown(key)}' on this host"
            ) from None
        except OSError as exc:
            raise invalid(f"cannot open shared memory object '{shown(key)}': {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise invalid(f"'{shown(key)}' is not a shared memory object")
            if offset + byte_size > st.st_size:
                raise invalid(
                    f"shared memory object '{shown(key)}' holds {st.st_size} bytes; "
                    f"offset {offset} + byte size {byte_size} is past its end"
                )
        except BaseException:
            os.close(fd)
            raise
        self._regions[name] = Region(name, key, offset, byte_size, fd)

    def unregister(self, name: str) -> None:
        """One region by name; every region when `name` is empty (as Triton does)."""
        self._check_enabled()
        names = [name] if name else list(self._regions)
        for n in names:
            region = self._regions.pop(n, None)
            if region is not None:
                os.close(region.fd)

    def status(self, name: str) -> list[Region]:
        self._check_enabled()
        if not name:
            return list(self._regions.values())
        return [self._region(name)]

    def _region(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown shared memory region '{shown(name)}'; register it first",
            )
        return region

    def _bounds(self, where: Slice, what: str) -> tuple[Region, int]:
        self._check_enabled()
        region = self._region(where.region)
        if where.offset + where.byte_size > region.byte_size:
            raise invalid(
                f"{what}: offset {where.offset} + byte size {where.byte_size} is past the end of "
                f"shared memory region '{shown(region.name)}' ({region.byte_size} bytes)"
            )
        return region, region.offset + where.offset

    def check(self, where: Slice, what: str) -> None:
        """Fail before compute when a slice is unknown or out of range."""
        self._bounds(where, what)

    def read(self, where: Slice, what: str) -> bytes:
        region, start = self._bounds(where, what)
        data = os.pread(region.fd, where.byte_size, start)  # a copy: the client may reuse the slice
        if len(data) != where.byte_size:
            raise invalid(
                f"{what}: shared memory region '{shown(region.name)}' now ends before offset "
                f"{where.offset} + byte size {where.byte_size} (its object was truncated)"
            )
        return data

    def write(self, where: Slice, data: bytes, what: str) -> None:
        region, start = self._bounds(where, what)
        if len(data) > where.byte_size:
            raise invalid(
                f"{what}: the result is {len(data)} bytes; the shared memory slice holds {where.byte_size}"
            )
        os.pwrite(region.fd, data, start)

    def close(self) -> None:
        for region in self._regions.values():
            os.close(region.fd)
        self._regions.clear()
