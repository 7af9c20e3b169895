"""A fake Hugging Face Hub on 127.0.0.1:0: the few routes listing, resolution and downloads use.

Routes, answered like the real Hub:

* ``GET /api/models/{owner}/{repo}[/revision/{rev}]`` (``?blobs=true`` adds sizes, blob ids and
  LFS ``{sha256, size, pointerSize}``): the model info at a branch, tag or commit sha, with
  ``sha`` the commit. Unknown repo -> 404 ``X-Error-Code: RepoNotFound``; unknown revision ->
  404 ``RevisionNotFound``; private repo without a token -> 401 ``RepoNotFound``; a token the
  Hub does not know -> 401 "Invalid credentials in Authorization header"; a known token without
  access -> 404 ``RepoNotFound``. ``hub.api_status`` forces a status, and ``hub.api_body``
  a raw 200 body, on every API call.
* ``GET|HEAD /{owner}/{repo}/resolve/{rev}/{path}``: the file, with ``Range`` (206/416),
  ``ETag`` and ``X-Repo-Commit``; LFS files answer 302 to a signed ``/cdn/{sha256}`` URL (as
  the real Hub redirects to its CDN), which needs no token but a valid signature.

Every request is logged (method, path, Authorization) so tests can assert what was asked.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

# What the Hub's default .gitattributes stores in LFS.
LFS_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".onnx", ".onnx_data"}
    | {".msgpack", ".h5", ".ot", ".gguf", ".tflite", ".model", ".png", ".jpg"}
)
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


@dataclass(frozen=True)
class FakeFile:
    path: str
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {len(self.content)}\n"
        ).encode()

    @property
    def blob_id(self) -> str:
        """The git blob id: of the LFS pointer for LFS files, as on the real Hub."""
        stored = self.pointer if self.lfs else self.content
        return hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()

    def sibling(self, *, blobs: bool) -> dict[str, object]:
        entry: dict[str, object] = {"rfilename": self.path}
        if blobs:
            entry.update(size=len(self.content), blobId=self.blob_id)
            if self.lfs:
                lfs = {"sha256": self.sha256, "size": len(self.content)}
                entry["lfs"] = {**lfs, "pointerSize": len(self.pointer)}
        return entry


@dataclass
class FakeRepo:
    repo_id: str
    readers: frozenset[str] | None  # None: public
    commits: dict[str, dict[str, FakeFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


class FakeHfHub:
    """Repos defined by the test, served by :meth:`serve`."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.api_status: int | None = None
        self.api_body: bytes | None = None
        self.url = ""
        self._lock = threading.Lock()
        self._key = os.urandom(16)
        self.app = Starlette(
            routes=[
                Route("/api/models/{owner}/{repo}", self._info),
                Route("/api/models/{owner}/{repo}/revision/{revision:path}", self._info),
                Route(
                    "/{owner}/{repo}/resolve/{revision}/{path:path}",
                    self._resolve,
                    methods=["GET", "HEAD"],
                ),
                Route("/cdn/{sha256}", self._cdn, methods=["GET", "HEAD"]),
            ]
        )

    def push(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        branch: str = "main",
        tags: Collection[str] = (),
        readers: Collection[str] | None = None,
        lfs: Collection[str] | None = None,
    ) -> str:
        """Commit ``files`` (the whole tree) to ``branch``; returns the new commit sha."""
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                frozen = None if readers is None else frozenset(readers)
                repo = self.repos[repo_id] = FakeRepo(repo_id, frozen)
            tree = {path: FakeFile(path, body, _is_lfs(path, lfs)) for path, body in files.items()}
            listing = "".join(f"{p}\0{f.blob_id}\n" for p, f in sorted(tree.items()))
            parent = repo.refs.get(branch, "")
            seed = f"{repo_id}\n{parent}\n{len(repo.commits)}\n{listing}"
            commit = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[commit] = tree
            for name in (branch, *tags):
                repo.refs[name] = commit
            return commit

    def requested_paths(self) -> list[str]:
        with self._lock:
            return [path for _, path, _ in self.requests]

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Serve on 127.0.0.1:0 in a thread; yields the base URL (also set as ``self.url``)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the fake Hugging Face Hub did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        try:
            yield self.url
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()

    # -- routes ---------------------------------------------------------------------------

    async def _info(self, request: Request) -> Response:
        self._log(request)
        if self.api_status is not None:
            return _error(self.api_status, None, f"forced status {self.api_status}")
        if self.api_body is not None:
            return Response(self.api_body, media_type="application/json")
        found = self._find(request)
        if isinstance(found, Response):
            return found
        repo, commit = found
        blobs = request.query_params.get("blobs", "").lower() == "true"
        tree = repo.commits[commit]
        return JSONResponse(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": commit,
                "private": repo.readers is not None,
                "gated": False,
                "disabled": False,
                "tags": [],
                "lastModified": "2024-05-01T12:00:00.000Z",
                "siblings": [tree[p].sibling(blobs=blobs) for p in sorted(tree)],
            }
        )

    async def _resolve(self, request: Request) -> Response:
        self._log(request)
        found = self._find(request)
        if isinstance(found, Response):
            return found
        repo, commit = found
        file = repo.commits[commit].get(request.path_params["path"])
        if file is None:
            return _error(404, "EntryNotFound", "Entry not found")
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if file.lfs:
            signature = self._sign(file.sha256)
            headers.update(
                {
                    "X-Linked-Etag": f'"{file.sha256}"',
                    "X-Linked-Size": str(len(file.content)),
                    "ETag": f'"{file.blob_id}"',
                }
            )
            url = f"/cdn/{file.sha256}?signature={signature}"
            return RedirectResponse(url, status_code=302, headers=headers)
        headers["ETag"] = f'"{file.blob_id}"'
        return _ranged(request, file.content, headers)

    async def _cdn(self, request: Request) -> Response:
        self._log(request)
        sha256 = request.path_params["sha256"]
        given = request.query_params.get("signature", "")
        if not hmac.compare_digest(given, self._sign(sha256)):
            return Response(b"bad signature", status_code=403)
        content = self._blob(sha256)
        if content is None:
            return Response(b"no such object", status_code=404)
        return _ranged(request, content, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"})

    # -- helpers --------------------------------------------------------------------------

    def _log(self, request: Request) -> None:
        with self._lock:
            auth = request.headers.get("authorization")
            self.requests.append((request.method, request.url.path, auth))

    def _find(self, request: Request) -> tuple[FakeRepo, str] | Response:
        repo_id = f"{request.path_params['owner']}/{request.path_params['repo']}"
        with self._lock:
            repo = self.repos.get(repo_id)
            known = frozenset(t for r in self.repos.values() for t in (r.readers or ()))
        token = _bearer(request)
        if token is not None and token not in known:
            return _error(401, None, INVALID_CREDENTIALS)
        if repo is None or (repo.readers is not None and token not in repo.readers):
            status = 401 if token is None else 404
            return _error(status, "RepoNotFound", "Repository not found")
        commit = repo.resolve(request.path_params.get("revision") or "main")
        if commit is None:
            revision = request.path_params.get("revision")
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, commit

    def _blob(self, sha256: str) -> bytes | None:
        with self._lock:
            for repo in self.repos.values():
                for tree in repo.commits.values():
                    for file in tree.values():
                        if file.lfs and file.sha256 == sha256:
                            return file.content
        return None

    def _sign(self, sha256: str) -> str:
        return hmac.new(self._key, sha256.encode(), hashlib.sha256).hexdigest()


def _is_lfs(path: str, lfs: Collection[str] | None) -> bool:
    if lfs is not None:
        return path in lfs
    return PurePosixPath(path).suffix.lower() in LFS_SUFFIXES


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def _error(status: int, code: str | None, message: str) -> Response:
    headers = {"X-Error-Message": message}
    if code is not None:
        headers["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _ranged(request: Request, content: bytes, headers: dict[str, str]) -> Response:
    """The body, or the one byte range asked for (206), or 416 when it is outside."""
    size = len(content)
    spec = request.headers.get("range", "")
    first, last = 0, size - 1
    status = 200
    if spec.startswith("bytes=") and "," not in spec:
        start, _, end = spec[len("bytes=") :].partition("-")
        try:
            if start:
                first, last = int(start), min(int(end) if end else size - 1, size - 1)
            else:
                first, last = max(size - int(end), 0), size - 1
        except ValueError:
            return Response(b"bad range", status_code=400)
        if first >= size or first > last:
            return Response(b"", status_code=416, headers={"Content-Range": f"bytes */{size}"})
        status = 206
        headers = {**headers, "Content-Range": f"bytes {first}-{last}/{size}"}
    body = content[first : last + 1]
    headers = {**headers, "Content-Length": str(len(body))}
    if request.method == "HEAD":
        return Response(b"", status_code=status, headers=headers)
    return Response(
        body, status_code=status, headers=headers, media_type="application/octet-stream"
    )
