"""The local hub: our stand-in for Cozy Hub, a real HTTP server shipped with the package.

It stores snapshots as blake3-addressed blobs under a root directory and serves what the
worker uses of the hub API: resolving a repo's tag, attributes or digest to a snapshot
manifest with signed, expiring blob URLs; the blobs themselves with HTTP Range; and the file
API (presigned multipart uploads, downloads by ref).

* :func:`publish` — ingest a directory or file as a snapshot and move a tag.
* :class:`HubServer` — a hub on ``127.0.0.1:0`` in a background thread (tests, tools).
* :func:`serve` — the foreground server of ``gen-worker hub serve``.
* :class:`HubStorage` — the on-disk layout (blobs, snapshot records, repo indexes).

Routes are documented in :mod:`gen_worker.hub.app` and :mod:`gen_worker.hub.files_api`.
"""

from gen_worker.hub.publish import DEFAULT_PART_SIZE_BYTES, publish
from gen_worker.hub.server import HubServer, HubSettings, create_app, serve
from gen_worker.hub.signing import DEFAULT_URL_TTL_S, UrlSigner
from gen_worker.hub.storage import HubStorage

__all__ = [
    "DEFAULT_PART_SIZE_BYTES",
    "DEFAULT_URL_TTL_S",
    "HubServer",
    "HubSettings",
    "HubStorage",
    "UrlSigner",
    "create_app",
    "publish",
    "serve",
]
