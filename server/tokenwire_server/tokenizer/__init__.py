"""Tokenization without torch: tiktoken encodings, incremental detokenizing, chat templates."""

from .detokenizer import IncrementalDetokenizer
from .tokenizer import Tokenizer, named_encoding

__all__ = ["IncrementalDetokenizer", "Tokenizer", "named_encoding"]
