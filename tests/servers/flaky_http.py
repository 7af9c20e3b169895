"""A small HTTP file server whose misbehaviour each test switches on, for download tests.

``FlakyServer`` serves byte strings on ``127.0.0.1:<free port>`` from a thread (HTTP/1.1,
keep-alive, ``Range: bytes=a-[b]`` honoured with 206/416). A test queues :class:`Fault`\\ s;
each request takes the first fault that matches it (by path and, optionally, by the start of
its Range) and uses it up. Every request is recorded (:class:`Served`: its Range header, the
status, how many body bytes were written to the socket) so a test can assert exactly what was
transferred. :attr:`FlakyServer.requests` lists them in arrival order.

Fault kinds:

``status``        answer ``status`` (5xx, 404, 403 ...) with a short body (and ``Retry-After:
                  <retry_after>`` when given)
``ignore_range``  answer 200 with the whole body even when Range was asked
``wrong_range``   answer a Range request with 206 from byte 0 (a Content-Range not starting
                  where asked)
``drop``          send ``after_bytes`` of the body, then reset the connection (RST)
``short``         send ``after_bytes`` of the body, then close cleanly (Content-Length
                  promised more)
``corrupt``       send the body with one byte flipped (in the middle of the blob)
``trickle``       send ``after_bytes`` at once, then ``piece_bytes`` every ``delay_s``
``hold``          send nothing of the body until :meth:`FlakyServer.release` is called
``redirect``      answer 302 to the same path with the query ``redirected=1``

A path added with ``signed=True`` answers 403 unless the query carries a ``sig`` issued by
:meth:`FlakyServer.signed_url` and not yet expired (:meth:`FlakyServer.expire_signatures`).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import struct
import threading
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["Fault", "FlakyServer", "Served"]

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_WRITE_BYTES = 256 << 10


@dataclass
class Fault:
    kind: str
    status: int = 503
    after_bytes: int = 0
    delay_s: float = 0.0
    piece_bytes: int = 1024
    times: int = 1  # how many requests it affects; -1: every request
    path: str | None = None  # only requests for this path
    range_start: int | None = None  # only requests whose Range starts at this byte
    retry_after: str | None = None  # status: a Retry-After header to send


@dataclass
class Served:
    """One request as the server saw and answered it (a copy; the server keeps its own)."""

    path: str
    query: str
    range: str | None
    status: int = 0  # set before the status line is sent
    sent: int = 0  # body bytes written to the socket so far
    fault: str | None = None
    done: bool = False


class _Http(ThreadingHTTPServer):
    daemon_threads = True
    owner: FlakyServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-body is what these tests are about; stay quiet for it.
        del request, client_address


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Http

    def log_message(self, format: str, *args: Any) -> None:
        del format, args

    def setup(self) -> None:
        super().setup()
        self.server.owner._connections.add(self.connection)

    def finish(self) -> None:
        self.server.owner._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path)
        record = owner._arrived(Served(parts.path, parts.query, self.headers.get("Range")))
        try:
            self._answer(owner, record)
        finally:
            owner._finished(record)

    def _answer(self, owner: FlakyServer, record: Served) -> None:
        data = owner._files.get(record.path)
        match = _RANGE.fullmatch(record.range or "")
        fault = self._refusal(owner, record, data, match)
        if data is None or record.status:
            return  # refused: answered already
        kind = record.fault
        if kind == "corrupt":
            flipped = bytearray(data)
            flipped[len(data) // 2] ^= 0xFF
            data = bytes(flipped)
        first, last, status = 0, len(data) - 1, 200
        if match and kind != "ignore_range":
            first = int(match[1])
            last = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
            if first >= len(data) or first > last:
                record.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if kind == "wrong_range":
                first = 0
            status = 206
        body = memoryview(data)[first : last + 1]
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        self.end_headers()
        self._body(owner, record, body, fault)

    def _refusal(
        self,
        owner: FlakyServer,
        record: Served,
        data: bytes | None,
        match: re.Match[str] | None,
    ) -> Fault | None:
        """Answer a request that gets no body (404, 403, an injected status, a redirect);
        otherwise return the fault it takes, if any."""
        if data is None:
            self._small(record, 404, b"no such file")
            return None
        if record.path in owner._signed:
            sig = parse_qs(record.query).get("sig", [""])[0]
            if sig not in owner._valid_sigs:
                self._small(record, 403, b"signature expired")
                return None
        fault = owner._take_fault(record.path, int(match[1]) if match else None)
        record.fault = fault.kind if fault else None
        if fault is not None and fault.kind == "status":
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            self._small(record, fault.status, b"injected failure", extra)
        elif fault is not None and fault.kind == "redirect":
            self._small(record, 302, b"", {"Location": f"{record.path}?redirected=1"})
        return fault

    def _small(
        self, record: Served, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        record.status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(
        self, owner: FlakyServer, record: Served, body: memoryview, fault: Fault | None
    ) -> None:
        kind = fault.kind if fault else None
        if fault is not None and kind == "hold":
            owner._released.wait()
        if fault is None or kind not in ("drop", "short", "trickle"):
            self._write(record, body)
            return
        cut = min(fault.after_bytes, len(body))
        if not self._write(record, body[:cut]):
            return
        if kind == "drop":
            owner._stopping.wait(0.5)  # let the client read what was sent before the reset
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        elif kind == "short":
            self.close_connection = True
        elif kind == "trickle":
            for offset in range(cut, len(body), fault.piece_bytes):
                if owner._stopping.wait(fault.delay_s):
                    break
                if not self._write(record, body[offset : offset + fault.piece_bytes]):
                    break

    def _write(self, record: Served, data: memoryview) -> bool:
        """Send ``data``, counting what the socket took; False when the client has gone."""
        try:
            for offset in range(0, len(data), _WRITE_BYTES):
                piece = data[offset : offset + _WRITE_BYTES]
                self.wfile.write(piece)
                record.sent += len(piece)
        except OSError:
            self.close_connection = True
            return False
        return True


class FlakyServer:
    """The server; use as a context manager (starts on enter, stops on exit)."""

    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}
        self._signed: set[str] = set()
        self._valid_sigs: set[str] = set()
        self._sig_numbers = itertools.count(1)
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._requests: list[Served] = []
        self._changed = threading.Condition(self._lock)
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._released = threading.Event()
        self._http = _Http(("127.0.0.1", 0), _Handler)
        self._http.owner = self
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> FlakyServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._released.set()
        self._http.shutdown()
        for connection in list(self._connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._http.server_close()
        self._thread.join(timeout=5)

    # -- content --------------------------------------------------------------------------

    def add(self, path: str, data: bytes, *, signed: bool = False) -> str:
        """Serve ``data`` at ``path``; returns its URL (a signed one when ``signed``)."""
        self._files[path] = data
        if signed:
            self._signed.add(path)
            return self.signed_url(path)
        return self.url(path)

    def url(self, path: str, query: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")

    def signed_url(self, path: str) -> str:
        """A URL for ``path`` with a new valid signature."""
        sig = f"SECRETSIG{next(self._sig_numbers)}"
        with self._lock:
            self._valid_sigs.add(sig)
        return self.url(path, f"sig={sig}&expires=1")

    def expire_signatures(self) -> None:
        with self._lock:
            self._valid_sigs.clear()

    # -- misbehaviour ---------------------------------------------------------------------

    def fault(self, kind: str, **kwargs: Any) -> Fault:
        """Queue a fault (see the module docstring); returns it."""
        fault = Fault(kind, **kwargs)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def release(self) -> None:
        """Let requests held by a ``hold`` fault send their bodies."""
        self._released.set()

    def _take_fault(self, path: str, range_start: int | None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path not in (None, path):
                    continue
                if fault.range_start is not None and fault.range_start != (range_start or 0):
                    continue
                if fault.times > 0:
                    fault.times -= 1
                    if fault.times == 0:
                        self._faults.remove(fault)
                return replace(fault)
        return None

    # -- what happened --------------------------------------------------------------------

    def _arrived(self, record: Served) -> Served:
        with self._changed:
            self._requests.append(record)
        return record

    def _finished(self, record: Served) -> None:
        with self._changed:
            record.done = True
            self._changed.notify_all()

    @property
    def requests(self) -> list[Served]:
        """Every request so far, in arrival order, once those under way have finished (waits
        up to 10 s; a request still under way then is listed as it stands)."""
        with self._changed:
            self._changed.wait_for(lambda: all(r.done for r in self._requests), timeout=10)
            return [replace(r) for r in self._requests]

    def requests_so_far(self) -> list[Served]:
        """Every request so far, in arrival order, without waiting for those under way."""
        with self._changed:
            return [replace(r) for r in self._requests]

    @property
    def arrivals(self) -> int:
        with self._changed:
            return len(self._requests)

    def reset_requests(self) -> None:
        """Forget the requests so far (after waiting for those under way, as ``requests``)."""
        with self._changed:
            self._changed.wait_for(lambda: all(r.done for r in self._requests), timeout=10)
            self._requests.clear()

    def bytes_served(self) -> int:
        return sum(r.sent for r in self.requests)
