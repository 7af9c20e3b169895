"""The model subsystem: snapshot manifests, the content-addressed store, downloads, hub and
Hugging Face sources. Independent of the engine and the transports; the engine reaches it
through one narrow provider interface."""
