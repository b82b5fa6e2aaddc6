"""Client library for the tokenwire gRPC inference server."""

__version__ = "0.1.0"
