"""Transport security and API keys: server TLS credentials (optionally mutual) and the
interceptor that admits only calls carrying a known key."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from .errors import ConfigError

API_KEYS_ENV = "TOKENWIRE_API_KEYS"
# Open without a key, so load balancers and the kubelet can probe.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_UNAUTHENTICATED = "a valid API key is required: send the metadata 'authorization: Bearer <key>'"


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror}") from None


def server_credentials(cert: str | None, key: str | None, client_ca: str | None) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (None: plaintext). With client_ca, clients must present a
    certificate signed by it (mutual TLS)."""
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key"
                          + (" (--tls-client-ca only adds client verification)" if client_ca else ""))
    pair = (_read(key, "--tls-key"), _read(cert, "--tls-cert"))
    ca = _read(client_ca, "--tls-client-ca") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def load_api_keys(path: str | None, environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    """Keys from a file (one per line; blank lines and # comments ignored) and from
    TOKENWIRE_API_KEYS (comma-separated). Empty: no key is required."""
    keys = [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",")]
    if path:
        lines = _read(path, "--api-keys-file").decode("utf-8", "replace").splitlines()
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise ConfigError(f"--api-keys-file {path} holds no keys")
        keys += from_file
    return frozenset(k for k in keys if k)


def _key_matches(sent: str, keys: Iterable[bytes]) -> bool:
    """Constant time in the key's content: every key is compared, with no early exit."""
    sent_bytes = sent.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(sent_bytes, key)
    return ok


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Calls to anything but health must carry 'authorization: Bearer <key>' with a known key;
    others end with UNAUTHENTICATED before the servicer sees them (no work done)."""

    def __init__(self, keys: frozenset[str], on_denied=None):
        self._keys = [k.encode() for k in keys]
        self._on_denied = on_denied  # called with the full method name (metrics)

    def allows(self, metadata) -> bool:
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(value, str):
            return False
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and _key_matches(token, self._keys)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method in OPEN_METHODS or self.allows(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # an unknown method: let grpc answer UNIMPLEMENTED
            return None
        if self._on_denied is not None:
            self._on_denied(details.method)
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with UNAUTHENTICATED."""
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
        yield  # never reached: makes this a streaming handler

    codecs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **codecs)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **codecs)
