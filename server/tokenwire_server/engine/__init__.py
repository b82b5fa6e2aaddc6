"""The inference engine: plain requests in (EngineRequest, ScoreRequest), immutable outputs out
(RequestOutput, ScoreOutput, RequestFailed); the engine owns everything in between."""

from .llm_engine import LLMEngine
from .outputs import (EngineRequest, FinishReason, RequestFailed, RequestOutput, ScoreOutput, ScoreRequest,
                      TokenLogprob, Usage)
from .sampling_params import SamplingParams

__all__ = ["EngineRequest", "FinishReason", "LLMEngine", "RequestFailed", "RequestOutput", "SamplingParams",
           "ScoreOutput", "ScoreRequest", "TokenLogprob", "Usage"]
