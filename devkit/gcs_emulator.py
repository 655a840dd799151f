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

It also closes two gaps between the emulator and real GCS that the job's code must not be tested
around:

* Object names are kept verbatim. GCS names are flat UTF-8 strings, not paths: `a//b.jpeg`,
  `/x.jpeg`, `a/../b.jpeg`, `a/./b.jpeg`, `folder/` (a console "folder" placeholder) and
  `a\\b.jpeg` are all valid and all distinct from `a/b.jpeg`. The emulator stores content at a
  normalised file path (slashes stripped, empty and `.` parts dropped, `..` refused) and writes
  names unescaped into `mediaLink`/`selfLink`, so such names collided, failed or downloaded the
  wrong object. Here content is keyed by the percent-escaped name, one flat key per object (see
  `verbatim_key`), and the links carry the name escaped as the JSON API wants it.
* Listings come in pages, as in GCS: at most 1,000 entries (objects and prefixes together) per
  response, fewer when `maxResults` says so, continued with `nextPageToken`/`pageToken`. The
  emulator answered any listing in one response, so code that gets paging wrong passed.
* Generations and preconditions hold, as without object versioning: every write of a name makes
  a new, larger generation (assigned when the write completes, as GCS does, so a resumable upload
  begun earlier but finished later is newer); a request naming a `generation` that is not the
  live one gets 404 (the emulator served the newest bytes); and `ifGenerationMatch` (0: only if
  there is no live object), `ifGenerationNotMatch`, `ifMetagenerationMatch` and
  `ifMetagenerationNotMatch` are checked against the live object on uploads (simple, multipart,
  and resumable, whose conditions are checked when the upload completes), metadata reads,
  downloads, patches and deletes, with 412 when one does not hold and nothing changed (the
  emulator ignored them all, so two writers that relied on them both "won"). Reads answer 412
  for the NotMatch conditions too, where GCS answers 304 Not Modified; nothing here relies on it.
  A download says which generation it served (`x-goog-generation`, `x-goog-metageneration`), as
  GCS does: the client sets the blob's generation from them, and the emulator's left it None.

Run as a script to serve in the foreground: python devkit/gcs_emulator.py PORT [LATENCY_MS]
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import http.client
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http import HTTPStatus, server
from typing import Iterator
from urllib.parse import parse_qs, quote, urlparse

READY_TIMEOUT_S = 20.0
MAX_PAGE_SIZE = 1000  # GCS's largest (and default) maxResults for objects.list
PRECONDITIONS = ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch",
                 "ifMetagenerationNotMatch")


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


def verbatim_key(name: str) -> str:
    """The in-memory store's key for an object's content: one flat path component, distinct for
    every distinct name. quote() leaves '.' alone, so '.' is escaped too (no '.' or '..' part)."""
    return quote(name, safe="").replace(".", "%2E")


def object_links(base_url: str, bucket_name: str, object_name: str, generation: str) -> dict:
    """selfLink and mediaLink of an object, its name escaped as one URL path segment."""
    escaped = quote(object_name, safe="")
    return {"selfLink": f"/storage/v1/b/{bucket_name}/o/{escaped}",
            "mediaLink": f"{base_url}/download/storage/v1/b/{bucket_name}/o/{escaped}"
                         f"?generation={generation}&alt=media"}


def encode_page_token(key: list) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


def decode_page_token(token: str) -> list:
    key = json.loads(base64.urlsafe_b64decode(token.encode()))
    if not (isinstance(key, list) and len(key) == 2 and isinstance(key[0], str)
            and isinstance(key[1], int)):
        raise ValueError(token)
    return key


class _ListingResponse:
    """Stands in for the emulator's Response while its own objects.ls builds the full listing."""

    def __init__(self):
        self.status = HTTPStatus.OK
        self.listing: dict | None = None

    def json(self, obj: dict) -> None:
        self.listing = obj


