"""The lightweight edge gRPC server (KServe v2 / Triton protocol)."""
