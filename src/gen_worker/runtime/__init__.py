"""The gRPC worker: lifecycle, connection, dispatch."""
