"""Testing helpers for endpoint authors: run a worker function without any server.

``run_function`` sends a payload through the real execution engine (strict decoding, the same
error mapping, output encoding, deltas, events, outputs written to a folder) and hands back
what a caller would see::

    from gen_worker.testing import run_function

    result = run_function(generate, Input(prompt="hi"))
    assert result.output == Output(text="Hello, hi!")

``make_context`` builds a :class:`~gen_worker.RequestContext` that records events and writes
outputs to a folder, for calling a function directly.
"""

from gen_worker.testing.harness import (
    CapturedContext,
    FunctionRun,
    arun_function,
    make_context,
    run_function,
)

__all__ = ["CapturedContext", "FunctionRun", "arun_function", "make_context", "run_function"]
