"""Limits the server enforces on every request (reported by ModelInfo)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidArgument

MAX_RECEIVE_BYTES = 8 * 2**20  # one request message
MAX_SEND_BYTES = 64 * 2**20  # one response message


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 4096
    default_max_new_tokens: int = 256
    max_stop_sequences: int = 16
    max_stop_sequence_chars: int = 256
    max_stop_token_ids: int = 64
    max_top_n: int = 20
    max_logit_bias: int = 300  # entries per request
    max_batch_items: int = 256  # texts per Tokenize, items per Score
    max_input_chars: int = 400_000  # per text, before tokenizing
    max_samples: int = 16  # n per Generate

    def check_batch(self, n: int, field: str) -> None:
        """n items in a batch field (texts, items) are allowed."""
        if n == 0:
            raise InvalidArgument(field, "at least one is required")
        if n > self.max_batch_items:
            raise InvalidArgument(field, f"{n} given, at most {self.max_batch_items} per request")
