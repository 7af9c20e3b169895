"""``python -m gen_worker.testing.mock_orchestrator``: send one request to a real worker.

Starts a temporary scheduler speaking the production protocol, waits for one worker to connect
and register, sends one job request for ``--run`` with ``--payload-json``, prints what happens
and exits: 0 success, 1 job failure or bad arguments, 2 no worker in time, 3 no result in time::

    python -m gen_worker.testing.mock_orchestrator --listen 0.0.0.0:8080 \\
        --run hello --payload-json '{"name":"world"}'

It never prints a token.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import json
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from gen_worker.protocol import messages as m
from gen_worker.testing.scheduler import MockScheduler

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_NO_WORKER, EXIT_NO_RESULT = 0, 1, 2, 3


class Printer:
    """Human lines (``[output] {...}``) or, with ``--json``, one JSON object per line."""

    def __init__(self, *, as_json: bool, events: bool, registrations: bool) -> None:
        self.as_json = as_json
        self.events = events
        self.registrations = registrations

    def emit(self, kind: str, text: str, **data: Any) -> None:
        if self.as_json:
            line = json.dumps({"kind": kind, **data}, default=str)
        else:
            line = f"[{kind}] {text}"
        print(line, flush=True)

    def on_message(self, worker_id: str, message: Any) -> None:
        if isinstance(message, m.WorkerRegistration) and self.registrations:
            reg = msgspec.structs.replace(message, functions=[])  # schemas are long; names below
            names = [f.name for f in message.functions]
            self.emit("registration", f"{msgspec.json.encode(reg).decode()} functions={names}",
                      registration=msgspec.to_builtins(reg), functions=names)  # fmt: skip
        elif isinstance(message, m.JobEvent) and self.events:
            payload = json.loads(message.payload_json or b"{}")
            self.emit("event", f"{message.event_type}: {json.dumps(payload)}",
                      event_type=message.event_type, payload=payload)  # fmt: skip
        elif isinstance(message, m.JobDelta):
            delta = _decode(message.data)
            self.emit("delta", json.dumps(delta, default=str), delta=delta, seq=message.ref.seq)
        elif isinstance(message, m.WorkerEvent) and self.events:
            payload = json.loads(message.payload_json or b"{}")
            self.emit("worker_event", f"{message.event_type}: {json.dumps(payload)}",
                      event_type=message.event_type, payload=payload)  # fmt: skip


def _decode(data: bytes) -> Any:
    return msgspec.msgpack.decode(data) if data else None


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not REF=URL")
    return key, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gen_worker.testing.mock_orchestrator",
        description="Send one request to a worker through a temporary scheduler.",
    )
    p.add_argument("--listen", default="0.0.0.0:8080", metavar="HOST:PORT")
    p.add_argument("--wait-s", type=float, default=30.0, help="how long to wait for a worker")
    p.add_argument("--run", required=True, metavar="FUNCTION", help="the function to invoke")
    p.add_argument("--payload-json", default="{}", metavar="JSON")
    p.add_argument("--timeout-ms", type=int, default=0, help="the request's deadline")
    wait_help = "how long to wait for the result (default: deadline + 30 s, or 600 s)"
    p.add_argument("--result-wait-s", type=float, default=None, help=wait_help)
    p.add_argument("--owner", default="")
    p.add_argument("--invoker-id", default="")
    p.add_argument("--required-model", action="append", default=[], metavar="REF")
    p.add_argument("--input-ref-url", action="append", type=_pair, default=[], metavar="REF=URL",
                   help="give payload Assets with this ref this URL to download from")  # fmt: skip
    p.add_argument("--serve-files-dir", metavar="DIR", help="serve this folder over HTTP")
    p.add_argument("--serve-files-listen", default="127.0.0.1:0", metavar="HOST:PORT")
    p.add_argument("--print-events", action="store_true")
    p.add_argument("--print-registrations", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    return p


def _with_urls(value: Any, urls: dict[str, str]) -> Any:
    """Payload Assets named by ref get the URL to fetch them from."""
    if isinstance(value, dict):
        out = {k: _with_urls(v, urls) for k, v in value.items()}
        ref = out.get("ref")
        if isinstance(ref, str) and ref in urls and "url" not in out:
            out["url"] = urls[ref]
        return out
    if isinstance(value, list):
        return [_with_urls(v, urls) for v in value]
    return value


def _serve_files(folder: str, listen: str) -> str:
    """A plain HTTP server for ``folder`` in a daemon thread; returns its base URL."""
    host, _, port = listen.rpartition(":")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer((host, int(port)), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://{host}:{server.server_address[1]}"


def _payload(args: argparse.Namespace, file_base: str) -> bytes:
    try:
        payload = json.loads(args.payload_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--payload-json is not valid JSON: {exc}") from None
    urls = dict(args.input_ref_url)
    if file_base and args.serve_files_dir:
        for path in Path(args.serve_files_dir).rglob("*"):
            if path.is_file():
                ref = path.relative_to(args.serve_files_dir).as_posix()
                urls.setdefault(ref, f"{file_base}/{ref}")
    return msgspec.msgpack.encode(_with_urls(payload, urls))


def _report(printer: Printer, terminal: Any) -> int:
    if isinstance(terminal, m.JobResult) and terminal.success:
        output = _decode(terminal.output)
        printer.emit("output", json.dumps(output, default=str), output=output)
        return EXIT_OK
    if isinstance(terminal, m.StreamDone):
        printer.emit("output", "stream done", output=None, stream_done=True)
        return EXIT_OK
    printer.emit("error", f"type={terminal.error_type} safe={terminal.safe_message}",
                 error_type=terminal.error_type, safe_message=terminal.safe_message,
                 retryable=terminal.retryable)  # fmt: skip
    return EXIT_FAILED


async def _run(args: argparse.Namespace, printer: Printer, payload: bytes, file_base: str) -> int:
    scheduler = MockScheduler(listener=printer.on_message)
    address = await scheduler.start(args.listen)
    printer.emit("listening", f"address={address}", address=address)
    try:
        try:
            conn = await scheduler.wait_for_worker(args.wait_s)
        except TimeoutError:
            printer.emit(
                "error", f"no worker connected within {args.wait_s:g} s", error_type="no_worker"
            )
            return EXIT_NO_WORKER
        functions = [f.name for f in conn.registration.functions]
        printer.emit("connected", f"worker_id={conn.worker_id} functions={functions}",
                     worker_id=conn.worker_id, functions=functions)  # fmt: skip
        record = await scheduler.submit(
            args.run, payload, request_id=uuid.uuid4().hex, timeout_ms=args.timeout_ms,
            owner=args.owner, invoker_id=args.invoker_id, required_models=args.required_model,
            file_base_url=file_base,
        )  # fmt: skip
        printer.emit(
            "sent", f"request_id={record.job.request_id}", request_id=record.job.request_id
        )
        wait_s = args.result_wait_s or (args.timeout_ms / 1000 + 30 if args.timeout_ms else 600)
        try:
            terminal = await record.wait(wait_s)
        except TimeoutError:
            printer.emit("error", f"no result within {wait_s:g} s", error_type="no_result")
            return EXIT_NO_RESULT
        return _report(printer, terminal)
    finally:
        await scheduler.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    printer = Printer(
        as_json=args.json, events=args.print_events, registrations=args.print_registrations
    )
    try:
        file_base = (
            _serve_files(args.serve_files_dir, args.serve_files_listen)
            if args.serve_files_dir
            else ""
        )
        payload = _payload(args, file_base)
    except (ValueError, OSError) as exc:
        printer.emit("error", str(exc), error_type="bad_arguments")
        return EXIT_FAILED
    try:
        return asyncio.run(_run(args, printer, payload, file_base))
    except OSError as exc:
        printer.emit("error", f"cannot listen on {args.listen}: {exc}", error_type="bad_arguments")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
