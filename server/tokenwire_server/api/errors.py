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

from ..errors import DeadlineExceeded, EngineUnavailable, InvalidArgument, QueueFull
from . import calls

log = logging.getLogger(__name__)


def _status(exc: Exception) -> status_pb2.Status:
    if isinstance(exc, InvalidArgument):
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)]))
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(exc), details=[detail])
    if isinstance(exc, QueueFull):
        return status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=str(exc))
    if isinstance(exc, EngineUnavailable):
        return status_pb2.Status(code=code_pb2.UNAVAILABLE, message=str(exc))
    if isinstance(exc, DeadlineExceeded):
        return status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message=str(exc))
    log.error("internal error", exc_info=exc)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error: {type(exc).__name__}")


async def _abort(servicer, context: grpc.aio.ServicerContext, exc: Exception, call: calls.RpcCall):
    status = rpc_status.to_status(_status(exc))
    call.code = status.code.name
    calls.end(call, servicer, context)  # counted and logged before the client can see the status
    await context.abort(status.code, status.details, tuple(status.trailing_metadata) + call.metadata)


def _aborted_code(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def rpc_errors(method):
    """Wrap an RPC (unary or server-streaming) so any exception becomes the right status, and
    every call gets a request id (api/calls.py), is counted by status code and is logged once.

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
                first = True
                async for response in method(self, request, context):
                    if first:
                        await context.send_initial_metadata(call.metadata)
                        first = False
                    yield response
                call.code = "OK"
            except asyncio.CancelledError:
                call.code = calls.cancelled_code(context)
                raise
            except grpc.aio.AbortError:
                call.code = call.code or _aborted_code(context)
                raise
            except Exception as e:
                await _abort(self, context, e, call)
            finally:  # also when the stream is closed early (GeneratorExit): code still None
                calls.end(call, self, context)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        call = calls.begin(name, context)
        try:
            response = await method(self, request, context)
            await context.send_initial_metadata(call.metadata)
            call.code = "OK"
            return response
        except asyncio.CancelledError:
            call.code = calls.cancelled_code(context)
            raise
        except grpc.aio.AbortError:
            call.code = call.code or _aborted_code(context)
            raise
        except Exception as e:
            await _abort(self, context, e, call)
        finally:
            calls.end(call, self, context)
    return unary
