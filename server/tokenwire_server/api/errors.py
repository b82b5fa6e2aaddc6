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


async def _abort(context: grpc.aio.ServicerContext, exc: Exception):
    status = rpc_status.to_status(_status(exc))
    await context.abort(status.code, status.details, status.trailing_metadata)


def rpc_errors(method):
    """Wrap an RPC (unary or server-streaming) so any exception becomes the right status."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for response in method(self, request, context):
                    yield response
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:
                await _abort(context, e)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await _abort(context, e)
    return unary
