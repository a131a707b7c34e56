"""Raw HTTP/1.1 requests for fuzzing a live server below any client library: any method, path,
query, headers and body bytes, delivered whole, in slow pieces, chunked, with a Content-Length
larger than the body (a truncated body), or abandoned partway (a client that goes away).

`wires(routes, keys, json_bodies)` draws requests; `send(port, wire)` delivers one and reads the
answer (None when there can be none: the body never completed)."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from hypothesis import strategies as st

METHODS = ["GET", "POST", "POST", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"]
CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/json; charset=utf-16", "application/octet-stream", "*/*", ""]  # fmt: skip
# Header values as clients send them: visible ASCII and Latin-1 letters (no CR/LF: that would be
# another request, not a header).
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                    blacklist_characters="\x7f"), max_size=40).map(str.strip)  # fmt: skip
HEADER_NAME = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).filter(
    lambda s: (
        s.strip("-")
        and s not in ("content-length", "transfer-encoding", "host", "connection", "expect")
    )
)
STRANGE_BODIES = [b"", b"{", b"[" * 50_000, b'{"a":' * 20_000, b"\xff\xfe\x00", b"\x00" * 64,
                  b"null", b"[]", b"{}", b'"x"', b"1e999999", b'{"model": "a", "prompt": "\\ud800"}',
                  b'{"model": "a", "messages": [{"role": "user", "content": "\\udfff"}]}',
                  json.dumps({"model": "a", "prompt": "hi"}).encode("utf-16")]  # fmt: skip


@dataclass(frozen=True)
class Wire:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    delivery: str = "whole"  # whole | slow | chunked | short (Content-Length > body) | abandon
    cut: int = 0  # abandon: bytes of the request sent before the client goes away

    def complete(self) -> bool:
        return self.delivery in ("whole", "slow", "chunked")

    def raw(self) -> bytes:
        head = [f"{self.method} {self.target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        head += [f"{k}: {v}" for k, v in self.headers]
        if self.delivery == "chunked":
            head.append("Transfer-Encoding: chunked")
            body = b"".join(
                f"{len(self.body[i : i + 997]):x}\r\n".encode() + self.body[i : i + 997] + b"\r\n"
                for i in range(0, len(self.body), 997)
            )
            body += b"0\r\n\r\n"
        else:
            extra = 1 + len(self.body) // 2 if self.delivery == "short" else 0
            head.append(f"Content-Length: {len(self.body) + extra}")
            body = self.body
        return "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body


@dataclass
class Answer:
    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self):
        return json.loads(self.body)


def _read_answer(sock: socket.socket) -> Answer:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # closed with our unread bytes in its buffer: RST
            break
        if not chunk:
            break
        data += chunk
    if not data:
        return Answer(None)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return Answer(int(lines[0].split()[1]), headers, body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out, data = out + rest[:n], rest[n + 2 :]
    return out


def send(port: int, wire: Wire, timeout: float = 120.0) -> Answer:
    """Deliver `wire` on a fresh connection and read the whole answer (the server closes after
    it: Connection: close). Incomplete requests wait briefly, then the client goes away."""
    raw = wire.raw()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if wire.delivery == "abandon":
            sock.sendall(raw[: wire.cut])
            return Answer(None)
        try:
            step = max(1, len(raw) // 8) if wire.delivery == "slow" else len(raw)
            for i in range(0, len(raw), step):
                sock.sendall(raw[i : i + step])
                time.sleep(0.002 if wire.delivery == "slow" else 0)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before the whole body (401, 413) and closed: read it
        if wire.delivery == "short":  # the server waits for the rest of the body; never sent
            sock.settimeout(0.2)
            try:
                return _read_answer(sock)
            except TimeoutError:
                return Answer(None)
        return _read_answer(sock)


def _target(routes: list[str]):
    names = st.text(max_size=10) | st.sampled_from(["..", "%2e%2e", "a/b", "\x00", "~"])
    paths = st.sampled_from(routes).flatmap(
        lambda r: (
            names.map(lambda n: r.replace("{}", quote(n, safe=""))) if "{}" in r else st.just(r)
        )
    )
    paths = paths | st.text(max_size=20).map(lambda s: "/" + quote(s, safe="/"))
    query = st.none() | st.text(max_size=30).map(lambda s: quote(s, safe="=&"))
    return st.builds(lambda p, q: p if q is None else f"{p}?{q}", paths, query)


@st.composite
def wires(draw, routes: list[str], keys: list[str], json_bodies: st.SearchStrategy) -> Wire:
    """Requests to `routes` (a `{}` in one is replaced by a random path segment) or anywhere,
    with one of `keys` (an Authorization header value; "" for none) or a random one, a content
    type or none, random headers, and a body: JSON from `json_bodies`, that JSON cut short, a
    strange body, random bytes, or one over any sensible size."""
    method = draw(st.sampled_from(METHODS))
    headers = []
    auth = draw(st.sampled_from(keys) | HEADER_TEXT)
    if auth:
        headers.append(("Authorization", auth))
    ctype = draw(st.sampled_from(CONTENT_TYPES))
    if ctype is not None:
        headers.append(("Content-Type", ctype))
    headers += draw(st.lists(st.tuples(HEADER_NAME, HEADER_TEXT), max_size=3))
    kind = draw(
        st.sampled_from(["json", "json", "json", "cut", "strange", "bytes", "huge", "none"])
    )
    if kind in ("json", "cut"):
        body = json.dumps(draw(json_bodies)).encode()
        if kind == "cut":
            body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif kind == "strange":
        body = draw(st.sampled_from(STRANGE_BODIES))
    elif kind == "bytes":
        body = draw(st.binary(max_size=200))
    elif kind == "huge":
        body = b'{"model": "a", "prompt": "' + b"x" * 1_100_000 + b'"}'
    else:
        body = b""
    delivery = draw(st.sampled_from(["whole"] * 6 + ["slow", "chunked", "short", "abandon"]))
    wire = Wire(method, draw(_target(routes)), tuple(headers), body, delivery)
    if delivery == "abandon":
        wire = Wire(wire.method, wire.target, wire.headers, body, delivery,
                    draw(st.integers(0, len(wire.raw()) - 1)))  # fmt: skip
    return wire
