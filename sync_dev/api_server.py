"""A small real REST API of ours, for the tests, the demo and the benchmark (stdlib ``http.server``).

It serves mutable collections of JSON records (each with ``id`` and ``updated_at``) in every
pagination style the API source knows, on an ephemeral port::

    GET /v1/<style>/<collection>?updated_since=...&updated_before=...&limit=...
    style: single | next_link | link_header | cursor | offset | page_number

* ``single``       -> ``{"data": [...]}`` (everything);
* ``next_link``    -> ``{"data": [...], "next": "/v1/next_link/...?after=<token>&..."}``;
* ``link_header``  -> a bare JSON list, ``Link: <http://.../v1/link_header/...?after=...>; rel="next"``;
* ``cursor``       -> ``{"items": [...], "meta": {"next_cursor": "<token>" | null}}`` (``cursor=``);
* ``offset``       -> ``{"results": [...], "total": n}`` (``offset=``, ``limit=``);
* ``page_number``  -> ``{"data": [...], "page": p, "total_pages": k}`` (``page=``, ``per_page=``).

Records are ordered by ``(updated_at, key)`` (the key field is ``id`` unless ``keys`` says
otherwise); the token styles page by keyset, the offset and page styles slice the list as it is
*at each request*, so a record changed between two pages really moves (and may be served twice).
Faults for the resilience tests: a status (429/500/503 with
``Retry-After`` seconds or an HTTP date) or a connection reset for the next N matching requests,
slow pages, a rate limit, a cursor that never advances (``loop_cursor``), and a hook called after
each page is served (to change records between pages).  Auth: bearer, basic, or an API key in a
header or the query.

Run it alone (the benchmark does, so client and server do not share a GIL)::

    python -m sync_dev.api_server --records 100000 [--port 0]   # prints the port on the first line
"""

from __future__ import annotations

import argparse
import base64
import bisect
import datetime as dt
import email.utils
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

STYLES = ("single", "next_link", "link_header", "cursor", "offset", "page_number")
DEFAULT_PAGE_SIZE = 100


@dataclass
class Fault:
    """What the next ``times`` requests whose path and query contain ``match`` get instead of a page.

    ``kind``: ``"status"`` (``status`` with an optional ``Retry-After`` value), ``"reset"`` (the
    connection is reset, no response), ``"slow"`` (the page is served after ``seconds``).
    """

    kind: str = "status"
    status: int = 500
    retry_after: str | None = None
    seconds: float = 0.0
    times: int = 1
    match: str = ""


@dataclass
class ApiAuthConfig:
    """The credentials the server demands: ``bearer`` (token), ``basic`` (user, secret),
    ``header`` (an API key in header ``name``), ``query`` (an API key in parameter ``name``)."""

    kind: str
    secret: str
    user: str = ""
    name: str = "api_key"


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def customer_records(count: int, *, seed: int = 7, start: dt.datetime | None = None) -> list[dict[str, Any]]:
    """A deterministic data set: ``count`` customers of a credit bureau, one per second of ``updated_at``."""
    rng = random.Random(seed)
    start = start or dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    segments = ("retail", "private", "sme", "corporate")
    return [
        {
            "id": n,
            "name": f"customer-{n:07d}",
            "segment": segments[n % len(segments)],
            "credit_limit": rng.randrange(1_000, 500_000, 500),
            "risk_score": rng.randrange(300, 850),
            "updated_at": iso(start + dt.timedelta(seconds=n)),
        }
        for n in range(1, count + 1)
    ]


