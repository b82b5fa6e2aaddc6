"""The inference engine: model runner, sampler, stopping rules and the generation loop."""

from .llm_engine import LLMEngine
from .outputs import FinishReason, GeneratedToken, ScoreOutput
from .sampling_params import SamplingParams

__all__ = ["FinishReason", "GeneratedToken", "LLMEngine", "SamplingParams", "ScoreOutput"]
