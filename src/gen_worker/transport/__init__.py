"""The worker's links to the scheduler: the gRPC stream and the worker JWT it presents."""
