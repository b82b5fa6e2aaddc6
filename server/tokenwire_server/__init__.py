"""tokenwire inference server: engine, model, tokenizer and gRPC service."""

__version__ = "0.1.0"
