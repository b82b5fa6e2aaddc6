"""ModelConfig: the shape of a transformer, read from a checkpoint's metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

ARCHITECTURES = ("llama", "gpt2")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of ARCHITECTURES
    vocab_size: int
    dim: int  # width of the residual stream
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads: grouped-query attention
    hidden_dim: int  # feed-forward width
    max_seq_len: int  # context length the model was trained for
    norm_eps: float = 1e-5
    head_dim: int = 0  # 0: dim // n_heads
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # Hugging Face rope_scaling dict ({"rope_type": "linear" | "llama3", ...}) or None.
    rope_scaling: dict | None = field(default=None, hash=False)
    # Per-frequency divisors some GGUF files store as the tensor rope_freqs.weight.
    rope_freq_factors: tuple[float, ...] | None = None
    name: str = ""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
