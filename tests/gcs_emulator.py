"""Servers on loopback for the storage tests and benchmark.

`running()` starts a GCS-compatible server: gcp-storage-emulator's request handlers, in memory,
in a subprocess, answering requests concurrently. `FaultyProxy` sits in front of it to inject
HTTP errors.

The emulator's own `start` command serves one request at a time and snapshots all object metadata
as JSON on every write (quadratic when uploading thousands of objects). Real GCS does neither, and
both would hide what parallel transfers do, so this launcher serves each request on its own thread
(writes serialised, since the emulator's in-memory store is not thread-safe) and skips the snapshot,
which an in-memory store never reads back. `latency_ms` delays every response, to stand in for the
round trip to a real bucket.

Run as a script to serve in the foreground: python tests/gcs_emulator.py PORT [LATENCY_MS]
"""
from __future__ import annotations

import contextlib
import functools
import http.client
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http import server
from typing import Iterator
from urllib.parse import urlparse

READY_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(port: int | None = None, latency_ms: float = 0.0) -> Iterator[str]:
    """Starts the server and yields its URL (the value for STORAGE_EMULATOR_HOST)."""
    port = port or free_port()
    process = subprocess.Popen([sys.executable, __file__, str(port), str(latency_ms)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_until_up(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"GCS emulator exited with {process.returncode}")
        try:
            urllib.request.urlopen(url + "/", timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"GCS emulator not answering at {url} after {READY_TIMEOUT_S:g} s")


def serve(port: int, latency_ms: float) -> None:
    from gcp_storage_emulator.server import RequestHandler
    from gcp_storage_emulator.storage import Storage

    logging.basicConfig(level=logging.ERROR)
    Storage._write_config_to_file = lambda self: None
    storage = Storage(use_memory_fs=True)
    writes = threading.Lock()

    class Handler(RequestHandler):
        def handle_one_request(self):
            time.sleep(latency_ms / 1000)
            with contextlib.nullcontext() if self._is_read() else writes:
                super().handle_one_request()

        def _is_read(self) -> bool:
            return self.rfile.peek(8).startswith((b"GET ", b"HEAD "))

    class Server(server.ThreadingHTTPServer):
        request_queue_size = 128

    Server(("127.0.0.1", port), functools.partial(Handler, storage)).serve_forever()


class FaultyProxy:
    """An HTTP proxy on loopback in front of `upstream` that answers chosen requests with an error
    status instead of forwarding them, counting those in `injected`."""

    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.injected = 0
        self._faults: list[list] = []  # [times left, status, bytes to match]
        self._lock = threading.Lock()
        self._server = server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, times: int, status: int = 503, matching: bytes = b"") -> None:
        """Answers `status` to the next `times` requests whose request line or body has `matching`."""
        with self._lock:
            self._faults.append([times, status, matching])

    def __enter__(self) -> "FaultyProxy":
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault_for(self, request: bytes) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault[0] > 0 and fault[2] in request:
                    fault[0] -= 1
                    self.injected += 1
                    return fault[1]
        return None

    def _forward(self, handler: server.BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        status = self._fault_for(handler.requestline.encode() + b"\n" + body)
        if status is not None:
            handler.send_response(status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        upstream = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            upstream.request(handler.command, handler.path, body, dict(handler.headers))
            response = upstream.getresponse()
            content = response.read()
        finally:
            upstream.close()
        handler.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    def _handler_class(self) -> type:
        proxy = self

        class Handler(server.BaseHTTPRequestHandler):
            def do_any(self):
                proxy._forward(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_any

            def log_message(self, format, *args):
                pass

        return Handler


if __name__ == "__main__":
    serve(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
