"""TokenwireError: a failed call, with its status code and the fields the server rejected."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


class TokenwireError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, field_violations: list[tuple[str, str]] = ()):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field_violations = list(field_violations)  # (field, description)

    @property
    def field(self) -> str | None:
        """The first rejected field, when the server named one."""
        return self.field_violations[0][0] if self.field_violations else None

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> TokenwireError:
        violations = []
        for key, value in error.trailing_metadata() or ():
            if key == _DETAILS_KEY:
                status = status_pb2.Status.FromString(value)
                for detail in status.details:
                    bad = error_details_pb2.BadRequest()
                    if detail.Unpack(bad):
                        violations += [(v.field, v.description) for v in bad.field_violations]
        return cls(error.code(), error.details() or "", violations)
