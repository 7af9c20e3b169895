"""The gen-worker example endpoint."""