def paged_listing(full_listing, request, response, storage) -> None:
    """objects.list in pages of at most MAX_PAGE_SIZE entries (items and prefixes together, in
    name order), continued from pageToken; nextPageToken is set while entries remain."""

    def argument(name: str) -> str | None:
        values = request.query.get(name)
        return values[0] if values else None

    def bad_request(message: str) -> None:
        response.status = HTTPStatus.BAD_REQUEST
        response.json({"error": {"code": 400, "message": message}})

    try:
        page_size = min(int(argument("maxResults") or MAX_PAGE_SIZE), MAX_PAGE_SIZE)
        if page_size < 1:
            raise ValueError
    except ValueError:
        return bad_request(f"Invalid maxResults: {argument('maxResults')!r}")
    token = argument("pageToken")
    try:
        after = decode_page_token(token) if token else None
    except (ValueError, binascii.Error):
        return bad_request(f"Invalid pageToken: {token!r}")

    whole = _ListingResponse()
    full_listing(request, whole, storage)
    if whole.listing is None:
        response.status = whole.status
        return
    # Sort keys: (name, generation) for objects (soft-deleted listings hold several generations
    # of one name), (prefix, -1) for prefixes.
    entries = sorted([([item.get("name") or "", int(item.get("generation") or 0)], "items", item)
                      for item in whole.listing.get("items") or []]
                     + [([prefix, -1], "prefixes", prefix)
                        for prefix in whole.listing.get("prefixes") or []],
                     key=lambda entry: entry[0])
    if after is not None:
        entries = [entry for entry in entries if entry[0] > after]
    page = {**whole.listing, "items": [], "prefixes": []}
    for _key, kind, value in entries[:page_size]:
        page[kind].append(value)
    if len(entries) > page_size:
        page["nextPageToken"] = encode_page_token(entries[page_size - 1][0])
    response.json(page)


def unmet_precondition(query: dict[str, list[str]], live: dict | None) -> str | None:
    """The first precondition of a request's query (parse_qs form) that the live object (None:
    there is none, generation 0) does not meet, as `name=value`; None when all hold."""
    generation = int(live["generation"]) if live else 0
    metageneration = int(live["metageneration"]) if live else None
    holds = {"ifGenerationMatch": lambda value: generation == value,
             "ifGenerationNotMatch": lambda value: generation != value,
             "ifMetagenerationMatch": lambda value: metageneration == value,
             "ifMetagenerationNotMatch": lambda value: metageneration != value}
    for name in PRECONDITIONS:
        if name in query and not holds[name](int(query[name][0])):
            return f"{name}={query[name][0]}"
    return None


def refuse(response, status: HTTPStatus, message: str, reason: str) -> None:
    response.status = status
    response.json({"error": {"code": status.value, "message": message,
                             "errors": [{"domain": "global", "reason": reason,
                                         "message": message}]}})


def adapt_emulator():
    """Installs, in this (the server's) process, what the module docstring describes; returns the
    Storage class to serve."""
    from gcp_storage_emulator import server as emulator_server
    from gcp_storage_emulator.handlers import objects
    from gcp_storage_emulator.storage import Storage

    make_object_resource = objects._make_object_resource

    @functools.wraps(make_object_resource)
    def make_object_resource_with_escaped_links(base_url, bucket_name, object_name, *args,
                                                **kwargs):
        obj = make_object_resource(base_url, bucket_name, object_name, *args, **kwargs)
        if isinstance(object_name, str):
            obj.update(object_links(base_url, bucket_name, object_name, obj["generation"]))
        return obj

    objects._make_object_resource = make_object_resource_with_escaped_links
    _hold_generations_and_preconditions(objects, emulator_server.HANDLERS)

    list_in_pages = functools.partial(paged_listing, objects.ls)
    for _pattern, methods in emulator_server.HANDLERS:
        if methods.get("GET") is objects.ls:
            methods["GET"] = list_in_pages

    class VerbatimStorage(Storage):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.upload_preconditions: dict[str, dict] = {}  # resumable upload id -> conditions
            self.last_generation = 0

        def _object_path(self, bucket_name, file_name):
            return f"{bucket_name}/{verbatim_key(file_name)}"

        def create_file(self, bucket_name, file_name, content, file_obj, file_id=None):
            # A new generation, larger than any before, when the write completes; metageneration
            # 1 (the emulator counts the metadata of a multipart upload as a first patch).
            self.last_generation = max(time.time_ns(), self.last_generation + 1)
            generation = str(self.last_generation)
            file_obj.update(generation=generation, metageneration="1",
                            id=f"{bucket_name}/{file_name}/{generation}")
            if isinstance(file_obj.get("mediaLink"), str):
                file_obj["mediaLink"] = re.sub(r"generation=\d+", f"generation={generation}",
                                               file_obj["mediaLink"])
            super().create_file(bucket_name, file_name, content, file_obj, file_id)

        def _list_live_candidates(self, bucket_name, prefix=None):
            # Listings are not serialised with writes: take the bucket's entries in one step
            # instead of iterating a dict that an upload may grow meanwhile.
            entries = list(self.objects.get(bucket_name, {}).items())
            return [(name, obj) for name, obj in entries
                    if prefix is None or name.startswith(prefix)]

        def _write_config_to_file(self):
            pass  # the JSON snapshot: an in-memory store never reads it back

    return VerbatimStorage


