"""Transports: the gRPC stream to the scheduler and worker-token verification.

grpc's C core logs every GOAWAY of a restarting scheduler at INFO to stderr, outside our
structured logs; unless the operator chose a verbosity, keep it to errors. This must happen
before grpc is first imported, which is why it sits in the package's ``__init__``.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