def _token(record: Mapping[str, Any], key: str) -> str:
    raw = json.dumps([record["updated_at"], record[key]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _untoken(token: str) -> tuple[dt.datetime, Any]:
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    updated_at, key = json.loads(raw)
    return parse_time(updated_at), key


@dataclass
class _Collection:
    key: str = "id"
    records: dict[Any, dict[str, Any]] = field(default_factory=dict)
    _cache: tuple[list[tuple[dt.datetime, Any]], list[dict[str, Any]]] | None = None

    def changed(self) -> None:
        self._cache = None

    def ordered(self) -> tuple[list[tuple[dt.datetime, Any]], list[dict[str, Any]]]:
        """The records by ``(updated_at, id)`` and their positions (cached until a change)."""
        if self._cache is None:
            key = self.key
            rows = sorted(self.records.values(), key=lambda r: (parse_time(r["updated_at"]), r[key]))
            self._cache = ([(parse_time(r["updated_at"]), r[key]) for r in rows], [dict(r) for r in rows])
        return self._cache


class ApiServer:
    """The server; ``with ApiServer(...) as api:`` starts it in a thread on an ephemeral port."""

    def __init__(
        self,
        collections: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        auth: ApiAuthConfig | None = None,
        keys: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._lock = threading.RLock()
        #: The key field of each collection (default ``id``).
        self.keys = dict(keys or {})
        self._collections: dict[str, _Collection] = {}
        for name, records in (collections or {}).items():
            self.replace(name, records)
        self.page_size = page_size
        self.auth = auth
        self.faults: list[Fault] = []
        self.loop_cursor = False
        #: Called with (collection, pages served so far) after each page, outside the lock.
        self.on_page: Callable[[str, int], None] | None = None
        #: Rate limit: at most ``limit[0]`` requests per ``limit[1]`` seconds (429 + Retry-After beyond).
        self.rate_limit: tuple[int, float] | None = None
        self._window_start = time.monotonic()
        self._window_requests = 0
        self.pages_served = 0
        self.log: list[tuple[str, int]] = []
        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="api-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- data
    def replace(self, collection: str, records: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            key = self.keys.get(collection, "id")
            self._collections[collection] = _Collection(key, {r[key]: dict(r) for r in records})
            self._collections[collection].changed()

    def upsert(self, collection: str, *records: Mapping[str, Any]) -> None:
        """Insert or replace records (a record with an ``updated_at`` in the past is a late publication)."""
        with self._lock:
            target = self._collections.setdefault(collection, _Collection(self.keys.get(collection, "id")))
            for record in records:
                target.records[record[target.key]] = dict(record)
            target.changed()

    def touch(self, collection: str, key: Any, **changes: Any) -> dict[str, Any]:
        """Change a record and stamp it ``updated_at`` = now."""
        with self._lock:
            record = self._collections[collection].records[key]
            record.update(changes, updated_at=iso(dt.datetime.now(dt.UTC)))
            self._collections[collection].changed()
            return dict(record)

    def delete(self, collection: str, *keys: Any) -> None:
        with self._lock:
            for key in keys:
                self._collections[collection].records.pop(key, None)
            self._collections[collection].changed()

    def records(self, collection: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._collections[collection].ordered()[1]]

    def fail(self, kind: str = "status", **options: Any) -> Fault:
        fault = Fault(kind=kind, **options)
        with self._lock:
            self.faults.append(fault)
        return fault

    # -- serving
    def _fault_for(self, target: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.match in target:
                    fault.times -= 1
                    return fault
        return None

    def _rate_limited(self) -> float | None:
        if self.rate_limit is None:
            return None
        limit, window = self.rate_limit
        with self._lock:
            now = time.monotonic()
            if now - self._window_start >= window:
                self._window_start, self._window_requests = now, 0
            self._window_requests += 1
            if self._window_requests > limit:
                return window - (now - self._window_start)
        return None

    def authorised(self, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        auth = self.auth
        if auth is None:
            return True
        if auth.kind == "bearer":
            return headers.get("Authorization") == f"Bearer {auth.secret}"
        if auth.kind == "basic":
            expected = base64.b64encode(f"{auth.user}:{auth.secret}".encode()).decode()
            return headers.get("Authorization") == f"Basic {expected}"
        if auth.kind == "header":
            return headers.get(auth.name) == auth.secret
        return query.get(auth.name) == auth.secret

    def page(self, style: str, collection: str, query: dict[str, str], base: str) -> tuple[Any, dict[str, str]]:
        """The body and extra headers of one page."""
        size = int(query.get("limit") or query.get("per_page") or self.page_size)
        with self._lock:
            if collection not in self._collections:
                raise KeyError(collection)
            positions, ordered = self._collections[collection].ordered()
            key = self._collections[collection].key
        low, high = 0, len(ordered)
        if query.get("updated_since"):
            low = bisect.bisect_left(positions, parse_time(query["updated_since"]), key=lambda p: p[0])
        if query.get("updated_before"):
            high = bisect.bisect_left(positions, parse_time(query["updated_before"]), key=lambda p: p[0])
        after = query.get("after") or query.get("cursor")
        if after and style not in ("offset", "page_number"):
            low = max(low, bisect.bisect_right(positions, _untoken(after)))
        rows = (
            ordered[low:high]
            if style in ("single", "offset", "page_number")
            else ordered[low : min(high, low + size + 1)]
        )
        if style == "single":
            return {"data": rows}, {}
        if style in ("offset", "page_number"):
            if style == "offset":
                offset = int(query.get("offset", 0))
                return {"results": rows[offset : offset + size], "total": len(rows)}, {}
            page = int(query.get("page", 1))
            chunk = rows[(page - 1) * size : page * size]
            return {"data": chunk, "page": page, "total_pages": max((len(rows) + size - 1) // size, 1)}, {}
        chunk = rows[:size]
        more = len(rows) > size
        token = None
        if more:
            token = after if (self.loop_cursor and after) else _token(chunk[-1], key)
        if style == "cursor":
            return {"items": chunk, "meta": {"next_cursor": token}}, {}
        link = None
        if token is not None:
            rest = {k: v for k, v in query.items() if k not in ("after", "cursor")}
            link = f"/v1/{style}/{collection}?{urlencode({**rest, 'after': token})}"
        if style == "next_link":
            return {"data": chunk, "next": link}, {}
        if style == "link_header":
            return chunk, ({"Link": f'<{base}{link}>; rel="next"'} if link else {})
        raise KeyError(style)


def _handler(server: ApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def _send(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
            payload = json.dumps(body, separators=(",", ":")).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = dict(parse_qsl(parts.query, keep_blank_values=True))
            server.log.append((self.path, 0))
            fault = server._fault_for(self.path)
            if fault is not None and fault.kind == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            if fault is not None and fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                self._send(fault.status, {"error": f"injected {fault.status}", "detail": "try again"}, headers)
                return
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.seconds)
            wait = server._rate_limited()
            if wait is not None:
                self._send(429, {"error": "rate limited"}, {"Retry-After": str(max(int(wait + 0.999), 1))})
                return
            if not server.authorised(dict(self.headers.items()), query):
                self._send(401, {"error": "unauthorized", "message": "missing or wrong credentials"})
                return
            segments = [s for s in parts.path.split("/") if s]
            if len(segments) != 3 or segments[0] != "v1" or segments[1] not in STYLES:
                self._send(404, {"error": f"no such endpoint {parts.path}"})
                return
            try:
                body, headers = server.page(segments[1], segments[2], query, f"http://{self.headers['Host']}")
            except KeyError as error:
                self._send(404, {"error": f"no such collection or style: {error}"})
                return
            except ValueError as error:
                self._send(400, {"error": f"bad parameter: {error}"})
                return
            self._send(200, body, headers)
            with server._lock:
                server.pages_served += 1
                served = server.pages_served
            if server.on_page is not None:
                server.on_page(segments[2], served)

    return Handler


def http_date(moment: dt.datetime) -> str:
    """``moment`` as an HTTP date (a ``Retry-After`` value)."""
    return email.utils.format_datetime(moment.astimezone(dt.UTC), usegmt=True)


@contextmanager
def running(
    collections: Mapping[str, Iterable[Mapping[str, Any]]] | None = None, **options: Any
) -> Iterator[ApiServer]:
    """A started server, stopped on exit."""
    server = ApiServer(collections, **options)
    with server:
        yield server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000, help="customers in collection 'customers'")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE)
    args = parser.parse_args(argv)
    server = ApiServer({"customers": customer_records(args.records)}, page_size=args.page_size, port=args.port)
    print(server.port, flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main()


__all__ = [
    "STYLES",
    "ApiAuthConfig",
    "ApiServer",
    "Fault",
    "customer_records",
    "http_date",
    "iso",
    "parse_time",
    "running",
]