def _hold_generations_and_preconditions(objects, handlers) -> None:
    """Wraps the emulator's object handlers so that generations and preconditions hold (see the
    module docstring). Writes are serialised (serve), so a check and the write it guards are one
    step, as they are in GCS."""
    from gcp_storage_emulator.exceptions import NotFound

    def live_object(storage, bucket_name: str, name: str) -> dict | None:
        try:
            return storage.get_file_obj(bucket_name, name)
        except NotFound:
            return None

    def refused(request, response, storage, name: str | None, query=None) -> bool:
        """Answers 404 or 412, and says so, when the request's generation or a precondition does
        not hold for the live object named."""
        query = request.query if query is None else query
        live = live_object(storage, request.params["bucket_name"], name) if name else None
        if "generation" in query and "softDeleted" not in query and (
                live is None or live["generation"] != query["generation"][0]):
            refuse(response, HTTPStatus.NOT_FOUND, f"No such object: {name} generation "
                   f"{query['generation'][0]}", "notFound")
            return True
        unmet = unmet_precondition(query, live)
        if unmet:
            refuse(response, HTTPStatus.PRECONDITION_FAILED, "At least one of the pre-conditions "
                   f"you specified did not hold ({unmet}).", "conditionNotMet")
            return True
        return False

    def by_object_id(handler):
        @functools.wraps(handler)
        def checked(request, response, storage, *args, **kwargs):
            name = request.params.get("object_id")
            if refused(request, response, storage, name):
                return
            live = live_object(storage, request.params["bucket_name"], name)
            if live and handler.__name__ == "download":  # GCS says what it served
                response["x-goog-generation"] = live["generation"]
                response["x-goog-metageneration"] = live["metageneration"]
            handler(request, response, storage, *args, **kwargs)
        return checked

    def upload_name(request) -> str | None:
        data = request.data  # read the body first: the connection stays usable after a refusal
        if "name" in request.query:
            return request.query["name"][0]
        if isinstance(data, dict):
            return (data.get("meta") or data).get("name")
        return None

    def by_upload_name(handler):
        @functools.wraps(handler)
        def checked(request, response, storage, *args, **kwargs):
            if not refused(request, response, storage, upload_name(request)):
                handler(request, response, storage, *args, **kwargs)
        return checked

    create_resumable = objects._create_resumable_upload
    finalize_resumable = objects._finalize_resumable_object

    @functools.wraps(create_resumable)
    def create_resumable_keeping_preconditions(request, response, storage):
        if "upload_id" in request.query:  # a chunk POSTed to the session URL
            return create_resumable(request, response, storage)
        if refused(request, response, storage, upload_name(request)):
            return None
        create_resumable(request, response, storage)
        location = parse_qs(urlparse(response["Location"]).query)
        storage.upload_preconditions[location["upload_id"][0]] = {
            name: request.query[name] for name in PRECONDITIONS if name in request.query}
        return None

    @functools.wraps(finalize_resumable)
    def finalize_if_preconditions_hold(response, storage, obj, data, upload_id):
        conditions = storage.upload_preconditions.pop(upload_id, {})
        unmet = unmet_precondition(conditions, live_object(storage, obj["bucket"], obj["name"]))
        if unmet:
            storage.delete_resumable_file_obj(upload_id)
            refuse(response, HTTPStatus.PRECONDITION_FAILED, "At least one of the pre-conditions "
                   f"you specified did not hold ({unmet}).", "conditionNotMet")
            return
        finalize_resumable(response, storage, obj, data, upload_id)

    objects._media_upload = by_upload_name(objects._media_upload)
    objects._multipart_upload = by_upload_name(objects._multipart_upload)
    objects._create_resumable_upload = create_resumable_keeping_preconditions
    objects._finalize_resumable_object = finalize_if_preconditions_hold
    for name in ("get", "download", "delete", "patch"):  # in the routing table and called by name
        original = getattr(objects, name)
        replacement = by_object_id(original)
        setattr(objects, name, replacement)
        for _pattern, methods in handlers:
            for method, handler in methods.items():
                if handler is original:
                    methods[method] = replacement


def serve(port: int, latency_ms: float) -> None:
    from gcp_storage_emulator.server import RequestHandler

    logging.basicConfig(level=logging.ERROR)
    storage = adapt_emulator()(use_memory_fs=True)
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
    status instead of forwarding them, counting those in `injected`, and forwards the requests
    `delay_s` seconds late (a slow link to the bucket), listing them in `answered`."""

    def __init__(self, upstream: str, delay_s: float = 0.0):
        self.upstream = urlparse(upstream)
        self.injected = 0
        self.delay_s = delay_s
        self.answered: list[str] = []  # the request lines forwarded and answered, in order
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
        time.sleep(self.delay_s)
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
        self.answered.append(handler.requestline)

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
