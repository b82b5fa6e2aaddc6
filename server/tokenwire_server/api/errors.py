"""Every exception to its gRPC status, in one place."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import DeadlineExceeded, EngineUnavailable, InvalidArgument, QueueFull, ResponseTooLarge
from . import calls
from .handlers import Malformed

log = logging.getLogger(__name__)

# Errors may echo client values of any length, but trailers over 8 KiB (gRPC's default metadata
# limit) reach a client as RESOURCE_EXHAUSTED instead of our status. Worst case with these
# bounds, in UTF-8 bytes: grpc-message 1 KiB percent-encoded (3 KiB) + grpc-status-details-bin
# (message, field, description: 1.8 KiB) in base64 (2.4 KiB): about 5.5 KiB.
MAX_MESSAGE_BYTES = 1024
MAX_DESCRIPTION_BYTES = 512
MAX_FIELD_BYTES = 256


def clip(text: str, max_bytes: int) -> str:
    """text in at most max_bytes of UTF-8: when longer, its middle is cut (the end of a message
    often says what is allowed) and marked " ... "."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return text
    keep = max_bytes - len(" ... ")
    head, tail = keep * 2 // 3, keep - keep * 2 // 3
    return (data[:head].decode("utf-8", "ignore") + " ... "
            + data[len(data) - tail:].decode("utf-8", "ignore"))


def _status(exc: Exception) -> status_pb2.Status:
    if isinstance(exc, InvalidArgument):
        field, description = clip(exc.field, MAX_FIELD_BYTES), clip(exc.description, MAX_DESCRIPTION_BYTES)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)]))
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"{field}: {description}",
                                 details=[detail])
    if isinstance(exc, (QueueFull, ResponseTooLarge)):
        return status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=str(exc))
    if isinstance(exc, EngineUnavailable):
        return status_pb2.Status(code=code_pb2.UNAVAILABLE, message=str(exc))
    if isinstance(exc, DeadlineExceeded):
        return status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message=str(exc))
    log.error("internal error", exc_info=exc)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error: {type(exc).__name__}")


async def _abort(servicer, context: grpc.aio.ServicerContext, exc: Exception, call: calls.RpcCall):
    proto = _status(exc)
    proto.message = clip(proto.message, MAX_MESSAGE_BYTES)
    status = rpc_status.to_status(proto)
    call.code = status.code.name
    calls.end(call, servicer)  # counted and logged before the client can see the status
    await context.abort(status.code, status.details, tuple(status.trailing_metadata) + call.metadata)


def _check_parsed(request) -> None:
    if isinstance(request, Malformed):  # api/handlers.py: the request bytes did not parse
        raise InvalidArgument("request", request.error)


def _aborted_code(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def rpc_errors(method):
    """Wrap an RPC (unary or server-streaming) so any exception becomes the right status, and
    every call gets a request id (api/calls.py), is counted by status code and is logged once.
    A request whose bytes did not parse (api/handlers.py) is INVALID_ARGUMENT on field "request".

    The id goes back in the trailing metadata of every call, and in the initial metadata sent
    with the first message (or the unary response), never earlier: gRPC commits a call once
    response headers arrive, so a failure before any response stays Trailers-Only and clients
    can retry it on another replica."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            call = calls.begin(name, context)
            try:
                _check_parsed(request)
                first = True
                async for response in method(self, request, context):
                    if first:
                        await context.send_initial_metadata(call.metadata)
                        first = False
                    yield response
                call.code = "OK"
            except asyncio.CancelledError:
                call.code = calls.cancelled_code(call)
                raise
            except grpc.aio.AbortError:
                call.code = call.code or _aborted_code(context)
                raise
            except Exception as e:
                await _abort(self, context, e, call)
            finally:  # also when the stream is closed early (GeneratorExit): code still None
                calls.end(call, self)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        call = calls.begin(name, context)
        try:
            _check_parsed(request)
            response = await method(self, request, context)
            await context.send_initial_metadata(call.metadata)
            call.code = "OK"
            return response
        except asyncio.CancelledError:
            call.code = calls.cancelled_code(call)
            raise
        except grpc.aio.AbortError:
            call.code = call.code or _aborted_code(context)
            raise
        except Exception as e:
            await _abort(self, context, e, call)
        finally:
            calls.end(call, self)
    return unary
