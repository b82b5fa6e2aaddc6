"""Client library for the tokenwire gRPC inference server."""

from .client import AsyncClient, Client, GenerateStream
from .errors import TokenwireError
from .types import (Delta, Final, Generation, InputInfo, ModelInfo, Scored, ServerLimits, TokenInfo, Tokenized,
                    TokenSpan, TopToken, Usage)

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "Delta", "Final", "GenerateStream", "Generation", "InputInfo", "ModelInfo",
           "Scored", "ServerLimits", "TokenInfo", "TokenSpan", "Tokenized", "TokenwireError", "TopToken", "Usage"]
