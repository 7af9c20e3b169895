"""A gen-worker example endpoint: sentence embeddings from a real model."""
