"""The wire protocol: typed messages and their protobuf conversion (pure data, no I/O)."""
