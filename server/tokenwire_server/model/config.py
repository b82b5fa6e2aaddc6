"""ModelConfig: the shape of a transformer, read from a checkpoint's metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

# Families served by model/decoder.py, then GPT-2 (model/gpt2.py).
DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
ARCHITECTURES = DECODER_FAMILIES + ("gpt2",)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of ARCHITECTURES
    vocab_size: int
    dim: int  # width of the residual stream
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads: grouped-query attention
    hidden_dim: int  # feed-forward width
    max_seq_len: int  # the context served: at most the one the model was trained for
    norm_eps: float = 1e-5
    head_dim: int = 0  # 0: dim // n_heads
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # {"rope_type": "linear" | "llama3" | "longrope", ...} (Hugging Face's keys) or None.
    rope_scaling: dict | None = field(default=None, hash=False)
    # Per-frequency divisors some GGUF files store as the tensor rope_freqs.weight.
    rope_freq_factors: tuple[float, ...] | None = None
    rotary_dim: int = 0  # dimensions of each head that rotate (0: all; Phi-4-mini rotates 3/4)
    name: str = ""
    # ---- options of the decoder families (defaults: Llama) ----
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # RMSNorm over each head's q and k before rotary (Qwen3, Gemma 3)
    # Gemma: norms scale by (1 + weight), embeddings by sqrt(dim), GeGLU, and norms after
    # the attention and feed-forward blocks too.
    gemma: bool = False
    attn_scale: float = 0.0  # 0: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float = 0.0  # scores -> cap * tanh(scores / cap) (Gemma 2); 0: none
    final_softcap: float = 0.0  # the same on the logits
    # Per layer, the keys it sees: the last `window` positions, 0 for all. Empty: all layers see all.
    layer_windows: tuple[int, ...] = ()
    # Rotary base of the windowed layers, where it differs (Gemma 3's local layers); they
    # take no scaling. 0: the same as the others.
    local_rope_theta: float = 0.0

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if not self.rotary_dim:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.layer_windows and len(self.layer_windows) != self.n_layers:
            raise ValueError(f"{len(self.layer_windows)} layer windows for {self.n_layers} layers")

    def window(self, layer: int) -> int:
        return self.layer_windows[layer] if self.layer_windows else 0

    def local_rope(self, layer: int) -> bool:
        """Whether the layer rotates with local_rope_theta (a windowed layer of such a model)."""
        return bool(self.local_rope_theta and self.window(layer))
