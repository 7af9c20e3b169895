"""The dev HTTP runner: an ASGI app over the execution engine."""

from gen_worker.devserver.app import DevRunner

__all__ = ["DevRunner"]
