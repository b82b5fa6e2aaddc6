"""The gRPC surface: the servicer, proto <-> domain conversion, and error -> status mapping.
The only package that imports the generated protobuf modules."""
