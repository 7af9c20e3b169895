"""Files of a request: output refs and sinks, input fetching, and finding Assets in values.

* :func:`output_ref` — where a request may write (``jobs/<request_id>/outputs/<name>``).
* :class:`LocalOutputSink` — the dev runner's output sink: atomic, hashed writes under a
  directory.
* :class:`AssetFetcher` — downloads (``http(s)``, public hosts, size limit) or locates the
  input Assets of a payload.
* :func:`find_assets` — every Asset inside a payload or an output value.
"""

from gen_worker.files.assets import DEFAULT_MAX_INPUT_FILE_BYTES, AssetFetcher
from gen_worker.files.outputs import LocalOutputSink, LocalOutputStream
from gen_worker.files.refs import output_ref
from gen_worker.files.walk import find_assets

__all__ = [
    "DEFAULT_MAX_INPUT_FILE_BYTES",
    "AssetFetcher",
    "LocalOutputSink",
    "LocalOutputStream",
    "find_assets",
    "output_ref",
]
