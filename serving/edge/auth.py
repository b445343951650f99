"""Optional bearer token and TLS for the edge server (loopback without either is the default)."""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from serving.edge.tensors import RequestError
from serving.errors import RtqError


class TokenCheck:
    """Compares `authorization: Bearer <token>` metadata in constant time; None allows everyone."""

    def __init__(self, token: str | None):
        self._expected = f"Bearer {token}".encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._expected is not None

    def check(self, metadata) -> None:
        if self._expected is None:
            return
        given = next((v for k, v in (metadata or ()) if k == "authorization"), None)
        if given is None:
            raise RequestError(
                grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata"
            )
        given_b = given.encode() if isinstance(given, str) else given
        if not hmac.compare_digest(given_b, self._expected):
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")


def read_token(value: str | None, path: Path | None) -> str | None:
    """The token from --token-file (preferred: no secret in `ps`) or --token."""
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise RtqError(f"cannot read token file {path}: {exc.strerror}") from None
        if not token:
            raise RtqError(f"token file {path} is empty")
        return token
    return value or None


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials; with `client_ca`, mutual TLS: a client without a certificate signed by that CA
    fails the handshake and never reaches a handler."""
    try:
        pair = (key.read_bytes(), cert.read_bytes())
        if client_ca is None:
            return grpc.ssl_server_credentials([pair])
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca.read_bytes(), require_client_auth=True
        )
    except OSError as exc:
        raise RtqError(f"cannot read TLS certificate or key: {exc.filename}: {exc.strerror}") from None
