"""The Tokenwire service's gRPC method handlers: the generated ones, with two changes.

- Requests that do not parse (bytes that are no valid message, invalid UTF-8 in a string
  field) become a `Malformed` marker instead of an exception: grpc.aio would answer UNKNOWN
  ("Unexpected DecodeError"), log a traceback and never reach `rpc_errors`, which turns the
  marker into INVALID_ARGUMENT and counts and logs the call like any bad request.
- A response may arrive already serialized (bytes): big responses are serialized on the
  offload pool (api/offload.py), not on the event loop."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Malformed:
    """A request that did not parse as `message` (its full proto name)."""

    message: str
    error: str


def _tolerant(parse, message: str):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as e:
            return Malformed(message, str(e))
    return deserialize


def _passing_bytes(serialize):
    def serializer(response) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)
    return serializer


class _Collect:
    """Stands in for a server to collect what the generated add_*_to_server registers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def add_to_server(servicer, server) -> None:
    """pb_grpc.add_TokenwireServicer_to_server, with the changed (de)serializers."""
    collected = _Collect()
    pb_grpc.add_TokenwireServicer_to_server(servicer, collected)
    handlers = {}
    for name, h in collected.handlers.items():
        full_name = h.request_deserializer.__self__.DESCRIPTOR.full_name  # the message class's FromString
        handlers[name] = h._replace(request_deserializer=_tolerant(h.request_deserializer, full_name),
                                    response_serializer=_passing_bytes(h.response_serializer))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(collected.service, handlers),))
    server.add_registered_method_handlers(collected.service, handlers)
