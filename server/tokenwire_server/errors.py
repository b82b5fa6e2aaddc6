"""Domain exceptions. The api layer maps each to one gRPC status, in one place."""


class TokenwireError(Exception):
    """Base class of every error tokenwire raises on purpose."""


class InvalidArgument(TokenwireError, ValueError):
    """A request field has a value the server cannot accept."""

    expected = True  # the client's mistake: not logged as a server fault

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message

    def __reduce__(self):  # raised in a worker process (api/text_workers.py), re-raised here
        return type(self), (self.field, self.description)


class CheckpointError(TokenwireError):
    """A checkpoint is missing, corrupt, truncated or of an unsupported kind."""

    def __init__(self, path, message: str):
        super().__init__(f"{path}: {message}")
        self.path = str(path)


class ModelNotFound(TokenwireError):
    """A --model value is neither a registry name nor a path that exists."""


class RegistryUnavailable(TokenwireError):
    """The package registry holding a model could not be reached."""


class EngineUnavailable(TokenwireError):
    """The engine is not serving (still loading, or shutting down)."""

    expected = True


class WorkerLost(EngineUnavailable):
    """A worker process stopped while it held the call's work (api/text_workers.py)."""


class DeadlineExceeded(TokenwireError):
    """The request's deadline passed before its work was done."""

    expected = True


class QueueFull(TokenwireError):
    """The engine's waiting queue is full: the server is overloaded."""

    expected = True


class ConfigError(TokenwireError):
    """The server's own configuration (flags, files it names) is unusable."""


class ResponseTooLarge(TokenwireError):
    """The answer to a valid request would exceed what one response may carry."""

    expected = True
