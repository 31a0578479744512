"""A trivial backend for the benchmark's ``hook`` and ``forward`` contenders (``forward_batch`` too).

It answers every ``POST /ws-connect`` with 200 and a fixed grant: the user ``bench``,
any room to join and publish to, and ``to`` relays (so that every scenario can run
with the hook on).  With ``BENCH_BACKEND_SECRET`` set, it first checks the
request's ``X-WS-Micro-Signature`` as docs/auth.md shows (an HMAC-SHA256 and a time
window) and answers 401 when it does not match: the work a real backend does
before it looks at the credentials.  It never looks them up.

    BENCH_BACKEND_SECRET=s3cret uvicorn bench.hook_backend:app --port 9000
"""

import hashlib
import hmac
import os
import time
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SECRET = os.environ.get("BENCH_BACKEND_SECRET", "").encode()
GRANT = b'{"user":"bench","join":["*"],"publish":["*"],"relay":true}'


def verify_signature(secret: bytes, header: str, body: bytes, tolerance: float = 300) -> bool:
    """docs/auth.md's function, unchanged."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if not fields.get("t", "").isdigit() or abs(time.time() - int(fields["t"])) > tolerance:
        return False
    expected = hmac.new(secret, fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))


async def connect(request: Request) -> Response:
    body = await request.body()
    if SECRET and not verify_signature(SECRET, request.headers.get("x-ws-micro-signature", ""), body):
        return Response(b'{"error":"bad signature"}', 401, media_type="application/json")
    return Response(GRANT, media_type="application/json")


_decode_events = msgspec.json.Decoder(dict[str, Any] | list[dict[str, Any]]).decode


def ack(event: dict[str, Any]) -> dict[str, Any]:
    """One ``ack`` carrying the event's data (its send time, for latency)."""
    return {"events": [{"event": "ack", "data": event["data"]}]}


async def events(request: Request) -> Response:
    """A forwarded event, or a batch of them (an array: forward_batch), each answered with an ``ack``."""
    body = await request.body()
    if SECRET and not verify_signature(SECRET, request.headers.get("x-ws-micro-signature", ""), body):
        return Response(b'{"error":"bad signature"}', 401, media_type="application/json")
    forwarded = _decode_events(body)
    answer = [ack(event) for event in forwarded] if isinstance(forwarded, list) else ack(forwarded)
    return Response(msgspec.json.encode(answer), media_type="application/json")


async def healthz(request: Request) -> Response:
    return Response(b"ok")


app = Starlette(routes=[Route("/ws-connect", connect, methods=["POST"]), Route("/events", events, methods=["POST"]),
                        Route("/healthz", healthz)])
