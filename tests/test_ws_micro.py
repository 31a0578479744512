"""Tests for ws_micro: in-process with Starlette's TestClient, end to end against a real uvicorn.

Every test asserts what a user sees: frames on the wire, HTTP statuses and
bodies, close codes, what a second client receives.  End-to-end tests start
`python ws_micro.py` (or `uvicorn ws_micro:app`) as a real process on a free
loopback port and talk to it with real `websockets` clients.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import inspect
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Self

import anyio
import anyio.lowlevel
import httpx2 as httpx
import msgspec
import pytest
from playwright.sync_api import Browser, Locator, Page, sync_playwright
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as connect_sync
from websockets.typing import Origin

import ws_micro
from ws_micro import Client, Event, Registry, Settings, create_app

ROOT = Path(__file__).parent.parent  # the repository: servers run from it, docs are read from it
LOOPBACK = ("127.0.0.1", 50000)
LOCAL = "http://localhost"  # a loopback name: without a token, the API answers no other Host
JSON = {"Content-Type": "application/json"}
TIMEOUT = 10  # seconds any single wait may take before the test fails


def frame(event: str, client_id: str, data: dict[str, Any] | None = None, **routing: str) -> dict[str, Any]:
    return {"event": event, "client_id": client_id, "data": {"data": data or {}}, **routing}


def error(client_id: str, code: str, event: str | None) -> dict[str, Any]:
    """The error frame the server sends, less its human-readable message."""
    return {"event": "error", "client_id": client_id, "data": {"data": {"code": code, "event": event}}}


def without_message(received: dict[str, Any]) -> dict[str, Any]:
    message = received["data"]["data"].pop("message")
    assert isinstance(message, str) and message
    return received


@contextlib.contextmanager
def gateway(**options: Any) -> Iterator[TestClient]:
    with TestClient(create_app(**options), client=LOOPBACK, base_url=LOCAL) as client:
        yield client


@contextlib.contextmanager
def connected(client: TestClient) -> Iterator[tuple[Any, str]]:
    with client.websocket_connect("/ws/py_client") as ws:
        hello = ws.receive_json()
        yield ws, hello["client_id"]


# --------------------------------------------------------------------------
# Protocol, in process
# --------------------------------------------------------------------------


def test_connect_frame_is_the_first_and_only_one() -> None:
    with gateway() as client, client.websocket_connect("/ws/py_client") as ws:
        hello = ws.receive_json()
        assert hello == {
            "event": "connect",
            "client_id": hello["client_id"],
            "data": {"data": {"message": "connection request granted"}},
        }
        assert len(hello["client_id"]) == 36  # str(uuid4())
        ws.send_json(frame("ping", hello["client_id"]))
        assert ws.receive_json()["event"] == "pong"  # no second connect frame came first


def test_each_connection_gets_its_own_id() -> None:
    with gateway() as client, connected(client) as (_, a), connected(client) as (_, b):
        assert a != b


def test_ping_replies_pong_with_the_same_data() -> None:
    with gateway() as client, connected(client) as (ws, me):
        ws.send_json(frame("ping", me, {"n": 1, "nested": [1, {"x": None}]}))
        assert ws.receive_json() == frame("pong", me, {"n": 1, "nested": [1, {"x": None}]})


def test_echo_returns_the_envelope_unchanged() -> None:
    with gateway() as client, connected(client) as (ws, me):
        text = json.dumps(frame("echo", me, {"text": "héllo"}), ensure_ascii=False)
        ws.send_text(text)
        assert ws.receive_text() == text


def test_to_delivers_the_frame_unchanged_to_that_client_and_to_self() -> None:
    with gateway() as client, connected(client) as (a, id_a), connected(client) as (b, id_b):
        text = json.dumps(frame("chat", id_a, {"msg": "hi B"}, to=id_b))
        a.send_text(text)
        assert b.receive_text() == text  # keeps the sender's client_id
        to_self = json.dumps(frame("note", id_a, {"msg": "to me"}, to=id_a))
        a.send_text(to_self)
        assert a.receive_text() == to_self


def test_rooms_join_publish_leave() -> None:
    with (gateway() as client, connected(client) as (a, id_a), connected(client) as (b, id_b),
          connected(client) as (c, id_c)):
        a.send_json(frame("join", id_a, {"room": "lobby"}))
        assert a.receive_json() == frame("joined", id_a, {"room": "lobby", "members": 1})
        b.send_json(frame("join", id_b, {"room": "lobby"}))
        assert b.receive_json() == frame("joined", id_b, {"room": "lobby", "members": 2})

        text = json.dumps(frame("chat", id_a, {"msg": "hello room"}, room="lobby"))
        a.send_text(text)
        assert b.receive_text() == text
        # The sender does not get its own room message, and C (not a member) gets nothing:
        # the next frame each sees is the reply to its own ping.
        for ws, me in ((a, id_a), (c, id_c)):
            ws.send_json(frame("ping", me))
            assert ws.receive_json()["event"] == "pong"

        b.send_json(frame("leave", id_b, {"room": "lobby"}))
        assert b.receive_json() == frame("left", id_b, {"room": "lobby", "members": 1})
        a.send_json(frame("chat", id_a, {}, room="lobby"))
        b.send_json(frame("ping", id_b))
        assert b.receive_json()["event"] == "pong"  # B left: the room message did not reach it


def test_api_push_carries_the_recipients_own_id() -> None:
    with gateway() as client, connected(client) as (ws, me):
        response = client.post(f"/api/clients/{me}", json={"event": "notice", "data": {"data": {"n": 1}}})
        assert (response.status_code, response.json()) == (202, {"delivered": 1})
        assert ws.receive_json() == frame("notice", me, {"n": 1})


@pytest.mark.parametrize(
    ("sent", "code", "event"),
    [
        ("not json", "invalid_json", None),
        ('{"event": "ping"', "invalid_json", None),
        ('{"event": 1, "client_id": "{me}", "data": {"data": {}}}', "invalid_event", None),
        ('{"event": "ping", "client_id": "{me}"}', "invalid_event", "ping"),
        ('{"event": "ping", "client_id": "{me}", "data": {"data": []}}', "invalid_event", "ping"),
        ('{"event": "ping", "client_id": "{me}", "data": {"data": {}}, "to": 5}', "invalid_event", "ping"),
        ('[1, 2]', "invalid_event", None),
        ('{"event": "ping", "client_id": "someone-else", "data": {"data": {}}}', "client_id_mismatch", "ping"),
        ('{"event": "x", "client_id": "{me}", "data": {"data": {}}, "to": "nobody"}', "unknown_client", "x"),
        ('{"event": "x", "client_id": "{me}", "data": {"data": {}}, "room": "r1"}', "not_in_room", "x"),
        ('{"event": "leave", "client_id": "{me}", "data": {"data": {"room": "r1"}}}', "not_in_room", "leave"),
        ('{"event": "join", "client_id": "{me}", "data": {"data": {"room": 7}}}', "invalid_event", "join"),
        ('{"event": "join", "client_id": "{me}", "data": {"data": {"room": ""}}}', "invalid_event", "join"),
        ('{"event": "x", "client_id": "{me}", "data": {"data": {}}, "to": "a", "room": "b"}', "invalid_event", "x"),
        ('{"event": "dance", "client_id": "{me}", "data": {"data": {}}}', "unknown_event", "dance"),
        # 2 KB nested a thousand levels deep: bad input, not a RecursionError and a 1011 close.
        ('{"event": "ping", "client_id": "{me}", "data": {"data": {"a": ' + "[" * 1000 + "]" * 1000 + "}}}",
         "invalid_json", None),
        ('{"event": 1, "data": ' + "[" * 1000 + "]" * 1000 + "}", "invalid_event", None),  # _event_name's decode
        ('{"event": "x", "client_id": "{me}", "data": {"data": {"a": "\\ud800x"}}}', "invalid_json", None),
    ],
)
def test_bad_frames_get_an_error_event_and_the_connection_stays_open(sent: str, code: str, event: str | None) -> None:
    with gateway() as client, connected(client) as (ws, me):
        ws.send_text(sent.replace("{me}", me))
        assert without_message(ws.receive_json()) == error(me, code, event)
        ws.send_json(frame("ping", me))
        assert ws.receive_json() == frame("pong", me)


def test_error_messages_say_what_is_wrong() -> None:
    with gateway() as client, connected(client) as (ws, me):
        ws.send_text(json.dumps({"event": "ping", "client_id": me, "data": {"data": "oops"}}))
        assert "$.data.data" in ws.receive_json()["data"]["data"]["message"]
        ws.send_text(json.dumps(frame("ping", "not-me")))
        assert "'not-me'" in ws.receive_json()["data"]["data"]["message"]
        lone = '{"event": "x", "client_id": "{me}", "data": {"data": {"a": "\\ud800x"}}}'.replace("{me}", me)
        ws.send_text(lone)  # msgspec itself says "Input data was truncated"
        at = lone.index("\\ud800")
        assert ws.receive_json()["data"]["data"]["message"] == (
            f"JSON is malformed: \\ud800 (character {at}) is a lone UTF-16 surrogate; "
            "a string may hold one only as half of a pair")
        deep = "[" * 2000 + "]" * 2000
        ws.send_text(f'{{"event": "ping", "client_id": "{me}", "data": {{"data": {{"a": {deep}}}}}}}')
        assert ws.receive_json()["data"]["data"]["message"] == "JSON is nested too deeply"


@pytest.mark.parametrize("name", ["connect", "error", "joined", "left", "pong"])
def test_clients_cannot_send_the_servers_events(name: str) -> None:
    # Relayed, a forged "connect" replaced the JS client's id, and a forged "pong" fed a dead connection's keepalive.
    with gateway() as client, connected(client) as (a, id_a), connected(client) as (b, id_b):
        for ws, me in ((a, id_a), (b, id_b)):
            ws.send_json(frame("join", me, {"room": "r"}))
            ws.receive_json()
        for routing in ({"to": id_b}, {"to": id_a}, {"room": "r"}, {}):
            a.send_json(frame(name, id_a, {"message": "forged"}, **routing))
            a.send_json(frame("ping", id_a))  # relays get no reply: without the error, the pong comes first
            reply = a.receive_json()
            assert f"{name!r} is sent by the server only" in reply["data"]["data"]["message"]
            assert without_message(reply) == error(id_a, "invalid_event", name)
            assert a.receive_json() == frame("pong", id_a)
        a.send_json(frame("chat", id_a, to=id_b))  # frames to B keep their order: nothing came before this
        assert b.receive_json() == frame("chat", id_a, to=id_b)


def test_room_limits_are_enforced() -> None:
    with gateway(max_rooms_per_connection=2, max_room_name_length=5) as client, connected(client) as (ws, me):
        for room in ("a", "b"):
            ws.send_json(frame("join", me, {"room": room}))
            assert ws.receive_json()["event"] == "joined"
        ws.send_json(frame("join", me, {"room": "c"}))
        assert without_message(ws.receive_json()) == error(me, "invalid_event", "join")
        ws.send_json(frame("join", me, {"room": "a"}))  # re-joining a room is not a new room
        assert ws.receive_json() == frame("joined", me, {"room": "a", "members": 1})
        ws.send_json(frame("leave", me, {"room": "b"}))
        ws.receive_json()
        ws.send_json(frame("join", me, {"room": "toolong"}))
        assert "1 to 5 characters" in ws.receive_json()["data"]["data"]["message"]


def test_rate_limit_sends_errors_then_closes_a_flood_with_1008() -> None:
    with gateway(rate_limit=0.001, rate_burst=3) as client, connected(client) as (ws, me):
        for _ in range(3):  # the burst
            ws.send_json(frame("ping", me))
            assert ws.receive_json()["event"] == "pong"
        for _ in range(3):  # over the limit: refused, still connected
            ws.send_json(frame("ping", me))
            assert without_message(ws.receive_json()) == error(me, "rate_limited", None)
        ws.send_json(frame("ping", me))  # still flooding: cut off
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert (closed.value.code, closed.value.reason) == (1008, "rate limit exceeded")


def test_rate_limit_zero_turns_it_off() -> None:
    with gateway(rate_limit=0, rate_burst=1) as client, connected(client) as (ws, me):
        for _ in range(20):
            ws.send_json(frame("ping", me))
        assert [ws.receive_json()["event"] for _ in range(20)] == ["pong"] * 20


def test_binary_frame_closes_with_1003() -> None:
    with gateway() as client, connected(client) as (ws, _):
        ws.send_bytes(b'{"event": "ping"}')
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1003


def test_frame_over_the_size_limit_closes_with_1009() -> None:
    def echo(me: str, pad: str) -> str:
        return json.dumps(frame("echo", me, {"x": pad}), ensure_ascii=False)

    limit = len(echo("0" * 36, "")) + 2 * 40  # the limit counts UTF-8 bytes: "é" is two
    with gateway(max_message_size=limit) as client, connected(client) as (ws, me):
        ws.send_text(echo(me, "é" * 40))  # exactly the limit: served
        assert ws.receive_json()["event"] == "echo"
        ws.send_text(echo(me, "é" * 39 + "éa"))  # one byte over (still fewer characters than bytes)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert (closed.value.code, closed.value.reason) == (1009, f"message larger than {limit} bytes")


# --------------------------------------------------------------------------
# Handlers (the embedding API)
# --------------------------------------------------------------------------


def test_handlers_reply_send_publish_and_broadcast() -> None:
    registry = Registry()

    @registry.on("shout")
    async def shout(client_id: str, event: Event) -> None:
        await registry.send_to_client(client_id, "shouted", {"heard": event.data.data["text"].upper()})
        await registry.publish("lobby", "room_news", {"from": client_id})
        await registry.broadcast("everyone", {"n": 1})

    with (TestClient(create_app(registry=registry)) as client, connected(client) as (a, id_a),
          connected(client) as (b, id_b)):
        b.send_json(frame("join", id_b, {"room": "lobby"}))
        b.receive_json()
        a.send_json(frame("shout", id_a, {"text": "hi"}))
        assert a.receive_json() == frame("shouted", id_a, {"heard": "HI"})
        assert a.receive_json() == frame("everyone", id_a, {"n": 1})
        assert b.receive_json() == frame("room_news", id_b, {"from": id_a})
        assert b.receive_json() == frame("everyone", id_b, {"n": 1})


def test_a_failing_handler_is_logged_and_only_its_sender_is_told(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()

    @registry.on("explode")
    async def explode(client_id: str, event: Event) -> None:
        raise ZeroDivisionError("boom")

    with (TestClient(create_app(registry=registry)) as client, connected(client) as (a, id_a),
          connected(client) as (b, id_b), caplog.at_level(logging.ERROR, logger="ws_micro")):
        a.send_json(frame("explode", id_a))
        reply = a.receive_json()
        assert without_message(reply) == error(id_a, "internal_error", "explode")
        assert "boom" not in json.dumps(reply)  # no internals leak to the client
        assert "ZeroDivisionError: boom" in caplog.text  # the traceback is in the log
        for ws, me in ((a, id_a), (b, id_b)):  # both still served; B saw nothing
            ws.send_json(frame("ping", me))
            assert ws.receive_json()["event"] == "pong"


def test_builtin_events_cannot_be_overridden() -> None:
    with pytest.raises(ValueError, match="'ping' is a built-in event"):
        Registry().on("ping")
    for name in ("connect", "error", "pong", "joined", "left"):
        with pytest.raises(ValueError, match=f"'{name}' is sent by the server only"):
            Registry().on(name)


def test_embedded_in_a_host_app_that_calls_the_registry() -> None:
    gateway_app = create_app()
    registry: Registry = gateway_app.state.registry

    async def notify(request: Request) -> JSONResponse:
        delivered = await registry.broadcast("host_news", {"path": request.url.path})
        return JSONResponse({"sent": delivered})

    host = Starlette(routes=[Route("/notify", notify, methods=["POST"]), Mount("/rt", app=gateway_app)])
    with (TestClient(host, client=LOOPBACK, base_url=LOCAL) as client,
          client.websocket_connect("/rt/ws/py_client") as ws):
        me = ws.receive_json()["client_id"]
        assert client.post("/notify").json() == {"sent": 1}
        assert ws.receive_json() == frame("host_news", me, {"path": "/notify"})
        assert client.get("/rt/api/clients").json()["count"] == 1


def test_middleware_added_to_the_gateway_also_sees_its_websockets() -> None:
    seen: list[str] = []

    class Record:  # the gateway's WebSockets skip Starlette's stack only while it has no middleware
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            seen.append(scope["type"])
            await self.app(scope, receive, send)

    app = create_app()
    app.add_middleware(Record)
    with TestClient(app) as client, client.websocket_connect("/ws/py_client") as ws:
        assert ws.receive_json()["event"] == "connect"
    assert "websocket" in seen


def test_other_websocket_paths_get_starlettes_answer() -> None:
    with TestClient(create_app()) as client, pytest.raises(WebSocketDisconnect) as refused, \
            client.websocket_connect("/ws/elsewhere"):
        pass
    assert refused.value.code == 1000  # Starlette's router closes unknown WebSocket routes


# --------------------------------------------------------------------------
# Sidecar HTTP API, in process
# --------------------------------------------------------------------------


def test_api_lists_describes_and_disconnects_clients() -> None:
    with gateway() as client:
        with connected(client) as (ws, me):
            ws.send_json(frame("join", me, {"room": "r"}))
            ws.receive_json()
            listing = client.get("/api/clients").json()
            assert listing["count"] == 1
            [entry] = listing["clients"]
            assert entry["client_id"] == me and entry["rooms"] == ["r"]
            assert entry["connected_at"].endswith("+00:00")
            assert client.get(f"/api/clients/{me}").json() == entry

            response = client.delete(f"/api/clients/{me}")
            assert (response.status_code, response.json()) == (202, {"disconnected": 1})
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert (closed.value.code, closed.value.reason) == (1000, "disconnected by the server")
        # Leaving the block waited for the server side to finish: no client, no room is left.
        assert client.get("/api/clients").json() == {"count": 0, "clients": []}
        assert client.get(f"/api/clients/{me}").status_code == 404
        assert client.post("/api/rooms/r", json={"event": "x", "data": {"data": {}}}).json() == {"delivered": 0}


def test_api_room_publish_and_broadcast_count_deliveries() -> None:
    with gateway() as client, connected(client) as (a, id_a), connected(client) as (b, id_b):
        a.send_json(frame("join", id_a, {"room": "r"}))
        a.receive_json()
        body = {"event": "news", "data": {"data": {"k": "v"}}}
        assert client.post("/api/rooms/r", json=body).json() == {"delivered": 1}
        assert a.receive_json() == frame("news", id_a, {"k": "v"})
        assert client.post("/api/rooms/empty", json=body).json() == {"delivered": 0}
        response = client.post("/api/broadcast", json=body)
        assert (response.status_code, response.json()) == (202, {"delivered": 2})
        assert a.receive_json() == frame("news", id_a, {"k": "v"})
        assert b.receive_json() == frame("news", id_b, {"k": "v"})


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/api/clients/nobody", {"event": "x", "data": {"data": {}}}, 404, "unknown_client"),
        ("GET", "/api/clients/nobody", None, 404, "unknown_client"),
        ("DELETE", "/api/clients/nobody", None, 404, "unknown_client"),
        ("POST", "/api/broadcast", b"{not json", 400, "invalid_json"),
        ("POST", "/api/broadcast", {"event": 3, "data": {"data": {}}}, 422, "invalid_event"),
        ("POST", "/api/broadcast", {"event": "x"}, 422, "invalid_event"),
        ("POST", "/api/rooms/r", {"event": "x", "data": {"data": "no"}}, 422, "invalid_event"),
        ("POST", "/api/broadcast", {"event": "x", "data": {"data": {"big": "x" * 200}}}, 413, "too_large"),
        ("GET", "/api/nothing-here", None, 404, "not_found"),
        ("PUT", "/api/broadcast", None, 405, "method_not_allowed"),
    ],
)
def test_api_errors_are_json_with_a_code_and_message(method: str, path: str, body: Any, status: int,
                                                      code: str) -> None:
    with gateway(max_message_size=150) as client:
        content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        response = client.request(method, path, content=content, headers=JSON if content else {})
        assert response.status_code == status
        assert response.json()["error"]["code"] == code
        assert response.json()["error"]["message"]
        if status == 405:
            assert response.headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"event": "x", "data": {"data": {"a": "caf\xe9"}}}', "the body is not UTF-8: b'\\xe9' at byte {\xe9}"),
        (b'{"ev\xffent": "x", "data": {"data": {}}}',  # was 422, missing field "event"
         "the body is not UTF-8: b'\\xff' at byte {\xff}"),
        (b'{"event": "x", "data": {"data": {}}, "extra": "\xed\xa0\x80"}',  # was 202: msgspec skips unknown fields
         "the body is not UTF-8: b'\\xed' at byte {\xed}"),
        (b'{"event": "x", "data": {"data": {"a": ' + b"[" * 1000 + b"]" * 1000 + b"}}}", "JSON is nested too deeply"),
        (b'{"event": "x", "data": {"data": {"a": "\\ud800x"}}}',
         "JSON is malformed: \\ud800 (character 39) is a lone UTF-16 surrogate; a string may hold one only as half "
         "of a pair"),
    ],
)
def test_api_bad_bodies_are_400_and_say_what_is_wrong(body: bytes, message: str) -> None:
    for bad in (b"\xe9", b"\xff", b"\xed"):  # where the bad byte is
        if bad in body:
            message = message.replace("{" + bad.decode("latin-1") + "}", str(body.index(bad)))
    with gateway() as client:
        response = client.post("/api/broadcast", content=body, headers=JSON)
        assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_json")
        assert response.json()["error"]["message"].startswith(message)


def test_api_validation_error_names_the_field() -> None:
    with gateway() as client:
        response = client.post("/api/broadcast", json={"event": "x", "data": {"data": 5}})
        assert "$.data.data" in response.json()["error"]["message"]


def test_api_without_token_answers_loopback_only() -> None:
    with TestClient(create_app(), client=("203.0.113.9", 4000)) as remote:
        response = remote.get("/api/clients")
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"
    with TestClient(create_app(), client=("::1", 4000), base_url=LOCAL) as local:
        assert local.get("/api/clients").status_code == 200


@pytest.mark.parametrize(
    ("host", "answered"),
    [
        ("localhost", True), ("localhost:8000", True), ("LocalHost:8000", True), ("app.localhost:8000", True),
        ("127.0.0.1:8000", True), ("127.8.9.10", True), ("[::1]:8000", True), ("[::1]", True),
        ("evil.example", False), ("evil.example:8000", False), ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False), ("192.0.2.7:8000", False), ("[::2]:8000", False), ("::1", False),
        ("localhost:http", False), ("", False),
    ],
)
def test_api_without_token_answers_requests_for_a_loopback_name_only(host: str, answered: bool) -> None:
    # A DNS-rebinding page reaches us from loopback, but under its own name: Host: evil.example.
    with gateway() as client:
        response = client.get("/api/clients", headers={"Host": host})
        if answered:
            assert response.status_code == 200
        else:
            assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden")
            assert f"not Host {host!r}" in response.json()["error"]["message"]
    with TestClient(create_app(api_token="t"), headers={"Authorization": "Bearer t", "Host": host}) as client:
        assert client.get("/api/clients").status_code == 200  # with a token, the token decides


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
def test_api_without_token_refuses_proxied_requests(header: str) -> None:
    with gateway() as client:
        response = client.get("/api/clients", headers={header: "127.0.0.1"})
        assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden")
        assert f"has {header.lower()!r}" in response.json()["error"]["message"]
    with TestClient(create_app(api_token="t"), headers={"Authorization": "Bearer t"}) as client:
        assert client.get("/api/clients", headers={header: "127.0.0.1"}).status_code == 200


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({"Origin": "http://evil.example"}, False),
        ({"Origin": "null"}, False),  # a sandboxed frame, a file:// page
        ({"Origin": "http://localhost:3000"}, False),  # another port: another origin
        ({"Sec-Fetch-Site": "cross-site"}, False),  # a GET from another site's page carries no Origin
        ({"Sec-Fetch-Site": "same-site"}, False),  # another port or subdomain of this site: any local dev server
        ({"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"}, False),
        ({"Origin": LOCAL}, True),  # the page served beside the API
        ({"Origin": LOCAL, "Sec-Fetch-Site": "same-origin"}, True),
        ({"Sec-Fetch-Site": "none"}, True),  # typed in the address bar
        ({"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"}, True),  # listed in allowed_origins
    ],
)
def test_api_refuses_requests_from_other_sites_pages(headers: dict[str, str], allowed: bool) -> None:
    for token in (None, "t"):  # a token does not make another site's page welcome
        auth = {"Authorization": "Bearer t"} if token else {}
        with (gateway(api_token=token, allowed_origins=("https://app.example",)) as client,
              connected(client) as (ws, me)):
            for method, path, body in (("GET", "/api/clients", None),
                                       ("POST", "/api/broadcast", {"event": "forged", "data": {"data": {}}}),
                                       ("DELETE", f"/api/clients/{me}", None)):
                response = client.request(method, path, json=body, headers={**headers, **auth})
                if allowed:
                    assert response.status_code in (200, 202), (method, response.text)
                else:
                    assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden"), method
                    assert response.json()["error"]["message"]
            if allowed:
                assert ws.receive_json()["event"] == "forged"
                with pytest.raises(WebSocketDisconnect):  # kicked
                    ws.receive_json()
            else:  # neither broadcast nor kicked: the next frame is the reply to a ping
                ws.send_json(frame("ping", me))
                assert ws.receive_json() == frame("pong", me)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
def test_api_pushes_must_be_sent_as_json(content_type: str | None) -> None:
    # text/plain and forms are what a page may POST to any site without a CORS preflight.
    body = b'{"event": "forged", "data": {"data": {}}}'
    for token in (None, "t"):
        auth = {"Authorization": "Bearer t"} if token else {}
        with gateway(api_token=token) as client, connected(client) as (ws, me):
            for path in ("/api/broadcast", "/api/rooms/r", f"/api/clients/{me}"):
                headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
                response = client.post(path, content=body, headers=headers)
                assert (response.status_code, response.json()["error"]["code"]) == (415, "unsupported_media_type")
                assert repr(content_type) in response.json()["error"]["message"]
            for json_type in ("application/json", "Application/JSON; charset=utf-8"):
                response = client.post(f"/api/clients/{me}", content=body, headers={**auth, "Content-Type": json_type})
                assert response.status_code == 202
                assert ws.receive_json() == frame("forged", me)


def test_api_with_token_needs_the_bearer_token_from_anywhere() -> None:
    with TestClient(create_app(api_token="s3cret"), client=("203.0.113.9", 4000)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = client.get("/api/clients", headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "unauthorized"
        assert client.get("/api/clients", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_healthz_and_metrics_in_prometheus_text_format() -> None:
    with gateway() as client, connected(client) as (ws, me):
        assert client.get("/healthz").json() == {"status": "ok", "connections": 1}
        ws.send_json(frame("ping", me))
        ws.receive_json()
        ws.send_text("garbage")
        ws.receive_json()
        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(response.text) for s in family.samples}
        assert samples[("ws_micro_open_connections", ())] == 1
        assert samples[("ws_micro_connections_total", ())] == 1
        assert samples[("ws_micro_messages_received_total", ())] == 2
        assert samples[("ws_micro_messages_sent_total", ())] == 3  # connect, pong, error
        assert samples[("ws_micro_errors_total", (("code", "invalid_json"),))] == 1
        assert samples[("ws_micro_errors_total", (("code", "rate_limited"),))] == 0
        assert samples[("ws_micro_disconnects_total", (("reason", "closed"),))] == 0
        assert samples[("ws_micro_rejected_handshakes_total", (("reason", "full"),))] == 0


# --------------------------------------------------------------------------
# Handshake checks, in process
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "origin", "accepted"),
    [
        ((), None, True),  # not a browser
        ((), "http://testserver", True),  # same origin as the Host header (TestClient's, for WebSockets)
        ((), "http://evil.example", False),
        ((), "null", False),
        (("https://app.example",), "https://app.example", True),
        (("https://app.example",), "https://other.example", False),
        (("*",), "http://anything.example", True),
    ],
)
def test_origin_allow_list(allowed: tuple[str, ...], origin: str | None, accepted: bool) -> None:
    headers = {"origin": origin} if origin else {}
    with gateway(allowed_origins=allowed) as client:
        if accepted:
            with client.websocket_connect("/ws/py_client", headers=headers) as ws:
                assert ws.receive_json()["event"] == "connect"
        else:
            with pytest.raises(WebSocketDenialResponse) as refused, \
                    client.websocket_connect("/ws/py_client", headers=headers):
                pass
            assert refused.value.status_code == 403
            assert refused.value.json()["error"]["code"] == "origin"
            assert client.get("/healthz").json()["connections"] == 0


def test_handshakes_beyond_max_connections_get_503() -> None:
    with gateway(max_connections=2) as client, connected(client), connected(client):
        with pytest.raises(WebSocketDenialResponse) as refused, client.websocket_connect("/ws/py_client"):
            pass
        assert refused.value.status_code == 503
        assert "2 connections" in refused.value.json()["error"]["message"]
    with gateway(max_connections=1) as client:  # a slot frees up when a client leaves
        for _ in range(3):
            with connected(client):
                pass


# --------------------------------------------------------------------------
# Settings, environment and command line
# --------------------------------------------------------------------------


def test_settings_come_from_ws_micro_environment_variables() -> None:
    env = {"WS_MICRO_MAX_MESSAGE_SIZE": "2048", "WS_MICRO_RATE_LIMIT": "2.5", "WS_MICRO_API_TOKEN": "t",
           "WS_MICRO_ALLOWED_ORIGINS": "https://a.example, https://b.example", "OTHER": "x"}
    assert ws_micro.options_from_env(Settings, env) == {
        "max_message_size": 2048, "rate_limit": 2.5, "api_token": "t",
        "allowed_origins": ("https://a.example", "https://b.example"),
    }
    assert ws_micro.options_from_env(ws_micro.ServerSettings, {"WS_MICRO_PER_MESSAGE_DEFLATE": "on"}) == {
        "per_message_deflate": True}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WS_MICRO_MAX_CONNECTIONS": "lots"}, "WS_MICRO_MAX_CONNECTIONS must be an integer, but got 'lots'"),
        ({"WS_MICRO_MAX_MESSAGE_SIZE": "0"}, "max_message_size must be at least 1, but got 0"),
        ({"WS_MICRO_RATE_LIMIT": "-1"}, "rate_limit must be 0 (off) or more, but got -1.0"),
        ({"WS_MICRO_CONNECT_HOOK_URL": "ftp://backend/hook", "WS_MICRO_BACKEND_SECRET": "s"},
         "connect_hook_url must be an http:// or https:// URL, but got 'ftp://backend/hook'"),
        ({"WS_MICRO_CONNECT_HOOK_URL": "http://backend/hook"},
         "connect_hook_url needs backend_secret, the key the backend checks the gateway's requests with "
         "(python -c 'import secrets; print(secrets.token_hex(32))')"),
        ({"WS_MICRO_JWT_PUBLIC_KEY": "/no/such/key.pem"},
         "jwt_public_key must be PEM text or a PEM file, but cannot read '/no/such/key.pem': No such file"),
        ({"WS_MICRO_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----"},
         "jwt_public_key is not a PEM public key:"),
    ],
)
def test_bad_settings_are_refused_with_the_bad_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as refused:
        create_app(**ws_micro.options_from_env(Settings, env))
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--max-connections", "many"], {}, "argument --max-connections: must be an integer, but got 'many'"),
        ([], {"WS_MICRO_MAX_CONNECTIONS": "lots"}, "WS_MICRO_MAX_CONNECTIONS must be an integer, but got 'lots'"),
        ([], {"WS_MICRO_SEND_TIMEOUT": "0"}, "send_timeout must be more than 0, but got 0.0"),
        (["--port", "70000"], {}, "port must be between 0 and 65535, but got 70000"),
        (["--ping-timeout", "-1"], {}, "ping_timeout must be 0 or more, but got -1.0"),
        (["--instance-ttl", "1"], {}, "instance_ttl must be longer than heartbeat_interval (2.0), but got 1.0"),
        ([], {"WS_MICRO_REDIS_URL": "notredis://x"},
         "Redis URL must specify one of the following schemes (redis://, rediss://, unix://)"),
    ],
)
def test_cli_refuses_a_bad_value_with_its_name_and_no_traceback(args: list[str], env: dict[str, str],
                                                                message: str) -> None:
    result = subprocess.run([sys.executable, "ws_micro.py", *args], cwd=ROOT, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.endswith(f"ws-micro: error: {message}\n")
    assert "Traceback" not in result.stderr


def test_every_setting_is_documented_in_the_configuration_reference() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    for cls in (Settings, ws_micro.ServerSettings):
        for field in cls.__dataclass_fields__.values():
            assert f"WS_MICRO_{field.name.upper()}" in reference, field.name
            assert f"--{field.name.replace('_', '-')}" in reference, field.name


def test_the_public_api_is_all_and_what_the_docs_list() -> None:
    table = (ROOT / "docs" / "embedding.md").read_text().split("## The public API")[1].split("\n## ")[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    documented = {name for cell in first_cells for name in re.findall(r"`(\w+)", cell)} - {"__version__"}
    assert documented == set(ws_micro.__all__)
    # Anything else a user could take for public is underscored (constants aside).
    public = {name for name, value in vars(ws_micro).items()
              if not name.startswith("_") and getattr(value, "__module__", None) == "ws_micro"
              and (isinstance(value, type) or callable(value))}
    assert public == set(ws_micro.__all__)


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def _heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _without_code_blocks(text), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:  # a repeated heading gets -1, -2, ...
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_in_the_docs_leads_somewhere(page: Path) -> None:
    # The README and docs/ link into each other's sections: a file or heading renamed must not strand a link.
    prose = re.sub(r"`[^`\n]*`", "", _without_code_blocks(page.read_text()))  # brackets in code are not links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: and the like are not ours to check
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in _heading_anchors(linked.read_text()):
            broken.append(f"{target}: no such heading")
    assert not broken


def test_the_readme_development_commands_are_the_ones_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Development\n", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert block.splitlines() and all(command in ci for command in block.splitlines()), block


def test_pep_723_header_and_pyproject_ask_for_the_same_dependencies() -> None:
    source = (ROOT / "ws_micro.py").read_text()
    header = source.split("# /// script\n", 1)[1].split("# ///\n", 1)[0]
    script = tomllib.loads("\n".join(line.removeprefix("# ").removeprefix("#") for line in header.splitlines()))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert script["dependencies"] == project["dependencies"]
    assert script["requires-python"] == project["requires-python"]


# --------------------------------------------------------------------------
# End to end: a real uvicorn process, real websockets clients
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process, self.port = process, port
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}/ws/py_client"

    def get(self, path: str, **kwargs: Any) -> Any:
        return httpx.get(self.http + path, timeout=TIMEOUT, **kwargs)

    def post(self, path: str, body: Any, **kwargs: Any) -> Any:
        return httpx.post(self.http + path, json=body, timeout=TIMEOUT, **kwargs)

    async def wait_until(self, predicate: Any, what: str) -> None:
        """Poll ``predicate`` (without blocking the event loop our clients run on) until it holds."""
        with anyio.move_on_after(TIMEOUT):
            # The state lives in another process: polling its API is the only way to watch it.
            while not await anyio.to_thread.run_sync(predicate):  # noqa: ASYNC110
                await anyio.sleep(0.02)
            return
        raise AssertionError(f"timed out waiting for {what}")

    def metric(self, name: str, path: str = "/metrics", **labels: str) -> float:
        for family in text_string_to_metric_families(self.get(path).text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        raise KeyError(name)


# How each ASGI server runs ``ws_micro:app`` on a port (each a test extra, pinned to the versions tested).
SERVERS: dict[str, Callable[[int], list[str]]] = {
    "uvicorn": lambda port: ["uvicorn", "ws_micro:app", "--host", "127.0.0.1", "--port", str(port)],
    "uvicorn-wsproto": lambda port: ["uvicorn", "ws_micro:app", "--host", "127.0.0.1", "--port", str(port),
                                     "--ws", "wsproto"],
    "hypercorn": lambda port: ["hypercorn", "ws_micro:app", "--bind", f"127.0.0.1:{port}"],
    "granian": lambda port: ["granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
                             "ws_micro:app"],
    "daphne": lambda port: ["daphne", "-b", "127.0.0.1", "-p", str(port), "ws_micro:app"],
}


@contextlib.contextmanager
def run_server(*args: str, env: dict[str, str] | None = None, uvicorn_app: bool | str = False,
               port: int | None = None, cwd: Path = ROOT, log: Path | None = None,
               open_files: int | None = None, asgi_server: str | None = None) -> Iterator[Server]:
    """Start the gateway as its own process (on a free port by default); stop it (SIGTERM, then kill) in finally.

    ``uvicorn_app``: run ``uvicorn ws_micro:app``, or uvicorn with that app; ``asgi_server``: run
    ``ws_micro:app`` under that ASGI server instead (see SERVERS); ``log``: a file for its output;
    ``open_files``: its file-descriptor limit, soft and hard.
    """
    port = port or free_port()
    if asgi_server is not None:
        command = [sys.executable, "-m", *SERVERS[asgi_server](port), *args]
    elif uvicorn_app:
        app = uvicorn_app if isinstance(uvicorn_app, str) else "ws_micro:app"
        command = [sys.executable, "-m", "uvicorn", app, "--port", str(port), *args]
    else:
        command = [sys.executable, "ws_micro.py", "--host", "127.0.0.1", "--port", str(port), *args]

    def limit_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    log_file = None if log is None else log.open("w")
    process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})}, text=True,
                               stdout=log_file or subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=limit_files)
    server = Server(process, port)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert process.poll() is None, process.communicate()[0]
            with contextlib.suppress(httpx.TransportError):
                if server.get("/healthz").status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout:
            process.stdout.close()
        if log_file is not None:
            log_file.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with run_server("--log-level", "warning", "--max-message-size", "4096") as running:
        yield running


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(SERVERS))
async def test_e2e_ws_micro_app_runs_under_each_asgi_server_with_its_environment(name: str, tmp_path: Path) -> None:
    # hypercorn finds module:app with eval(), so the app must be a real attribute; granian's send returns an
    # awaitable whose iterator is no generator; hypercorn reads no more from a socket while the app reads
    # nothing, so a client the gateway closed was never heard from again.
    env = {"WS_MICRO_MAX_MESSAGE_SIZE": "300", "WS_MICRO_RATE_LIMIT": "5", "WS_MICRO_RATE_BURST": "5"}

    def closed_for(code: int, reason: str) -> tuple[int, str]:
        if name == "daphne":  # it takes only 1000 and 3000-4999 from an app, and sends no reason
            return (code if code == 1000 else 4000 + code % 1000), ""
        return code, reason

    log = tmp_path / "server.log"
    with run_server(asgi_server=name, env=env, log=log) as server:
        async with ws_client(server.ws) as (a, id_a), ws_client(server.ws) as (b, id_b):
            await a.send(json.dumps(frame("ping", id_a, {"n": 1})))
            assert await recv_json(a) == frame("pong", id_a, {"n": 1})
            await a.send(json.dumps(frame("echo", id_a, {"é": "🙂"}), ensure_ascii=False))
            assert await recv_json(a) == frame("echo", id_a, {"é": "🙂"})
            await a.send(json.dumps(frame("chat", id_a, {"to": "b"}, to=id_b)))
            assert await recv_json(b) == frame("chat", id_a, {"to": "b"}, to=id_b)
            await join(a, id_a, "room")
            await join(b, id_b, "room")
            await a.send(json.dumps(frame("chat", id_a, {"hi": "b"}, room="room")))
            assert await recv_json(b) == frame("chat", id_a, {"hi": "b"}, room="room")
            pushed = await anyio.to_thread.run_sync(
                lambda: server.post(f"/api/clients/{id_b}", {"event": "news", "data": {"data": {}}}))
            assert pushed.status_code == 202 and await recv_json(b) == frame("news", id_b)
            await a.send("x" * 400)  # over WS_MICRO_MAX_MESSAGE_SIZE
            assert (await closed_with(a))[0] == closed_for(1009, "")[0]
            kicked = await anyio.to_thread.run_sync(lambda: httpx.delete(f"{server.http}/api/clients/{id_b}",
                                                                          timeout=TIMEOUT))
            assert kicked.status_code == 202 and await closed_with(b) == closed_for(1000, "disconnected by the server")
        async with ws_client(server.ws) as (flood, me):
            for _ in range(30):
                await flood.send(json.dumps(frame("ping", me)))
            assert await closed_with(flood) == closed_for(1008, "rate limit exceeded")
        async with ws_client(server.ws) as (binary, _):
            await binary.send(b"bytes")
            assert await closed_with(binary) == closed_for(1003, "binary frames are not supported")
        with pytest.raises(InvalidStatus) as refused:
            async with connect(server.ws, origin=Origin("https://evil.example")):
                pass
        assert refused.value.response.status_code == 403
    assert "Traceback" not in log.read_text()  # no limit turned into an error (daphne's 1011 was one)


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(SERVERS))
async def test_e2e_a_reader_that_stops_is_cut_off_under_each_asgi_server(
        name: str, tmp_path: Path) -> None:
    # daphne's send never waited: 12,000 pushes of 8 KB to a stalled reader were all taken, and daphne grew by
    # 100 MiB.  Now the gateway waits on Twisted's flow control, so the reader's queue fills and it is cut off.
    log = tmp_path / "server.log"
    with run_server(asgi_server=name, log=log) as server:
        before = tree_rss_mib(server.process.pid)
        # Uncompressed: 8 KB of "x" compressed would fit the kernel's buffers many times over.
        async with ws_client(server.ws, max_queue=1, compression=None) as (stuck, stuck_id):
            stuck.transport.pause_reading()
            body = {"event": "bulk", "data": {"data": {"pad": "x" * 8000}}}

            def push_until_cut_off() -> int:
                with httpx.Client(base_url=server.http, timeout=TIMEOUT) as client:
                    for pushed in range(5000):
                        if client.post(f"/api/clients/{stuck_id}", json=body).status_code == 404:
                            return pushed
                return 5000

            pushed = await anyio.to_thread.run_sync(push_until_cut_off)
            assert pushed < 2000  # max_queue_bytes (1 MiB) and the socket buffers: about 600 under uvicorn
            assert tree_rss_mib(server.process.pid) - before < 30
            stuck.transport.resume_reading()
            code, _ = await closed_with(stuck)
            assert code in {"daphne": (4008,), "granian": (1008, 1006)}.get(name, (1008,))  # granian: no close frame
            await server.wait_until(lambda: server.metric("ws_micro_disconnects_total", reason="slow_consumer") == 1,
                                    "the reader's connection to end as a slow consumer")
    assert "Traceback" not in log.read_text()


# What a connected client gets when each server is stopped (docs/configuration.md's table): ASGI tells an app
# nothing before the server ends its connections, so this is the server's doing, as with a bare Starlette app.
SHUTDOWN_CLOSE = {"uvicorn": 1012, "uvicorn-wsproto": 1012, "hypercorn": 1011, "granian": 1006, "daphne": 1006}


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(SERVERS))
async def test_e2e_sigterm_ends_every_connection_under_each_asgi_server(name: str) -> None:
    with run_server(asgi_server=name) as server:
        async with ws_client(server.ws) as (ws, _):
            server.process.send_signal(signal.SIGTERM)
            code, _ = await closed_with(ws)
        assert code == SHUTDOWN_CLOSE[name]
        await anyio.to_thread.run_sync(lambda: server.process.wait(TIMEOUT))


def test_probing_the_module_app_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_MICRO_MAX_CONNECTIONS", "lots")  # building it now would raise
    unbuilt = ws_micro._AppFromEnvironment()
    assert inspect.unwrap(unbuilt) is unbuilt and not hasattr(unbuilt, "__wrapped__")
    with pytest.raises(ValueError, match="WS_MICRO_MAX_CONNECTIONS must be an integer"):
        unbuilt.state  # noqa: B018  (an attribute of the app builds it)


def test_a_bad_environment_value_fails_the_servers_startup_with_its_name() -> None:
    result = subprocess.run([sys.executable, "-m", "uvicorn", "ws_micro:app", "--port", str(free_port())], cwd=ROOT,
                            env={**os.environ, "WS_MICRO_MAX_CONNECTIONS": "lots"}, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode != 0
    assert "WS_MICRO_MAX_CONNECTIONS must be an integer, but got 'lots'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_flag_overrides_a_bad_environment_value() -> None:
    # The environment only gives the flag its default; importing the module reads nothing.
    with run_server("--max-connections", "5", env={"WS_MICRO_MAX_CONNECTIONS": "0"}) as server:
        assert server.get("/healthz").json() == {"status": "ok", "connections": 0}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def ws_client(url: str, **options: Any) -> AsyncIterator[tuple[ClientConnection, str]]:
    async with connect(url, **options) as ws:
        with anyio.fail_after(TIMEOUT):
            hello = json.loads(await ws.recv())
        assert hello["event"] == "connect"
        yield ws, hello["client_id"]


async def recv_json(ws: ClientConnection) -> Any:
    with anyio.fail_after(TIMEOUT):
        return json.loads(await ws.recv())


async def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the server closes; its close code and reason."""
    with anyio.fail_after(TIMEOUT), contextlib.suppress(ConnectionClosed):
        while True:
            await ws.recv()
    return ws.close_code, ws.close_reason


@pytest.mark.anyio
async def test_e2e_connect_relay_rooms_and_errors(server: Server) -> None:
    async with ws_client(server.ws) as (a, id_a), ws_client(server.ws) as (b, id_b):
        text = json.dumps(frame("chat", id_a, {"msg": "over the wire"}, to=id_b))
        await a.send(text)
        with anyio.fail_after(TIMEOUT):
            assert await b.recv() == text

        for ws, me in ((a, id_a), (b, id_b)):
            await ws.send(json.dumps(frame("join", me, {"room": "e2e"})))
            assert (await recv_json(ws))["event"] == "joined"
        room_text = json.dumps(frame("chat", id_b, {"msg": "room"}, room="e2e"))
        await b.send(room_text)
        with anyio.fail_after(TIMEOUT):
            assert await a.recv() == room_text

        for sent, code in (("{", "invalid_json"), (json.dumps(frame("x", id_a, to="ghost")), "unknown_client"),
                           (json.dumps(frame("x", id_b)), "client_id_mismatch"),
                           (json.dumps(frame("x", id_a, room="elsewhere")), "not_in_room"),
                           (json.dumps(frame("x", id_a)), "unknown_event"),
                           ('{"event": "x"}', "invalid_event")):
            await a.send(sent)
            assert (await recv_json(a))["data"]["data"]["code"] == code


def sized(client_id: str, size: int, **routing: str) -> str:
    """A chat frame of exactly ``size`` bytes."""
    padding = size - len(json.dumps(frame("c", client_id, {"p": ""}, **routing), separators=(",", ":")))
    text = json.dumps(frame("c", client_id, {"p": "x" * padding}, **routing), separators=(",", ":"))
    assert len(text.encode()) == size
    return text


@pytest.mark.anyio
@pytest.mark.parametrize("deflate", [False, True], ids=["written-to-the-socket", "compressed-through-asgi"])
async def test_e2e_frames_of_every_length_arrive_intact(deflate: bool) -> None:
    options = ("--max-message-size", "200000", *(("--per-message-deflate",) if deflate else ()))
    with run_server("--log-level", "warning", *options) as server:
        async with ws_client(server.ws) as (a, id_a), ws_client(server.ws) as (b, id_b):
            await join(a, id_a, "sizes")
            await join(b, id_b, "sizes")
            # Either side of each length class of a frame header: 7 bits, 16 bits, 64 bits (RFC 6455, 5.2).
            for size in (125, 126, 65535, 65536, 150_000):
                to_room = sized(id_a, size, room="sizes")  # framed once for every member
                await a.send(to_room)
                assert await recv_text(b) == to_room
                if size > 200:  # two ids take more than 126 bytes
                    to_self = sized(id_a, size, to=id_a)
                    await a.send(to_self)
                    assert await recv_text(a) == to_self
            # A length counts bytes: 100 characters of "é" are 200 of them.
            accents = json.dumps(frame("chat", id_a, {"text": "é" * 100 + "🙂"}, to=id_b), ensure_ascii=False)
            await a.send(accents)
            assert await recv_text(b) == accents
            bulk = {"pad": "y" * 70_000}
            assert server.post(f"/api/clients/{id_b}", {"event": "bulk", "data": {"data": bulk}}).json() == {
                "delivered": 1}
            assert json.loads(await recv_text(b)) == frame("bulk", id_b, bulk)
            # Compressed frames must go through the engine; the others must not.
            assert server.metric("ws_micro_fast_path") == (0 if deflate else 1)


# A host app that mounts the gateway, as the docs' embedding example does.
HOST_APP = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import ws_micro


async def healthz(request):
    return PlainTextResponse("ok")


class Spy:
    \"\"\"A middleware that sees every message the app sends, as a tracing middleware would.\"\"\"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def spied(message):
            await send(message)

        await self.app(scope, receive, spied)


app = Starlette(routes=[Route("/healthz", healthz), Mount("/gateway", app=ws_micro.create_app())])
spied = Spy(app)
"""


@pytest.mark.anyio
@pytest.mark.parametrize(("how", "fast"), [("ws_micro:app", 1), ("host:app", 1), ("host:spied", 0)],
                         ids=["served", "mounted-in-a-host-app", "behind-a-middleware-that-wraps-send"])
async def test_e2e_the_uvicorn_fast_path_engages_served_or_mounted_and_says_when_it_cannot(
        how: str, fast: int, tmp_path: Path) -> None:
    # Nothing on the wire tells a direct write from one through ASGI: the gauge and the log must.
    (tmp_path / "host.py").write_text(HOST_APP)
    log = tmp_path / "server.log"
    prefix = "" if how == "ws_micro:app" else "/gateway"
    with run_server(uvicorn_app=how, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}, log=log) as server:
        # uvicorn offers compression, which the fast path cannot write: the client declines it.
        async with ws_client(f"ws://127.0.0.1:{server.port}{prefix}/ws/py_client", compression=None) as (ws, me):
            await ws.send(json.dumps(frame("ping", me)))
            assert (await recv_json(ws))["event"] == "pong"
            assert server.metric("ws_micro_fast_path", path=f"{prefix}/metrics") == fast
            # Fast path or not, the engine is held to max_message_size: it refuses the frame before
            # buffering it, with its own reason, where the gateway would have read it whole first.
            await ws.send("x" * 70_000)
            code, reason = await closed_with(ws)
            assert code == 1009 and reason is not None and "message larger than" not in reason, reason
    if not fast:  # a warning: under uvicorn's engine it should have engaged
        assert "fast path off: send is wrapped by 'Spy.__call__.<locals>.spied'" in log.read_text()


@pytest.mark.anyio
async def test_e2e_under_another_uvicorn_engine_frames_go_through_asgi_with_a_warning(tmp_path: Path) -> None:
    # uvicorn's legacy engine buffers (and inflates) frames up to --ws-max-size before the gateway sees them.
    log = tmp_path / "server.log"
    with run_server("--ws", "websockets", uvicorn_app=True, log=log) as server:
        async with ws_client(server.ws, compression=None) as (ws, me):
            await ws.send(json.dumps(frame("echo", me)))
            assert (await recv_json(ws))["event"] == "echo"
            assert server.metric("ws_micro_fast_path") == 0
    assert log.read_text().count("fast path off: receive is not uvicorn's websockets-sansio engine's (it comes "
                                 "from uvicorn.protocols.websockets.websockets_impl), which takes frames up to "
                                 "16777216 bytes") == 1


def test_serve_leaves_the_log_to_a_program_that_configured_logging(tmp_path: Path) -> None:
    script = tmp_path / "embedded.py"
    script.write_text(
        "import logging, sys\n"
        "import ws_micro\n"
        "logging.basicConfig(level=logging.INFO, format='ROOT %(name)s: %(message)s', stream=sys.stdout)\n"
        "ws_micro.serve(ws_micro.create_app(), ws_micro.ServerSettings(host='127.0.0.1', port=int(sys.argv[1])))\n")
    port = free_port()
    process = subprocess.Popen([sys.executable, str(script), str(port)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            with contextlib.suppress(OSError), connect_sync(f"ws://127.0.0.1:{port}/ws/py_client") as ws:
                assert json.loads(ws.recv(timeout=TIMEOUT))["event"] == "connect"
                break
            assert time.monotonic() < deadline and process.poll() is None, "the server did not start"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=TIMEOUT)
    assert "ROOT ws_micro: fast path on" in output, output  # the program's handler, not uvicorn's


def test_ws_micro_logs_whether_the_fast_path_is_on(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with run_server(log=log) as server, connect_sync(server.ws) as ws:
        assert json.loads(ws.recv(timeout=TIMEOUT))["event"] == "connect"
    assert log.read_text().count("fast path on: frames are written straight to uvicorn's transport") == 1


@pytest.mark.anyio
async def test_e2e_api_push_and_unknown_client(server: Server) -> None:
    async with ws_client(server.ws) as (ws, me):
        response = await anyio.to_thread.run_sync(
            lambda: server.post(f"/api/clients/{me}", {"event": "pushed", "data": {"data": {"n": 7}}}))
        assert (response.status_code, response.json()) == (202, {"delivered": 1})
        assert await recv_json(ws) == frame("pushed", me, {"n": 7})
    missing = server.post("/api/clients/ghost", {"event": "x", "data": {"data": {}}})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_client"


@pytest.mark.anyio
async def test_e2e_binary_and_oversized_frames_close_with_1003_and_1009(server: Server) -> None:
    async with ws_client(server.ws) as (ws, _):
        await ws.send(b"\x00\x01")
        assert (await closed_with(ws))[0] == 1003
    async with ws_client(server.ws) as (ws, me):
        await ws.send(json.dumps(frame("echo", me, {"pad": "x" * 5000})))  # the server allows 4096 bytes
        assert (await closed_with(ws))[0] == 1009
    await server.wait_until(lambda: server.get("/healthz").json()["connections"] == 0, "registry to empty")


@pytest.mark.anyio
async def test_e2e_origin_refused_before_accept(server: Server) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.ws, origin="http://evil.example"):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403
    assert b"not allowed" in refused.value.response.body
    async with ws_client(server.ws, origin=f"http://127.0.0.1:{server.port}") as (_, me):
        assert me


@pytest.mark.anyio
async def test_e2e_abrupt_disconnects_leave_no_trace(server: Server) -> None:
    before = server.get("/api/clients").json()
    async with ws_client(server.ws) as (stay, stay_id):
        await stay.send(json.dumps(frame("join", stay_id, {"room": "trace"})))
        await recv_json(stay)
        doomed = []
        for _ in range(5):
            ws = await connect(server.ws)
            me = json.loads(await ws.recv())["client_id"]
            await ws.send(json.dumps(frame("join", me, {"room": "trace"})))
            assert (await recv_json(ws))["event"] == "joined"
            doomed.append(ws)
        assert server.post("/api/rooms/trace", {"event": "n", "data": {"data": {}}}).json() == {"delivered": 6}
        for ws in doomed:  # reset the TCP connection: no close frame, no FIN handshake
            sock = ws.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            ws.transport.abort()
        await server.wait_until(lambda: server.get("/api/clients").json()["count"] == before["count"] + 1,
                          "reset clients to leave the registry")
        assert server.post("/api/rooms/trace", {"event": "n", "data": {"data": {}}}).json() == {"delivered": 1}
    await server.wait_until(lambda: server.get("/api/clients").json() == before, "the registry to be as before")
    assert server.post("/api/rooms/trace", {"event": "n", "data": {"data": {}}}).json() == {"delivered": 0}


@pytest.mark.anyio
async def test_e2e_slow_reader_is_cut_off_and_others_keep_receiving(tmp_path: Path) -> None:
    with run_server("--log-level", "warning", "--max-queue-bytes", "65536") as server:
        # A reader that stops reading after its first frame: websockets stops reading TCP when its
        # queue of one is full, so kernel buffers fill, then the server's queue for it.
        async with ws_client(server.ws, max_queue=1) as (slow, slow_id), ws_client(server.ws) as (fast, fast_id):
            payload = {"event": "bulk", "data": {"data": {"pad": "x" * 60_000}}}
            sent = received = 0
            while sent < 2000:
                response = await anyio.to_thread.run_sync(lambda: server.post("/api/broadcast", payload))
                sent += 1
                with anyio.fail_after(TIMEOUT):
                    received += str(await fast.recv()).count("bulk")
                if response.json() == {"delivered": 1}:
                    break
            else:
                raise AssertionError("the slow reader was never cut off")
            assert received == sent  # the healthy reader got every frame, in step
            # What was already on its way still arrives, then the close frame with the reason.
            assert await closed_with(slow) == (1008, "slow consumer")
            assert server.get(f"/api/clients/{slow_id}").status_code == 404
            assert server.get(f"/api/clients/{fast_id}").status_code == 200
            await server.wait_until(lambda: server.metric("ws_micro_disconnects_total", reason="slow_consumer") == 1,
                                    "the slow reader's connection to end")


@pytest.mark.anyio
async def test_e2e_kicking_a_reader_that_never_drains_takes_close_timeout_not_forever() -> None:
    # Only close_timeout may end this reader: send_timeout is too long to, and the queue too large.
    with run_server("--log-level", "warning", "--max-queue-bytes", "100000000", "--max-queue-messages", "100000",
                    "--send-timeout", "120", "--close-timeout", "0.5", "--max-message-size", "1000000") as server:
        async with ws_client(server.ws, max_queue=1, max_size=None) as (stuck, stuck_id):
            stuck.transport.pause_reading()
            payload = {"event": "bulk", "data": {"data": {"pad": "x" * 900_000}}}
            pushed = 20  # 18 MB: more than the kernel buffers between us hold
            for _ in range(pushed):
                assert server.post(f"/api/clients/{stuck_id}", payload).status_code == 202
            assert httpx.delete(f"{server.http}/api/clients/{stuck_id}", timeout=TIMEOUT).status_code == 202
            assert server.get(f"/api/clients/{stuck_id}").status_code == 404  # unknown at once, while it closes
            # Its backlog gets close_timeout to leave, its close frame as long again; then the socket is dropped.
            await server.wait_until(lambda: server.metric("ws_micro_disconnects_total", reason="kicked") == 1,
                                    "the kicked reader's connection to end")
            stuck.transport.resume_reading()
            received = 0
            with anyio.fail_after(TIMEOUT), contextlib.suppress(ConnectionClosed):
                while True:
                    received += str(await stuck.recv()).count("bulk")
            assert received < pushed  # the backlog was given up on, not waited for
            assert stuck.close_code == 1006  # dropped: the close frame could not get through either


@pytest.mark.anyio
async def test_e2e_a_socket_that_takes_nothing_for_send_timeout_is_cut_off() -> None:
    with run_server("--log-level", "warning", "--max-queue-bytes", "100000000", "--max-queue-messages", "100000",
                    "--send-timeout", "0.5", "--close-timeout", "0.5", "--max-message-size", "1000000") as server:
        async with (ws_client(server.ws, max_queue=1, max_size=None) as (stuck, stuck_id),
                    ws_client(server.ws) as (_, other_id)):
            stuck.transport.pause_reading()
            payload = {"event": "bulk", "data": {"data": {"pad": "x" * 900_000}}}
            for _ in range(100):  # far below the queue limits: only the send timeout can cut it off
                if server.post(f"/api/clients/{stuck_id}", payload).status_code == 404:
                    break
            await server.wait_until(lambda: server.get(f"/api/clients/{stuck_id}").status_code == 404,
                                    "the stalled reader to be cut off")
            await server.wait_until(lambda: server.metric("ws_micro_disconnects_total", reason="slow_consumer") == 1,
                                    "the stalled reader's connection to end")
            assert server.get(f"/api/clients/{other_id}").status_code == 200


@pytest.mark.anyio
async def test_e2e_flood_is_closed_with_1008() -> None:
    with run_server("--log-level", "warning", "--rate-limit", "5", "--rate-burst", "5") as server:
        async with ws_client(server.ws) as (ws, me):
            for _ in range(30):
                await ws.send(json.dumps(frame("ping", me)))
            assert await closed_with(ws) == (1008, "rate limit exceeded")
        assert server.metric("ws_micro_errors_total", code="rate_limited") >= 1
        assert server.metric("ws_micro_disconnects_total", reason="rate_limited") == 1


@pytest.mark.anyio
async def test_e2e_full_server_answers_503_and_frees_slots() -> None:
    with run_server("--log-level", "warning", "--max-connections", "2") as server:
        async with ws_client(server.ws), ws_client(server.ws):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(server.ws):
                    pass
            assert refused.value.response.status_code == 503
        await server.wait_until(lambda: server.get("/healthz").json()["connections"] == 0, "slots to free")
        async with ws_client(server.ws) as (_, me):
            assert me
        assert server.metric("ws_micro_rejected_handshakes_total", reason="full") == 1


@pytest.mark.anyio
async def test_e2e_dead_peer_is_dropped_by_the_keepalive_ping() -> None:
    with run_server("--log-level", "warning", "--ping-interval", "0.2", "--ping-timeout", "0.3") as server:
        # A peer that never answers pings (its websockets keepalive and pong replies are off
        # because it never reads): the server closes it with 1011 and forgets it.
        async with ws_client(server.ws, max_queue=1, ping_interval=None) as (ws, me):
            ws.transport.pause_reading()
            await server.wait_until(lambda: server.get(f"/api/clients/{me}").status_code == 404, "the ping timeout")
            ws.transport.resume_reading()
            assert (await closed_with(ws))[0] == 1011
        assert server.metric("ws_micro_disconnects_total", reason="abnormal") == 1


@pytest.mark.anyio
async def test_e2e_compression_is_off_unless_asked_for(server: Server) -> None:
    async with ws_client(server.ws) as (ws, _):  # websockets offers permessage-deflate by default
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
    with run_server("--log-level", "warning", "--per-message-deflate") as deflating:
        async with ws_client(deflating.ws) as (ws, me):
            assert ws.response is not None
            assert ws.response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
            await ws.send(json.dumps(frame("ping", me, {"z": "z" * 1000})))
            assert (await recv_json(ws))["data"]["data"] == {"z": "z" * 1000}


@pytest.mark.anyio
async def test_e2e_delete_closes_with_1000_and_a_reason(server: Server) -> None:
    async with ws_client(server.ws) as (ws, me):
        response = httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT)
        assert response.status_code == 202
        assert await closed_with(ws) == (1000, "disconnected by the server")


@pytest.mark.anyio
async def test_e2e_api_token_and_env_configuration_under_plain_uvicorn() -> None:
    env = {"WS_MICRO_API_TOKEN": "tok", "WS_MICRO_MAX_CONNECTIONS": "1", "WS_MICRO_MAX_MESSAGE_SIZE": "200"}
    with run_server("--log-level", "warning", env=env, uvicorn_app=True) as server:
        assert server.get("/api/clients").status_code == 401
        assert server.get("/api/clients", headers={"Authorization": "Bearer tok"}).json()["count"] == 0
        async with ws_client(server.ws) as (ws, me):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(server.ws):
                    pass
            assert refused.value.response.status_code == 503
            # uvicorn's own frame limit is 16 MiB: the app enforces its 200 bytes itself.
            await ws.send(json.dumps(frame("echo", me, {"pad": "x" * 300})))
            assert (await closed_with(ws))[0] == 1009


@pytest.mark.anyio
async def test_e2e_sigterm_closes_every_client_and_exits_0() -> None:
    with run_server("--graceful-timeout", "5") as server:
        async with ws_client(server.ws) as (a, _), ws_client(server.ws) as (b, _):
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            assert (await closed_with(a))[0] in (1001, 1012)
            assert (await closed_with(b))[0] in (1001, 1012)
            assert await anyio.to_thread.run_sync(lambda: server.process.wait(TIMEOUT)) == 0
            assert time.monotonic() - started < 5


# --------------------------------------------------------------------------
# Hostile clients, against a real server (raw sockets where a client library would not misbehave)
# --------------------------------------------------------------------------


def rss_mib(process: subprocess.Popen[str]) -> float:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {process.pid}")


def tree_rss_mib(pid: int) -> float:
    """The RSS of a process and all its descendants: servers such as granian serve from worker processes."""
    children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    own = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return own / 1024 + sum(tree_rss_mib(child) for child in children)


def raw_websocket(server: Server, receive_buffer: int = 4096, query: str = "") -> tuple[socket.socket, str]:
    """A WebSocket opened by hand, with a small receive buffer, up to its connect frame; and the client id."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.sendall(f"GET /ws/py_client{query} HTTP/1.1\r\n".encode()
                 + b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    received = b""
    while b"connection request granted" not in received:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    return sock, received.split(b'"client_id":"')[1].split(b'"')[0].decode()


def half_handshakes(server: Server, count: int) -> list[socket.socket]:
    """``count`` sockets that sent half a WebSocket handshake and stall."""
    stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) for _ in range(count)]
    for sock in stalled:
        sock.sendall(b"GET /ws/py_client HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return stalled


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (mask 0, so the payload is sent as is) of up to 64 KiB."""
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        head = bytes((first, 0x80 | len(payload)))
    else:
        head = bytes((first, 0x80 | 126)) + len(payload).to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload


@pytest.mark.anyio
async def test_e2e_a_join_read_after_its_connection_started_closing_leaves_no_member_behind() -> None:
    # The engine cuts this client off (a message in too many fragments) while its join waits to be read.
    with run_server("--log-level", "warning", "--close-timeout", "0.5") as server:
        sock, me = raw_websocket(server)
        join_frame = json.dumps(frame("join", me, {"room": "ghosts"})).encode()
        sock.sendall(client_frame(0x1, join_frame) + client_frame(0x1, b"", fin=False)
                     + client_frame(0x0, b"", fin=False) * 1001)
        with contextlib.suppress(ConnectionResetError):
            while await anyio.to_thread.run_sync(sock.recv, 65536):
                pass
        sock.close()
        async with ws_client(server.ws) as (ws, me):
            assert await join(ws, me, "ghosts") == 1  # alone: nobody cut off is still counted
        published = server.post("/api/rooms/ghosts", {"event": "x", "data": {"data": {}}})
        assert published.json() == {"delivered": 0}


def server_sockets(server: Server, client_port: int) -> list[str]:
    """The TCP states (as `ss` shows them) of the server's sockets to one client port."""
    names = {"01": "ESTABLISHED", "04": "FIN-WAIT-1", "05": "FIN-WAIT-2", "06": "TIME-WAIT", "07": "CLOSE",
             "08": "CLOSE-WAIT", "09": "LAST-ACK", "0B": "CLOSING"}
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote, state = line.split()[1:4]
            if int(local.rsplit(":", 1)[1], 16) == server.port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                states.append(names.get(state, state))
    return states


@pytest.mark.anyio
@pytest.mark.parametrize(("options", "reason"), [
    (("--rate-limit", "0"), "slow_consumer"),  # only the outgoing bound can stop it
    ((), "rate_limited"),  # pings count against the rate limit too
])
async def test_e2e_a_client_that_pings_and_never_reads_is_cut_off(options: tuple[str, ...], reason: str) -> None:
    # The engine answers every ping with a pong written straight to the socket: a peer that pings and
    # never reads grew the server by 70 MB in 8 s, and was never dropped.
    with run_server("--log-level", "warning", *options) as server:
        sock, client_id = raw_websocket(server)
        before = rss_mib(server.process)
        pings = client_frame(0x9, b"p" * 125) * 500
        peak, flooded = before, 0
        with anyio.fail_after(TIMEOUT), pytest.raises(OSError):  # the server resets the connection
            while True:
                await anyio.to_thread.run_sync(sock.sendall, pings)
                flooded += len(pings)
                peak = max(peak, rss_mib(server.process))
        sock.close()
        assert flooded > 1_000_000  # enough pongs for more than max_queue_bytes
        assert peak - before < 20, f"the server grew by {peak - before:.0f} MiB"
        await server.wait_until(lambda: server.metric("ws_micro_disconnects_total", reason=reason) == 1,
                                "the connection to end")
        assert server.get(f"/api/clients/{client_id}").status_code == 404
        assert server.get("/healthz").json()["connections"] == 0


@pytest.mark.anyio
@pytest.mark.parametrize(("start", "flood", "reply"), [
    (b"", bytes((0x8A, 0x80)) + b"\0\0\0\0", (1008, b"rate limit exceeded")),  # empty unsolicited pongs
    (bytes((0x01, 0x80)) + b"\0\0\0\0", bytes((0x00, 0x80)) + b"\0\0\0\0",  # a message that never ends
     (1009, b"message in more than 1000 fragments")),
])
async def test_e2e_frames_the_engine_handles_alone_are_bounded(start: bytes, flood: bytes,
                                                                reply: tuple[int, bytes]) -> None:
    # Empty pongs and continuation frames cost a 6-byte frame each and reached no limit: one client
    # stalled every other client's replies for seconds, or grew the server by 1 MB/s.
    with run_server("--log-level", "warning", "--rate-limit", "100", "--rate-burst", "1000") as server:
        sock, client_id = raw_websocket(server)
        sock.sendall(start + flood * 2100)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := await anyio.to_thread.run_sync(sock.recv, 4096):
                received += chunk
        code, reason = reply
        assert received.startswith(bytes((0x88, 2 + len(reason))) + code.to_bytes(2) + reason), received
        sock.close()
        await server.wait_until(lambda: server.get(f"/api/clients/{client_id}").status_code == 404,
                                "the connection to end")


@pytest.mark.anyio
async def test_e2e_a_peer_that_stops_reading_leaves_after_its_keepalive_timeout() -> None:
    # uvicorn closes a peer that misses a keepalive pong by waiting for its whole buffer to drain:
    # for a peer that reads nothing that wait never ended, and it stayed registered, holding the buffer.
    with run_server("--log-level", "warning", "--ping-interval", "1.5", "--ping-timeout", "0.5",
                    "--close-timeout", "0.5", "--send-timeout", "60", "--max-queue-bytes", "100000000") as server:
        sock, client_id = raw_websocket(server)
        payload = {"event": "bulk", "data": {"data": {"pad": "x" * 60_000}}}
        for _ in range(40):  # 2.4 MB: more than the kernel buffers take, less than the queue bounds
            server.post(f"/api/clients/{client_id}", payload)
        await server.wait_until(lambda: server.get("/healthz").json()["connections"] == 0,
                                "the peer to leave the registry")
        await server.wait_until(lambda: server_sockets(server, sock.getsockname()[1]) == [],
                                "the server's socket to be gone")  # reset: the kernel keeps nothing either
        assert server.metric("ws_micro_disconnects_total", reason="abnormal") == 1
        sock.close()


@pytest.mark.anyio
async def test_e2e_a_cut_off_reader_is_reset_and_its_buffers_freed() -> None:
    with run_server("--log-level", "warning", "--max-queue-bytes", "100000000", "--max-queue-messages", "100000",
                    "--send-timeout", "0.5", "--close-timeout", "0.5") as server:
        sock, client_id = raw_websocket(server)
        payload = {"event": "bulk", "data": {"data": {"pad": "x" * 60_000}}}
        for _ in range(300):
            if server.post(f"/api/clients/{client_id}", payload).status_code == 404:
                break
        await server.wait_until(lambda: server.metric("ws_micro_disconnects_total", reason="slow_consumer") == 1,
                                "the stalled reader to be cut off")
        # A plain close would leave the socket in FIN-WAIT-1 with megabytes queued, for minutes.
        await server.wait_until(lambda: server_sockets(server, sock.getsockname()[1]) == [],
                                "the server's socket to be gone")
        with pytest.raises(ConnectionResetError):
            while sock.recv(1 << 20):
                pass
        sock.close()


@pytest.mark.anyio
async def test_e2e_sigterm_does_not_wait_for_a_client_that_reads_nothing(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with run_server("--close-timeout", "0.5", "--graceful-timeout", "20", "--max-queue-bytes", "100000000",
                    "--max-queue-messages", "100000", "--send-timeout", "60", log=log) as server:
        sock, client_id = raw_websocket(server)
        payload = {"event": "bulk", "data": {"data": {"pad": "x" * 60_000}}}
        for _ in range(100):
            assert server.post(f"/api/clients/{client_id}", payload).status_code == 202
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(lambda: server.process.wait(TIMEOUT)) == 0
        assert time.monotonic() - started < 5  # close_timeout, not graceful_timeout
        sock.close()
    assert "ERROR" not in log.read_text()


@pytest.mark.anyio
async def test_e2e_invalid_utf8_closes_with_1007_and_logs_one_line(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with run_server(log=log) as server:
        sock, _ = raw_websocket(server)
        sock.sendall(client_frame(0x1, b'{"event": "\xff\xfe"}'))
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                received += chunk
        assert received[:2] == b"\x88\x02" and int.from_bytes(received[2:4]) == 1007  # close frame, 1007
        sock.close()
    text = log.read_text()
    assert "Invalid UTF-8" in text and "Traceback" not in text


@pytest.mark.anyio
async def test_e2e_what_clients_make_uvicorn_log_is_one_line_per_10_seconds(tmp_path: Path) -> None:
    # uvicorn writes a line for each of these: 20,000 pipelined requests wrote 20,000 lines.  (Each on a
    # connection of its own: with httptools installed, uvicorn answers only the first of pipelined upgrades.)
    log = tmp_path / "server.log"
    with run_server("--log-level", "warning", log=log) as server:
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                             b"\r\n")
                assert (await anyio.to_thread.run_sync(sock.recv, 4096)).startswith(b"HTTP/1.1 200 OK")
        for _ in range(50):
            with pytest.raises(InvalidStatus):  # each logs uvicorn's spurious handshake ERROR
                async with connect(server.ws, origin=Origin("https://evil.example")):
                    pass
            with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
                sock.sendall(b"NOT HTTP\r\n\r\n")
                assert (await anyio.to_thread.run_sync(sock.recv, 4096)).startswith(b"HTTP/1.1 400 ")
    lines = log.read_text().splitlines()
    for line in ("Unsupported upgrade request", "Invalid HTTP request received",
                 "ASGI callable returned without completing handshake"):
        assert sum(line in logged for logged in lines) == 1, lines
    assert len(lines) < 20, lines


@pytest.mark.anyio
async def test_e2e_an_api_body_that_trickles_gets_408() -> None:
    # Even a caller with the token may not hold a request, its task and its socket for ever.
    with (run_server("--log-level", "warning", "--api-token", "tok", "--api-body-timeout", "1") as server,
          socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock):
        sock.sendall(b"POST /api/broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer tok\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"event\":")
        started = time.monotonic()
        response = b""
        while b'"code":"timeout"' not in response:
            chunk = await anyio.to_thread.run_sync(sock.recv, 4096)
            assert chunk, response
            response += chunk
        assert response.startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 5


@pytest.mark.anyio
async def test_e2e_stalled_handshakes_time_out_and_count_against_max_connections() -> None:
    with run_server("--log-level", "warning", "--handshake-timeout", "3", "--max-connections", "20") as server:
        stalled = half_handshakes(server, 20)
        await server.wait_until(lambda: server.get("/healthz").status_code == 503, "the stalled sockets to count")
        with pytest.raises(InvalidStatus) as refused:
            async with connect(server.ws):
                pass
        assert refused.value.response.status_code == 503
        for sock in stalled:  # each is answered and closed once its time is up
            answer = await anyio.to_thread.run_sync(sock.recv, 4096)
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
            assert b'"code":"timeout"' in answer
            assert await anyio.to_thread.run_sync(sock.recv, 4096) == b""
            sock.close()
        async with ws_client(server.ws) as (_, me):
            assert me
        assert server.metric("ws_micro_rejected_handshakes_total", reason="timeout") == 20
        # A kept-alive connection gets as long for each later request's head, then is closed.
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            response = b""
            while not response.endswith(b"}"):  # the head and the JSON body may come apart
                response += await anyio.to_thread.run_sync(sock.recv, 4096)
            assert response.startswith(b"HTTP/1.1 200 OK\r\n")
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert await anyio.to_thread.run_sync(sock.recv, 4096) == b""  # the socket times out first if not


@pytest.mark.anyio
async def test_e2e_out_of_descriptors_is_refused_with_503_and_one_log_line(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with run_server("--handshake-timeout", "30", open_files=128, log=log) as server:
        stalled = half_handshakes(server, 200)
        refused = 0
        for sock in stalled:
            sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                refused += sock.recv(4096).startswith(b"HTTP/1.1 503 ")
            sock.close()
        assert refused >= 200 - 128
    text = log.read_text()
    assert "open-file limit" in text and "Traceback" not in text
    assert len(text) < 5000


@pytest.mark.anyio
async def test_e2e_out_of_descriptors_under_plain_uvicorn_logs_one_line(tmp_path: Path) -> None:
    # asyncio logs a traceback per refused accept, and one more per retry once the listener has closed.
    log = tmp_path / "server.log"
    with run_server("--log-level", "warning", "--loop", "asyncio", uvicorn_app=True, open_files=128,
                    log=log) as server:
        stalled = half_handshakes(server, 300)
        await server.wait_until(lambda: "cannot accept connections" in log.read_text(), "the server to run out")
        for sock in stalled:
            sock.close()
    text = log.read_text()
    assert "Too many open files" in text and "Traceback" not in text
    assert len(text) < 5000


@pytest.mark.anyio
async def test_e2e_compressed_frames_cannot_inflate_past_max_message_size_under_plain_uvicorn() -> None:
    # uvicorn's defaults: permessage-deflate on, frames up to 16 MiB. 16 KiB on the wire inflated to
    # 16 MB before the app refused it: 10 such clients took 170 MiB.
    with run_server("--log-level", "warning", uvicorn_app=True) as server:
        bomb = json.dumps(frame("echo", "x", {"pad": "0" * 16_000_000}))
        before = peak = rss_mib(server.process)

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_mib(server.process))
                await anyio.sleep(0.005)

        async def send_bomb() -> None:
            async with ws_client(server.ws, compression="deflate") as (ws, _):
                await ws.send(bomb)
                assert (await closed_with(ws))[0] == 1009

        async with anyio.create_task_group() as watching:
            watching.start_soon(watch)
            async with anyio.create_task_group() as clients:
                for _ in range(10):
                    clients.start_soon(send_bomb)
            watching.cancel_scope.cancel()
        assert peak - before < 40, f"the server grew by {peak - before:.0f} MiB"
        assert server.metric("ws_micro_disconnects_total", reason="message_too_big") == 10


@pytest.mark.anyio
async def test_python_client_class_sends_and_iterates(server: Server) -> None:
    async with Client(server.ws) as a, Client(server.ws) as b:
        assert a.client_id and a.client_id != b.client_id
        with anyio.fail_after(TIMEOUT):
            await a.send("join", {"room": "py"})
            assert (await a.recv()).data.data == {"room": "py", "members": 1}
            await b.send("join", {"room": "py"})
            assert (await b.recv()).data.data == {"room": "py", "members": 2}
            await a.send("hello", {"n": 1}, room="py")
            await b.send("hello", {"n": 2}, to=a.client_id)
            got_a = await a.recv()
            got_b = [event async for event in _take(b, 1)]
        assert (got_a.event, got_a.client_id, got_a.to, got_a.data.data) == ("hello", b.client_id, a.client_id,
                                                                              {"n": 2})
        assert [(e.event, e.client_id, e.room, e.data.data) for e in got_b] == [
            ("hello", a.client_id, "py", {"n": 1})]
        await b.close()
        assert b.close_code == 1000


@pytest.mark.anyio
async def test_e2e_json_nested_at_any_depth_is_bad_input_never_an_internal_error(server: Server) -> None:
    # The interpreter's recursion limit stops msgspec somewhere near 1,000 levels, depending on the stack
    # depth it starts at: try every depth around it, for the frame decode, pong's re-encode and the API.
    async with ws_client(server.ws) as (ws, me):
        for depth in range(850, 1050):
            nested = "[" * depth + "]" * depth
            await ws.send(f'{{"event": "ping", "client_id": "{me}", "data": {{"data": {{"a": {nested}}}}}}}')
            reply = str(await recv_text(ws))  # too deep for the json module to read back: look at its start
            if not reply.startswith(f'{{"event":"pong","client_id":"{me}"'):
                assert json.loads(reply)["data"]["data"] == {
                    "code": "invalid_json", "message": "JSON is nested too deeply", "event": None}, depth
            status = server.post(f"/api/clients/{me}", None, content=f'{{"event": "n", "data": {{"data": {{"a": '
                                 f'{nested}}}}}}}', headers=JSON).status_code
            assert status in (202, 400), depth
            if status == 202:
                assert str(await recv_text(ws)).startswith('{"event":"n"')
        assert not reply.startswith('{"event":"pong"')  # the deepest ones were refused
    assert server.metric("ws_micro_disconnects_total", reason="internal_error") == 0


def non_loopback_address() -> str:
    """This machine's address on its network: a peer connecting from it is not on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        address = str(probe.getsockname()[0])
    assert not address.startswith("127."), "the proxy-headers test needs a non-loopback interface"
    return address


def test_e2e_without_token_x_forwarded_for_cannot_make_a_peer_loopback() -> None:
    # Behind uvicorn's --proxy-headers trusting every peer, X-Forwarded-For: 127.0.0.1 used to make any peer
    # look local. The server listens on every interface here, and we call it from a non-loopback address.
    with run_server("--log-level", "warning", "--host", "0.0.0.0", "--proxy-headers", "--forwarded-allow-ips", "*",
                    uvicorn_app=True) as server:
        remote = f"http://{non_loopback_address()}:{server.port}"
        local = {"Host": f"localhost:{server.port}"}
        for forged in ({"X-Forwarded-For": "127.0.0.1"}, {"X-Real-IP": "127.0.0.1"},
                       {"Forwarded": "for=127.0.0.1"}, {}):
            response = httpx.get(f"{remote}/api/clients", headers={**local, **forged}, timeout=TIMEOUT)
            assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden"), forged
            deleted = httpx.delete(f"{remote}/api/clients/x", headers={**local, **forged}, timeout=TIMEOUT)
            assert deleted.status_code == 403, forged
        assert server.get("/api/clients").status_code == 200  # a program on this machine, no proxy: served


@contextlib.contextmanager
def relaying_gateway(*frames: dict[str, Any]) -> Iterator[str]:
    """A WebSocket server that sends ``frames`` to whoever connects, as a gateway that relays any event name would."""
    from websockets.sync.server import ServerConnection, serve

    def handler(ws: ServerConnection) -> None:
        for sent in frames:
            ws.send(json.dumps(sent))
        for _ in ws:  # keep the connection open until the client leaves
            pass

    with serve(handler, "127.0.0.1", 0) as relaying:
        thread = threading.Thread(target=relaying.serve_forever)
        thread.start()
        try:
            yield f"ws://127.0.0.1:{relaying.socket.getsockname()[1]}/ws/py_client"
        finally:
            relaying.shutdown()
            thread.join(TIMEOUT)


MINE, FORGER = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
FORGERY = (frame("connect", MINE, {"message": "connection request granted"}),
           frame("connect", FORGER, {"message": "connection request granted"}, to=MINE),
           frame("chat", FORGER, {"text": "after the forgery"}, to=MINE))


@pytest.mark.anyio
async def test_python_client_trusts_only_the_first_connect_frame() -> None:
    with relaying_gateway(*FORGERY) as url:
        async with Client(url) as client:
            with anyio.fail_after(TIMEOUT):
                event = await client.recv()
            assert (event.event, event.data.data) == ("chat", {"text": "after the forgery"})
            assert client.client_id == MINE


async def _take(client: Client, n: int) -> AsyncIterator[Event]:
    async for event in client:
        yield event
        n -= 1
        if n == 0:
            return


def test_cli_client_prints_frames_as_json_lines(server: Server) -> None:
    lines = [json.dumps({"event": "ping", "data": {"data": {"k": 1}}}), "not json",
             json.dumps({"event": "echo", "data": {"data": {"e": True}}})]
    result = subprocess.run([sys.executable, "ws_micro.py", "client", server.ws], cwd=ROOT,
                            input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    frames = [json.loads(line) for line in result.stdout.splitlines()]
    me = frames[0]["client_id"]
    assert frames == [
        {"event": "connect", "client_id": me, "data": {"data": {"message": "connection request granted"}}},
        frame("pong", me, {"k": 1}),
        frame("echo", me, {"e": True}),
    ]
    assert "ignored: expected a JSON object, but got 'not json'" in result.stderr


def test_cli_client_exits_cleanly_when_the_server_closes(server: Server) -> None:
    process = subprocess.Popen([sys.executable, "ws_micro.py", "client", server.ws], cwd=ROOT, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        me = json.loads(process.stdout.readline())["client_id"]
        assert httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT).status_code == 202
        assert process.wait(TIMEOUT) == 0  # stdin still open: the close alone ends it
        assert "closed: 1000" in (process.stderr.read() if process.stderr else "")
    finally:
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream:
                stream.close()


def test_cli_client_reports_a_refused_connection() -> None:
    result = subprocess.run([sys.executable, "ws_micro.py", "client", f"ws://127.0.0.1:{free_port()}/ws/py_client"],
                            cwd=ROOT, input="", capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.startswith("ws-micro client: ")
    assert "Traceback" not in result.stderr


@contextlib.asynccontextmanager
async def hostile_server(first: str | None, then: str | None = None) -> AsyncIterator[str]:
    """A WebSocket server (real websockets, a free port) that sends ``first``, then ``then``, then waits."""
    from websockets.asyncio.server import ServerConnection, serve

    async def handler(ws: ServerConnection) -> None:
        for text in (first, then):
            if text is not None:
                await ws.send(text)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression="deflate", max_size=None) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws/py_client"


@pytest.mark.anyio
@pytest.mark.parametrize(("first", "error"), [
    (None, TimeoutError),  # it never sends the connect frame
    ("not json", ConnectionError),
    ('{"event": "pong", "client_id": "x", "data": {"data": {}}}', ConnectionError),
])
async def test_python_client_refuses_a_server_that_does_not_greet_it(first: str | None, error: type[Exception]) -> None:
    async with hostile_server(first) as url:
        client = Client(url, open_timeout=1)
        with anyio.fail_after(TIMEOUT), pytest.raises(error):
            await client.connect()
        assert client.close_code is not None  # and it closed the connection


@pytest.mark.anyio
async def test_python_client_does_not_inflate_a_frame_past_its_limit() -> None:
    # With no limit, one compressed frame of about 300 KB took a client to 630 MB.
    hello = '{"event": "connect", "client_id": "x", "data": {"data": {}}}'
    async with hostile_server(hello, "0" * 100_000_000) as url, Client(url) as client:
        assert client.client_id == "x"
        with anyio.fail_after(TIMEOUT), pytest.raises(ConnectionClosed) as closed:
            await client.recv()
        assert closed.value.sent is not None and closed.value.sent.code == 1009  # the client refused it


def test_cli_client_reports_a_server_that_sends_no_json() -> None:
    async def run() -> subprocess.CompletedProcess[str]:
        async with hostile_server("not json") as url:
            return await anyio.to_thread.run_sync(lambda: subprocess.run(
                [sys.executable, "ws_micro.py", "client", url], cwd=ROOT, input="", capture_output=True, text=True,
                timeout=TIMEOUT))

    result = anyio.run(run)
    assert result.returncode == 1
    assert result.stderr.startswith("ws-micro client: expected a connect frame, but got 'not json'")
    assert "Traceback" not in result.stderr


def test_encoded_frames_are_what_msgspec_decodes() -> None:
    text = ws_micro._Frame("news", {"quote": 'say "hi"\n'}).to("abc")
    assert msgspec.json.decode(text) == frame("news", "abc", {"quote": 'say "hi"\n'})


@pytest.mark.anyio
async def test_start_now_finishes_at_once_or_hands_over_the_rest() -> None:
    log: list[str] = []

    async def ready() -> None:
        log.append("ready")

    assert ws_micro._start_now(ready()) is None
    assert log == ["ready"]

    gate = anyio.Event()

    async def blocked() -> None:
        log.append("blocked: start")
        await gate.wait()
        log.append("blocked: end")

    rest = ws_micro._start_now(blocked())
    assert rest is not None and log[-1] == "blocked: start"

    async def finish() -> None:
        assert rest is not None
        await rest

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(finish)
        gate.set()
    assert log[-1] == "blocked: end"

    # Cancellation reaches the suspended awaitable, as it would through a plain await.
    cancelled: list[bool] = []

    async def stuck() -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise

    pending = ws_micro._start_now(stuck())
    assert pending is not None
    with anyio.move_on_after(0.05):
        await pending
    assert cancelled == [True]


class FutureIterator:
    """What granian's ``send`` returns: an awaitable whose ``__await__`` is an iterator with no ``send``."""

    def __init__(self, future: Any) -> None:
        self.future = future

    def __await__(self) -> FutureIterator:
        return self

    def __iter__(self) -> FutureIterator:
        return self

    def __next__(self) -> Any:
        if not self.future.done():
            self.future._asyncio_future_blocking = True  # as asyncio's own futures do: the task waits on it
            return self.future
        raise StopIteration(self.future.result())


@pytest.mark.anyio
async def test_start_now_takes_awaitables_whose_iterator_is_no_generator() -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    done.set_result(None)
    assert ws_micro._start_now(FutureIterator(done)) is None  # type: ignore[arg-type]
    pending = loop.create_future()
    rest = ws_micro._start_now(FutureIterator(pending))  # type: ignore[arg-type]
    assert rest is not None
    loop.call_soon(pending.set_result, None)
    with anyio.fail_after(TIMEOUT):
        await rest
    assert pending.done()


# --------------------------------------------------------------------------
# A connection's writer, against a socket the test controls
# --------------------------------------------------------------------------


class StallingOutput(ws_micro._Output):
    """A socket that takes frames at once until ``stall()``, then none until ``drain()``."""

    def __init__(self) -> None:
        super().__init__(self._unused)
        self.taken: list[str] = []
        self.closed_with: tuple[int, str] | None = None
        self.aborted = False
        self.takes_close = True
        self._room = anyio.Event()
        self._room.set()

    async def _unused(self, message: Any) -> None:
        raise AssertionError(f"written through ASGI: {message!r}")

    def stall(self) -> None:
        self._room = anyio.Event()

    def drain(self) -> None:
        self._room.set()

    def write_now(self, text: str, wire: bytes | None = None) -> Any:
        if self._room.is_set():
            self.taken.append(text)
            return None
        return self._write_later(text)

    async def _write_later(self, text: str) -> None:
        await self._room.wait()
        self.taken.append(text)

    async def close(self, code: int, reason: str) -> None:
        if not self.takes_close:
            await anyio.sleep_forever()
        self.closed_with = (code, reason)

    def abort(self) -> None:
        self.aborted = True


def writer(**options: Any) -> tuple[ws_micro._Connection, StallingOutput, list[str]]:
    """A connection on a :class:`StallingOutput`, and the reasons it left the registry with."""
    output, left = StallingOutput(), []
    connection = ws_micro._Connection(output, remote=None, settings=Settings(**options), metrics=ws_micro._Metrics(),
                                      on_close=lambda connection: left.append(connection.close_reason))
    return connection, output, left


@pytest.mark.anyio
async def test_frames_keep_their_order_across_the_switch_from_direct_writes_to_the_queue() -> None:
    connection, output, _ = writer()
    assert connection.send("1") and connection.send("2")
    output.stall()
    assert connection.send("3") and connection.send("4") and connection.send("5")  # 3 waits, 4 and 5 queue
    assert output.taken == ["1", "2"] and connection.state is ws_micro._State.BACKLOGGED
    output.drain()
    with anyio.fail_after(TIMEOUT):
        while connection.state.name != "OPEN":  # the writer drains the queue, then ends
            await anyio.lowlevel.checkpoint()
    assert connection.send("6")  # written at once again, after the rest
    assert output.taken == ["1", "2", "3", "4", "5", "6"]


@pytest.mark.anyio
async def test_a_full_queue_closes_with_1008_and_drops_what_waits() -> None:
    connection, output, left = writer(max_queue_messages=3)
    output.stall()
    assert all(connection.send(str(n)) for n in range(4))  # one in flight, three queued
    assert not connection.send("overflow")
    assert left == ["slow_consumer"] and not connection.send("late")
    with anyio.fail_after(TIMEOUT):
        await connection.closed()
    assert output.closed_with == (1008, "slow consumer") and output.taken == []
    assert connection.state is ws_micro._State.CLOSED


@pytest.mark.anyio
async def test_a_socket_that_takes_nothing_for_send_timeout_is_closed_with_1008() -> None:
    connection, output, left = writer(send_timeout=0.05)
    output.stall()
    connection.send("stuck")
    with anyio.fail_after(TIMEOUT):
        await connection.closed()
    assert output.closed_with == (1008, "slow consumer") and left == ["slow_consumer"]


@pytest.mark.anyio
@pytest.mark.parametrize("flush", [True, False], ids=["flushed", "dropped"])
async def test_close_sends_the_queue_first_or_drops_it(flush: bool) -> None:
    connection, output, left = writer()
    output.stall()
    for text in ("1", "2", "3"):
        connection.send(text)
    connection.close(4000, "bye", label="kicked", flush=flush)
    assert left == ["kicked"] and not connection.send("after")
    output.drain()
    with anyio.fail_after(TIMEOUT):
        await connection.closed()
    assert output.taken == (["1", "2", "3"] if flush else [])
    assert output.closed_with == (4000, "bye") and not output.aborted


@pytest.mark.anyio
async def test_a_close_frame_the_peer_never_takes_ends_in_an_abort() -> None:
    connection, output, _ = writer(close_timeout=0.05)
    output.takes_close = False
    connection.close(1000, "", label="kicked")
    with anyio.fail_after(TIMEOUT):
        await connection.closed()
    assert output.aborted and connection.state is ws_micro._State.CLOSED


@pytest.mark.anyio
async def test_a_peer_gone_while_frames_wait_is_sent_neither_them_nor_a_close_frame() -> None:
    connection, output, _ = writer()
    output.stall()
    connection.send("in flight")
    connection.send("queued")
    connection.gone("abnormal")
    output.drain()
    with anyio.fail_after(TIMEOUT):
        while connection._writer is not None and not connection._writer.done():
            await anyio.lowlevel.checkpoint()
    assert output.taken == ["in flight"] and output.closed_with is None  # the write under way finished


@pytest.mark.anyio
async def test_a_connection_that_left_joins_no_room() -> None:
    registry = Registry()
    connection, _, _ = writer()
    connection._on_close = registry.remove
    registry.add(connection)
    connection.gone("abnormal")
    assert await registry.join(connection, "lobby") == 0
    assert registry.rooms == {} and connection.rooms == set()


def test_a_registry_used_again_without_redis_leaves_cluster_mode() -> None:
    registry = Registry()
    create_app(registry=registry, redis_url="redis://127.0.0.1:1")
    with TestClient(create_app(registry=registry)) as client:
        assert client.get("/healthz").json() == {"status": "ok", "connections": 0}


@pytest.mark.anyio
async def test_a_peer_that_is_gone_is_sent_nothing_more() -> None:
    connection, output, left = writer()
    connection.gone("closed")
    connection.gone("abnormal")
    connection.close(1000, "", label="kicked")
    assert not connection.send("late") and output.taken == [] and output.closed_with is None
    assert left == ["closed"] and connection.close_reason == "closed"


def test_the_console_page_and_its_assets_are_served_relative_to_the_mount() -> None:
    host = Starlette(routes=[Mount("/gateway", app=create_app())])
    with TestClient(host) as client:
        page = client.get("/gateway/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'src="static/console.js"' in page.text  # relative: works under any prefix
        script = client.get("/gateway/static/ws_micro.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "export class Client" in script.text


def test_without_a_page_the_gateway_still_runs(tmp_path: Path) -> None:
    with TestClient(create_app(static_dir="")) as client:
        assert client.get("/").status_code == 404
        with client.websocket_connect("/ws/py_client") as ws:
            assert ws.receive_json()["event"] == "connect"
    with pytest.raises(ValueError, match=r"static_dir must be a folder with an index.html, but got '.*nowhere'"):
        create_app(static_dir=str(tmp_path / "nowhere"))


def test_a_copied_single_file_runs_without_its_static_folder(tmp_path: Path) -> None:
    (tmp_path / "ws_micro.py").write_bytes((ROOT / "ws_micro.py").read_bytes())
    with run_server("--log-level", "warning", cwd=tmp_path) as server:
        assert server.get("/").json()["error"]["code"] == "not_found"
        assert server.get("/static/ws_micro.js").status_code == 404


# --------------------------------------------------------------------------
# The browser page, in a real headless Chromium
# --------------------------------------------------------------------------

CHROMIUM = os.environ.get("WS_MICRO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture  # per test: Playwright's sync API holds an event loop that the async tests must not meet
def browser() -> Iterator[Browser]:
    """Debian's Chromium (Playwright cannot download its own browser here); a missing one fails, never skips."""
    assert Path(CHROMIUM).is_file(), f"the browser tests need {CHROMIUM}: apt-get install chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_console(browser: Browser, server: Server, **context_options: Any) -> Page:
    page = browser.new_context(**context_options).new_page()
    page.goto(server.http + "/")
    page.wait_for_function("document.getElementById('state').dataset.state === 'open'", timeout=TIMEOUT * 1000)
    return page


def client_id_of(page: Page) -> str:
    return str(page.locator("#client-id").inner_text())


def send_from(page: Page, route: str, target: str, event: str, data: str) -> None:
    page.select_option("#route", route)
    page.fill("#target", target)
    page.fill("#event", event)
    page.fill("#data", data)
    page.click("#send-form button[type=submit]")


def log_entry(page: Page, text: str) -> Locator:
    entry = page.locator("#log li", has_text=text).first
    entry.wait_for(timeout=TIMEOUT * 1000)
    return entry


def assert_rendered(page: Page, path: Path) -> None:
    """The page was laid out and painted: its panels have size, styles applied, pixels written."""
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a blank page compresses to far less
    for selector in ("header", "#send-form", "#room-form", "#log"):
        box = page.locator(selector).bounding_box()
        assert box and box["width"] > 100 and box["height"] > 20, selector
    badge = page.evaluate("getComputedStyle(document.getElementById('state')).backgroundColor")
    assert badge == "rgb(31, 122, 61)"  # the stylesheet's green for "open"


def test_browser_pages_talk_by_id_and_by_room_and_see_errors(browser: Browser, tmp_path: Path) -> None:
    with run_server("--log-level", "warning") as server:
        a, b = open_console(browser, server), open_console(browser, server)
        id_a, id_b = client_id_of(a), client_id_of(b)
        assert len(id_a) == 36 and id_a != id_b

        send_from(a, "client", id_b, "chat", '{"text": "hello B"}')
        assert id_a in log_entry(b, "hello B").inner_text()

        for page in (a, b):  # keyboard only: type a room name, press Enter
            page.focus("#room")
            page.keyboard.type("lobby")
            page.keyboard.press("Enter")
            log_entry(page, "joined")
        send_from(a, "room", "lobby", "chat", '{"text": "hello room"}')
        assert "in lobby" in log_entry(b, "hello room").inner_text()

        send_from(a, "client", "nobody", "chat", "{}")
        error = log_entry(a, "unknown_client")
        assert "error" in (error.get_attribute("class") or "")
        assert "no client with id 'nobody'" in error.inner_text()

        send_from(a, "client", id_b, "chat", "[1, 2]")  # the form refuses what the server would
        assert "JSON object" in a.locator("#send-error").inner_text()

        a.locator("#refresh").click()
        a.locator("#clients li", has_text=id_b).wait_for(timeout=TIMEOUT * 1000)
        assert_rendered(a, tmp_path / "console.png")


def test_browser_page_reconnects_and_rejoins_its_room_after_a_restart(browser: Browser, tmp_path: Path) -> None:
    port = free_port()
    with run_server("--log-level", "warning", port=port) as server:
        page = open_console(browser, server)
        first_id = client_id_of(page)
        page.fill("#room", "lobby")
        page.press("#room", "Enter")
        log_entry(page, "joined")
    # The server is gone: the page says so, and when it tries again, and keeps trying.
    page.wait_for_function("document.getElementById('state').dataset.state === 'reconnecting'",
                           timeout=TIMEOUT * 1000)
    page.wait_for_function(r"""/^closed \d+; reconnecting in \d+\.\d s \(attempt \d+\)$/
                               .test(document.getElementById('state').textContent)""", timeout=TIMEOUT * 1000)
    with run_server("--log-level", "warning", port=port) as server:
        page.wait_for_function("document.getElementById('state').dataset.state === 'open'", timeout=30_000)
        second_id = client_id_of(page)
        assert second_id != first_id
        # It re-joined its room by itself: the page shows the second "joined", the server lists it there.
        page.locator("#log li", has_text="joined").nth(1).wait_for(timeout=TIMEOUT * 1000)
        assert server.get(f"/api/clients/{second_id}").json()["rooms"] == ["lobby"]
        assert server.post("/api/rooms/lobby", {"event": "news", "data": {"data": {"n": 1}}}).json() == {
            "delivered": 1}
        log_entry(page, '{"n":1}')
        assert_rendered(page, tmp_path / "reconnected.png")


def test_browser_page_refuses_forged_server_events(browser: Browser) -> None:
    with run_server("--log-level", "warning") as server:
        a, b = open_console(browser, server), open_console(browser, server)
        id_b = client_id_of(b)
        for name in ("connect", "pong"):  # the gateway refuses to relay them
            send_from(a, "client", id_b, name, '{"message": "connection request granted"}')
            assert f"'{name}' is sent by the server only" in log_entry(a, f"invalid_event: '{name}'").inner_text()
        send_from(a, "client", id_b, "chat", '{"text": "after the forgeries"}')
        log_entry(b, "after the forgeries")  # frames from A arrive in order: nothing of A's came before it
        assert b.locator("#log li", has_text="connect").count() == 1  # its own
        assert client_id_of(b) == id_b
        assert b.evaluate("window.wsMicroClient.clientId") == id_b
    # A gateway without that check relays them: the page still keeps its id, and can still send.
    with relaying_gateway(*FORGERY) as url, run_server("--log-level", "warning") as server:
        page = browser.new_context().new_page()
        page.goto(f"{server.http}/?ws={url}")
        log_entry(page, "after the forgery")
        assert client_id_of(page) == MINE
        assert page.evaluate("window.wsMicroClient.clientId") == MINE


def test_browser_pages_of_other_sites_cannot_drive_the_api(tmp_path: Path) -> None:
    # evil.example resolves to this machine, as it would after a DNS rebinding.
    with (sync_playwright() as playwright, run_server("--log-level", "warning") as server):
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            *CHROMIUM_ARGS, "--host-resolver-rules=MAP evil.example 127.0.0.1"])
        try:
            own = open_console(chromium, server)
            rebound = chromium.new_context().new_page()
            rebound.goto(f"http://evil.example:{server.port}/")  # its own origin: the WebSocket is same-origin
            rebound.locator("#clients-note", has_text="403").wait_for(timeout=TIMEOUT * 1000)
            # Requests a page may send anywhere without a CORS preflight: text/plain POSTs.
            for target in (f"http://127.0.0.1:{server.port}", f"http://evil.example:{server.port}"):
                status = rebound.evaluate("""async (url) => {
                    const response = await fetch(url + "/api/broadcast", {method: "POST", mode: "no-cors",
                      headers: {"Content-Type": "text/plain"}, body: '{"event":"forged","data":{"data":{}}}'});
                    return response.status;  // 0 when opaque (cross-origin)
                }""", target)
                assert status in (0, 403, 415)
            send_from(own, "builtin", "", "ping", '{"n": 1}')  # had a broadcast gone out, it would come first
            log_entry(own, '{"n":1}')
            assert own.locator("#log li", has_text="forged").count() == 0
            own.locator("#refresh").click()  # the page's own, same-origin use goes on
            own.locator("#clients-note", has_text="2 connected").wait_for(timeout=TIMEOUT * 1000)
        finally:
            chromium.close()


def test_browser_page_fits_a_phone_and_works_without_the_api(browser: Browser, tmp_path: Path) -> None:
    with run_server("--log-level", "warning", "--api-token", "secret") as server:
        page = open_console(browser, server, viewport={"width": 375, "height": 740}, is_mobile=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling
        page.locator("#clients-note", has_text="401").wait_for(timeout=TIMEOUT * 1000)
        send_from(page, "builtin", "", "ping", '{"n": 7}')
        log_entry(page, "pong")
        assert_rendered(page, tmp_path / "phone.png")


# The JS client's reconnect rules, each against a real server that misbehaves in one way.


class Attempts:
    """The connections a test server accepted: when each came and when its client let go of it."""

    def __init__(self) -> None:
        self.opened: list[float] = []
        self.closed: dict[int, float] = {}
        self._changed = threading.Condition()

    def open(self) -> int:
        with self._changed:
            self.opened.append(time.monotonic())
            self._changed.notify_all()
            return len(self.opened) - 1

    def close(self, index: int) -> None:
        with self._changed:
            self.closed[index] = time.monotonic()
            self._changed.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        with self._changed:
            assert self._changed.wait_for(predicate, TIMEOUT), f"timed out waiting for {what}"


@contextlib.contextmanager
def flaky_gateway(*holds: float | None, greet: bool = True) -> Iterator[tuple[str, Attempts]]:
    """A WebSocket server that greets each connection as the gateway does (unless not ``greet``), keeps the
    i-th one ``holds[i]`` seconds (the last hold for all later ones; None: until the client leaves), then
    closes it with 1011, as a gateway that fails under its clients would."""
    from websockets.sync.server import ServerConnection, serve

    attempts = Attempts()

    def handler(ws: ServerConnection) -> None:
        index = attempts.open()
        if greet:
            ws.send(json.dumps(frame("connect", f"flaky-{index}", {"message": "connection request granted"})))
        hold = holds[min(index, len(holds) - 1)]
        if hold is None:
            with contextlib.suppress(ConnectionClosed):
                for _ in ws:
                    pass
        else:
            time.sleep(hold)  # this server's way: up for `hold` seconds, then it fails
            ws.close(1011, "flaky")
        attempts.close(index)

    with serve(handler, "127.0.0.1", 0) as flaky, serving(flaky):
        yield f"ws://127.0.0.1:{flaky.socket.getsockname()[1]}/ws/py_client", attempts


@contextlib.contextmanager
def mute_server(greet: bool = False) -> Iterator[tuple[str, Attempts]]:
    """A TCP server that accepts every connection and never answers its WebSocket handshake; or, ``greet``,
    answers it and sends a connect frame, then goes quiet as a peer behind a dead network does: it reads
    what comes and answers nothing, not even a close."""
    from websockets.utils import accept_key

    attempts = Attempts()

    class Mute(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            index = attempts.open()
            with contextlib.suppress(OSError):
                if greet:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = self.request.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    key = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                               if line.lower().startswith(b"sec-websocket-key:"))
                    greeting = json.dumps(frame("connect", f"mute-{index}", {})).encode()
                    self.request.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key).encode()
                                         + b"\r\n\r\n" + bytes((0x81, len(greeting))) + greeting)
                while self.request.recv(4096):
                    pass
            attempts.close(index)

    class MuteServer(socketserver.ThreadingTCPServer):
        daemon_threads, block_on_close = True, False  # a socket the client never lets go of stays behind

    with MuteServer(("127.0.0.1", 0), Mute) as mute, serving(mute, poll_interval=0.05):
        yield f"ws://127.0.0.1:{mute.server_address[1]}/ws/py_client", attempts


@contextlib.contextmanager
def serving(server: Any, **options: float) -> Iterator[None]:
    """Run a blocking server's ``serve_forever`` (websockets' or socketserver's) in a thread; stop it after."""
    thread = threading.Thread(target=server.serve_forever, kwargs=options)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        thread.join(TIMEOUT)


class CuttingProxy:
    """A TCP proxy on a free loopback port in front of a server's ``port``, for a browser to reach the server
    through. ``cut()`` ends every connection through it as a network failure does: each of its two sockets
    is reset (SO_LINGER 0), so neither end gets a close frame or even a FIN. With ``hold``, every connection
    that comes after is reset as soon as it is accepted, until ``release()``; with ``upgrades``, that many
    of the WebSocket connections that come after are reset as soon as the server accepts them, before the
    browser sees the server's answer. ``stall()`` loses what the server sends from then on, on the connections
    open then, as a network does that fails while frames are on their way."""

    def __init__(self, port: int) -> None:
        self.target = port
        self._holding = False
        self._upgrades = 0
        self._links: set[asyncio.StreamWriter] = set()
        self._stalled: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # one for each connection through it
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever)
        self._thread.start()
        self._server: asyncio.Server = self._call(asyncio.start_server(self._link, "127.0.0.1", 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.http = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def close() -> None:
            self._server.close()
            await self._cut(False, 0)
            if self._tasks:  # each ends once its sockets are reset
                await asyncio.wait(self._tasks, timeout=TIMEOUT)
        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUT)
        self._loop.close()

    def cut(self, *, hold: bool = False, upgrades: int = 0) -> None:
        self._call(self._cut(hold, upgrades))

    def release(self) -> None:
        self._call(self._cut(False, 0, cut=False))

    def stall(self) -> None:
        async def stall() -> None:
            self._stalled.update(self._links)
        self._call(stall())

    def _call(self, work: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(TIMEOUT)

    async def _cut(self, hold: bool, upgrades: int, *, cut: bool = True) -> None:
        self._holding, self._upgrades = hold, upgrades  # in the proxy's loop: no connection slips in between
        for writer in list(self._links) if cut else []:
            self._reset(writer)
        if cut:
            self._links.clear()
            self._stalled.clear()

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # closed at once: with SO_LINGER 0, an RST

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._holding:
            self._reset(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            self._reset(writer)
            self._tasks.discard(task)
            return
        self._links.update((writer, upstream))
        try:
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(upstream_reader, writer, upstream))
        finally:
            self._links.difference_update((writer, upstream))
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    upstream: asyncio.StreamWriter | None = None) -> None:
        """Copy one direction until its end closes (or is reset), then close the other end's socket.
        ``upstream``: this direction carries the server's answers, on that connection to the server."""
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if upstream is not None and self._upgrades and data.startswith(b"HTTP/1.1 101 "):
                    self._upgrades -= 1
                    self._reset(writer)
                    self._reset(upstream)
                    return
                if writer in self._stalled:
                    continue
                writer.write(data)
                await writer.drain()
        writer.close()


def start_probe(page: Page, url: str, **options: float | str) -> None:
    """A JS Client of the test's own on the page, for ``url``, not yet connected (window.probe); every
    state it reports lands in window.seen as {state, ...detail}, and when, in ms, in window.seenAt."""
    page.evaluate("""async ([url, options]) => {
        const { Client } = await import("./static/ws_micro.js");
        window.seen = [];
        window.seenAt = [];
        window.probe = new Client(url, options);
        probe.onState((state, detail) => {
            seen.push({ state, ...detail });
            seenAt.push(performance.now());
        });
    }""", [url, options])


def wait_seen(page: Page, count: int, state: str) -> list[dict[str, Any]]:
    """Wait until the probe has reported ``state`` ``count`` times; all it reported so far."""
    page.wait_for_function("([count, state]) => seen.filter((s) => s.state === state).length >= count",
                           arg=[count, state], timeout=TIMEOUT * 1000)
    return list(page.evaluate("seen"))


def waits(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reconnect waits among the reported states: those that say when the next try comes."""
    return [state for state in seen if state["state"] == "reconnecting" and "delay" in state]


def tries(page: Page) -> list[float]:
    """When (ms, the page's clock) each of the probe's tries opened its socket."""
    return [at for at, state in zip(page.evaluate("seenAt"), page.evaluate("seen"), strict=True)
            if state["state"] in ("connecting", "reconnecting") and "delay" not in state]


def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` (state in another process, seen through its API) until it holds."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_browser_client_connect_is_a_no_op_while_connecting_or_open(browser: Browser) -> None:
    with run_server("--log-level", "warning") as server:
        page = open_console(browser, server)  # the console's own client: the first connection
        page.evaluate("wsMicroClient.connect(); wsMicroClient.connect()")
        start_probe(page, server.ws)
        page.evaluate("probe.connect(); probe.connect()")  # the second call comes while it is connecting
        wait_seen(page, 1, "open")
        page.evaluate("probe.connect()")
        # One more client, connected last. Chromium opens one socket at a time to a host (RFC 6455, 4.1),
        # so a socket that one of the calls above opened would have been accepted before this one.
        page.evaluate("""async (url) => {
            const { Client } = await import("./static/ws_micro.js");
            window.last = new Client(url).connect();
        }""", server.ws)
        page.wait_for_function("last.state === 'open'", timeout=TIMEOUT * 1000)
        assert server.metric("ws_micro_connections_total") == 3
        assert server.get("/api/clients").json()["count"] == 3
        assert [state["state"] for state in page.evaluate("seen")] == ["connecting", "open"]
        assert page.evaluate("wsMicroClient.clientId") == client_id_of(page)


def test_browser_client_backs_off_from_a_server_that_drops_it_until_a_connection_lasts_min_uptime(
        browser: Browser) -> None:
    # Four connections dropped at once, one that lasts past minUptime, one more dropped, one that stays.
    with run_server("--log-level", "warning") as server, flaky_gateway(0, 0, 0, 0, 1.0, 0, None) as (url, attempts):
        page = open_console(browser, server)
        start_probe(page, url, initialDelay=100, minUptime=500)
        page.evaluate("probe.connect()")
        seen = wait_seen(page, 7, "open")
        # Each was greeted, so each opened; yet the waits grew, and started over only after the long one.
        assert [(wait["attempt"], wait["cause"], wait["code"]) for wait in waits(seen)] == [
            (1, "close", 1011), (2, "close", 1011), (3, "close", 1011), (4, "close", 1011),
            (1, "close", 1011), (2, "close", 1011)]
        for wait in waits(seen):  # each wait is between half and all of initialDelay * 2 ** (attempt - 1)
            assert 50 * 2 ** (wait["attempt"] - 1) <= wait["delay"] <= 100 * 2 ** (wait["attempt"] - 1), wait
        # So the tries spread out, 50 ms at least between the 1st and the 2nd, then 100, 200, 400 (retrying
        # every 50-100 ms, it would have made all seven in well under 1 s); each was a connection to the server.
        opened = tries(page)
        for i in range(4):
            assert opened[i + 1] - opened[i] >= 50 * 2**i - 1, opened
        assert len(opened) == len(attempts.opened) == 7


@pytest.mark.parametrize("server_kind", ["handshake hangs", "never greets"])
def test_browser_client_drops_and_retries_a_connection_not_greeted_within_connect_timeout(
        browser: Browser, server_kind: str) -> None:
    test_server = mute_server() if server_kind == "handshake hangs" else flaky_gateway(None, greet=False)
    with run_server("--log-level", "warning") as server, test_server as (url, attempts):
        page = open_console(browser, server)
        start_probe(page, url, initialDelay=100, connectTimeout=500)
        page.evaluate("probe.connect()")
        # It tried again, and let go of the first connection: no socket is left behind.
        attempts.wait(lambda: len(attempts.opened) >= 2 and 0 in attempts.closed, "a second try")
        seen, seen_at = page.evaluate("seen"), page.evaluate("seenAt")
        timed_out = seen.index(waits(seen)[0])
        assert (seen[timed_out]["attempt"], seen[timed_out]["cause"], seen[timed_out]["code"],
                seen[timed_out]["reason"]) == (1, "timeout", 4000, "connect timeout")
        assert seen_at[timed_out] - seen_at[0] >= 500 - 1  # connectTimeout after its first try, not before
        assert "open" not in [state["state"] for state in seen]


def test_browser_client_leaves_a_dead_connection_at_once_when_its_keepalive_goes_unanswered(
        browser: Browser) -> None:
    # Chromium waits a minute for the closing handshake of a socket whose peer is gone; the client does not.
    with run_server("--log-level", "warning") as server, mute_server(greet=True) as (url, attempts):
        page = open_console(browser, server)
        start_probe(page, url, initialDelay=100, keepalive=300)
        page.evaluate("probe.connect()")
        attempts.wait(lambda: len(attempts.opened) >= 2, "a second try")  # within 10 s, not after a minute
        seen, seen_at = page.evaluate("seen"), page.evaluate("seenAt")
        assert [state["state"] for state in seen[:2]] == ["connecting", "open"]
        assert seen[2] == {"state": "reconnecting", "attempt": 1, "delay": seen[2]["delay"], "cause": "keepalive",
                           "code": 4000, "reason": "keepalive timeout"}
        assert seen_at[2] - seen_at[1] >= 600 - 1  # a ping's interval, then a pong's wait


def test_browser_client_gives_up_after_max_retries_until_reconnect_is_called(browser: Browser) -> None:
    with run_server("--log-level", "warning") as server, flaky_gateway(0, 0, 0, None) as (url, attempts):
        page = open_console(browser, server)
        start_probe(page, url, initialDelay=100, maxRetries=2)
        page.evaluate("probe.connect()")
        seen = wait_seen(page, 1, "closed")
        assert [wait["attempt"] for wait in waits(seen)] == [1, 2]
        assert seen[-1] == {"state": "closed", "gaveUp": True, "attempt": 2, "cause": "close",
                            "code": 1011, "reason": "flaky"}
        assert len(attempts.opened) == 3  # the first try and two retries
        page.evaluate("probe.reconnect()")  # still works once it has given up
        seen = wait_seen(page, 4, "open")
        assert seen[-2:] == [{"state": "connecting", "attempt": 0},
                             {"state": "open", "clientId": "flaky-3", "recovered": None}]
        assert len(attempts.opened) == 4


def test_browser_client_retries_at_once_when_the_browser_comes_back_online(browser: Browser) -> None:
    with run_server("--log-level", "warning") as server, flaky_gateway(0, None) as (url, attempts):
        page = open_console(browser, server)
        start_probe(page, url, initialDelay=60_000, maxDelay=60_000)
        page.evaluate("probe.connect()")
        page.wait_for_function("seen.some((s) => s.delay !== undefined)", timeout=TIMEOUT * 1000)
        page.context.set_offline(True)
        page.context.set_offline(False)
        seen = wait_seen(page, 2, "open")  # long before the 30 s or more it was to wait
        dropped, online = waits(seen)
        assert (dropped["attempt"], dropped["cause"]) == (1, "close") and dropped["delay"] >= 30_000
        assert (online["attempt"], online["cause"], online["delay"]) == (1, "online", 0)
        assert len(attempts.opened) == 2


def test_browser_console_reconnect_button_replaces_the_connection_at_once(browser: Browser) -> None:
    with run_server("--log-level", "warning") as server:
        page = open_console(browser, server)
        first_id = client_id_of(page)
        page.fill("#room", "lobby")
        page.press("#room", "Enter")
        log_entry(page, "joined")
        page.click("#reconnect")
        page.wait_for_function("([id]) => document.getElementById('client-id').textContent !== id",
                               arg=[first_id], timeout=TIMEOUT * 1000)
        second_id = client_id_of(page)
        assert page.locator("#state").inner_text() == "open"
        page.locator("#log li", has_text="joined").nth(1).wait_for(timeout=TIMEOUT * 1000)
        # The old connection is gone from the server, not left open beside the new one.
        until(lambda: [c["client_id"] for c in server.get("/api/clients").json()["clients"]] == [second_id],
              "the server to list only the new connection")
        assert server.get(f"/api/clients/{second_id}").json()["rooms"] == ["lobby"]
        assert server.metric("ws_micro_connections_total") == 2


# Tokens: the page and the JS client against the gateway's --jwt-secret (JWT_SECRET, tokens from mint()).


def wait_state(page: Page, state: str) -> None:
    page.wait_for_function("([state]) => document.getElementById('state').dataset.state === state",
                           arg=[state], timeout=TIMEOUT * 1000)


def test_browser_page_connects_with_a_token_from_its_fragment_and_takes_it_out_of_the_address_bar(
        browser: Browser, tmp_path: Path) -> None:
    token, log = mint(), tmp_path / "server.log"
    with run_server("--log-level", "info", "--jwt-secret", JWT_SECRET, log=log) as server:
        page = browser.new_context().new_page()
        page.goto(f"{server.http}/#token={token}")  # a fragment: the browser never sends it to the server
        wait_state(page, "open")
        assert page.locator("#user").inner_text() == "alice"
        assert page.evaluate("wsMicroClient.user") == "alice"
        assert page.evaluate("location.href") == f"{server.http}/"  # not in the address bar, nor bookmarked
        assert page.input_value("#token") == token  # kept for the page's next tries
        send_from(page, "builtin", "", "ping", '{"n": 1}')
        log_entry(page, "pong")
    text = log.read_text()
    assert '"GET / HTTP/1.1" 200' in text  # the access log was on, and saw the page's requests
    assert token not in text and token.split(".")[2] not in text


@pytest.mark.parametrize("kind", ["none", "expired", "wrong-secret"])
def test_browser_page_shows_a_refused_token_and_tries_no_more_until_retried(browser: Browser, kind: str) -> None:
    token = {"none": None, "expired": mint(lifetime=-60),
             "wrong-secret": mint(key="another-secret-of-32-bytes-or-more")}[kind]
    with run_server("--log-level", "warning", "--jwt-secret", JWT_SECRET) as server:
        page = browser.new_context().new_page()
        page.clock.install()  # the page's timers run in real time, and are fast-forwarded below
        page.goto(f"{server.http}/" + (f"#token={token}" if token else ""))
        wait_state(page, "refused")
        refused = server.metric("ws_micro_rejected_handshakes_total", reason="unauthorized")
        assert 1 <= refused <= 2  # the handshake, and perhaps the page's one GET asking why
        # Five minutes later by the page's clock, any retry would have come (the waits are 10 s at most).
        page.clock.run_for(5 * 60_000)
        assert page.evaluate("wsMicroClient.state") == "refused"
        assert server.metric("ws_micro_rejected_handshakes_total", reason="unauthorized") == refused
        # The page says what the gateway answers the same request.
        answer = server.get("/ws/py_client", params={"token": token} if token else {})
        assert (answer.status_code, answer.json()["error"]["code"]) == (401, "unauthorized")
        assert page.locator("#state").inner_text() == "refused: 401 unauthorized"
        assert page.locator("#refusal-status").inner_text() == "401 unauthorized"
        assert page.locator("#refusal-message").inner_text() == answer.json()["error"]["message"]
        # The token field is open beside the refusal: a new token, then Retry.
        page.fill("#token", mint())
        page.click("#retry")
        wait_state(page, "open")
        assert page.locator("#user").inner_text() == "alice"
        assert page.locator("#refusal").is_hidden()


def test_browser_client_gets_a_fresh_token_from_its_function_for_every_try(browser: Browser) -> None:
    minted: list[str] = []
    expired = False  # when set, the next tokens have expired already

    def fresh_token() -> str:  # the app's own token endpoint, say
        minted.append(mint({"sub": f"user-{len(minted) + 1}"}, lifetime=-60 if expired else 60))
        return minted[-1]

    with run_server("--log-level", "warning", "--jwt-secret", JWT_SECRET, "--max-message-size", "1024") as server:
        page = browser.new_context().new_page()
        page.expose_function("fetchFreshToken", fresh_token)  # JS gets a Promise of its answer
        page.goto(f"{server.http}/healthz")  # this origin, without the console's own client
        page.evaluate("""async (url) => {
            const { Client } = await import("/static/ws_micro.js");
            window.seen = [];
            window.probe = new Client(url, { initialDelay: 100, token: () => fetchFreshToken() });
            probe.onState((state, detail) => seen.push({ state, ...detail, user: probe.user }));
            probe.connect();
        }""", server.ws)
        assert wait_seen(page, 1, "open")[-1]["user"] == "user-1"
        page.evaluate("probe.send('echo', { pad: 'x'.repeat(2000) })")  # too large: the server closes (1009)
        seen = wait_seen(page, 2, "open")
        assert [(wait["cause"], wait["code"]) for wait in waits(seen)] == [("close", 1009)]
        assert seen[-1]["user"] == "user-2" and len(minted) == 2  # the retry asked for a token of its own
        expired = True
        page.evaluate("probe.send('echo', { pad: 'x'.repeat(2000) })")
        seen = wait_seen(page, 1, "refused")
        assert {key: seen[-1][key] for key in ("status", "code")} == {"status": 401, "code": "unauthorized"}
        assert page.evaluate("probe.refusal.status") == 401 and len(minted) == 3
        expired = False
        page.evaluate("probe.reconnect()")  # the app, once it can get a good token again
        assert wait_seen(page, 3, "open")[-1]["user"] == "user-4"
        assert len(minted) == 4


def test_browser_client_on_another_origin_learns_why_it_was_refused(browser: Browser) -> None:
    with run_server("--log-level", "warning") as site, run_server(
            "--log-level", "warning", "--jwt-secret", JWT_SECRET, "--allowed-origins", site.http) as gateway:
        page = browser.new_context().new_page()
        page.goto(f"{site.http}/healthz")  # a page of another origin, which the gateway allows
        start_probe(page, gateway.ws, token=mint(lifetime=-60))
        page.evaluate("probe.connect()")
        # Its GET asking why went cross-origin with credentials: the answer let the page read it.
        refused = wait_seen(page, 1, "refused")[-1]
        assert (refused["status"], refused["code"]) == (401, "unauthorized")
        start_probe(page, gateway.ws, token=mint())
        page.evaluate("probe.connect()")
        wait_seen(page, 1, "open")
        assert page.evaluate("probe.user") == "alice"


# Connection recovery: the page and the JS client against a gateway with --recovery-window, which they
# reach through a CuttingProxy that the test cuts as a network failure would.


def news(n: int) -> dict[str, Any]:
    return {"event": "news", "data": {"data": {"n": n}}}


def log_lines(page: Page) -> list[str]:
    """The page's log, oldest first."""
    return list(reversed(page.eval_on_selector_all("#log li", "items => items.map((item) => item.textContent)")))


def news_seen(page: Page) -> list[int]:
    """The ``news`` frames in the page's log, oldest first, by their n."""
    return [int(match[1]) for line in log_lines(page) if (match := re.fullmatch(r'news to me\{"n":(\d+)\}', line))]


def wait_for_a_failed_retry(page: Page) -> None:
    """Wait until the page has said that a retry failed too: its badge counts a second attempt."""
    page.wait_for_function(r"""/reconnecting in .*\(attempt ([2-9]|\d\d+)\)$/
                               .test(document.getElementById('state').textContent)""", timeout=TIMEOUT * 1000)


def test_browser_client_comes_back_as_itself_with_every_frame_it_missed_after_its_connection_drops(
        browser: Browser, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with (run_server("--log-level", "info", "--recovery-window", "120", log=log) as server,
          CuttingProxy(server.port) as proxy):
        page = browser.new_context().new_page()
        sockets: list[str] = []  # the URL of each WebSocket the page opened
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.goto(proxy.http + "/")
        wait_state(page, "open")
        client_id = client_id_of(page)
        page.fill("#room", "lobby")
        page.press("#room", "Enter")
        log_entry(page, "joined")
        assert server.post(f"/api/clients/{client_id}", news(0)).json() == {"delivered": 1}
        log_entry(page, '{"n":0}')

        # The network fails: first what the gateway sends is lost on its way (n 1, which the gateway wrote to
        # a connection it still had); then the connection is gone, and no close frame, not even a FIN,
        # reaches either end; and the network stays down a while.
        proxy.stall()
        assert server.post(f"/api/clients/{client_id}", news(1)).json() == {"delivered": 1}
        proxy.cut(hold=True)
        wait_for_a_failed_retry(page)
        until(lambda: server.metric("ws_micro_sessions_away") == 1, "the gateway to keep the session")
        for path, n in ((f"/api/clients/{client_id}", 2), ("/api/rooms/lobby", 3), ("/api/broadcast", 4)):
            assert server.post(path, news(n)).json() == {"delivered": 1}, path  # kept for it
        assert news_seen(page) == [0]
        proxy.release()  # the network is back: the page gets through by itself

        page.locator("#session", has_text="session recovered").wait_for(timeout=TIMEOUT * 1000)
        assert page.locator("#state").inner_text() == "open"
        assert client_id_of(page) == client_id
        assert page.evaluate("wsMicroClient.recovered") is True
        assert server.post(f"/api/clients/{client_id}", news(5)).json() == {"delivered": 1}
        log_entry(page, '{"n":5}')
        # Every frame it missed, once each and in order, then the new one; what it had got, not again.
        assert news_seen(page) == [0, 1, 2, 3, 4, 5]
        lines = log_lines(page)
        recovered = lines.index("session recovered: same id, same rooms; the 4 frame(s) it missed follow")
        assert lines[recovered - 1].startswith("connect to me") and '"recovered":true' in lines[recovered - 1]
        assert lines[recovered + 1] == 'news to me{"n":1}'
        # Still in its room, which it did not join again: one "joined" only.
        assert page.locator("#log li", has_text="joined").count() == 1
        assert server.get(f"/api/clients/{client_id}").json()["rooms"] == ["lobby"]
        assert [room.inner_text() for room in page.locator("#rooms li button.link").all()] == ["lobby"]
        assert server.post("/api/rooms/lobby", news(6)).json() == {"delivered": 1}
        log_entry(page, '{"n":6}')

        # Its tries since the drop each carried the first connection's token and how many frames it had
        # got since (joined, and n 0); the token is nowhere on the page, its address or its storage.
        resumes = [dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)) for url in sockets[1:]]
        assert len(resumes) >= 2 and all(resume.keys() == {"resume_token", "resume_offset"} for resume in resumes)
        assert {(resume["resume_token"].split(".")[0], resume["resume_offset"]) for resume in resumes} == {
            (client_id, "2")}
        token = resumes[0]["resume_token"]
        assert len({resume["resume_token"] for resume in resumes}) == 1
        assert token not in page.content() and "resume_token" not in page.content()
        assert page.evaluate("location.href") == proxy.http + "/"
        assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    text = log.read_text()
    assert "WebSocket /ws/py_client" in text  # the access log was on, and saw the page's handshakes
    assert token.split(".")[1] not in text


def test_browser_client_back_in_its_session_changes_only_the_rooms_it_changed_while_away(browser: Browser) -> None:
    with (run_server("--log-level", "warning", "--recovery-window", "120") as server,
          CuttingProxy(server.port) as proxy):
        page = browser.new_context().new_page()
        page.goto(proxy.http + "/")
        wait_state(page, "open")
        client_id = client_id_of(page)
        for room in ("lobby", "news"):
            page.fill("#room", room)
            page.press("#room", "Enter")
        page.locator("#log li", has_text="joined").nth(1).wait_for(timeout=TIMEOUT * 1000)
        proxy.cut(hold=True)
        wait_for_a_failed_retry(page)
        page.evaluate("wsMicroClient.leave('news'); wsMicroClient.join('sport')")  # while it cannot send them
        proxy.release()
        page.locator("#session", has_text="session recovered").wait_for(timeout=TIMEOUT * 1000)
        log_entry(page, '{"room":"news","members":0}')
        log_entry(page, '{"room":"sport","members":1}')
        assert server.get(f"/api/clients/{client_id}").json()["rooms"] == ["lobby", "sport"]
        assert page.locator("#log li", has_text="joined").count() == 3  # lobby, news, then sport: lobby not again
        assert [room.inner_text() for room in page.locator("#rooms li button.link").all()] == ["lobby", "sport"]


@contextlib.contextmanager
def page_in_lobby(browser: Browser, window: str) -> Iterator[tuple[Server, CuttingProxy, Page, list[str]]]:
    """A console page behind a cutting proxy, in room lobby, with recovery on; the URLs of its sockets."""
    with (run_server("--log-level", "warning", "--recovery-window", window) as server,
          CuttingProxy(server.port) as proxy):
        page = browser.new_context().new_page()
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.goto(proxy.http + "/")
        wait_state(page, "open")
        page.fill("#room", "lobby")
        page.press("#room", "Enter")
        log_entry(page, "joined")
        yield server, proxy, page, sockets


def resume_tokens(sockets: list[str]) -> list[str | None]:
    return [dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)).get("resume_token") for url in sockets]


def test_browser_client_recovers_its_session_when_the_answer_to_its_resume_is_lost(browser: Browser) -> None:
    with page_in_lobby(browser, "120") as (server, proxy, page, sockets):
        client_id = client_id_of(page)
        # Its first try gets through and the gateway takes its token; then the network fails before the page
        # sees the answer, with the next token. Its next try brings the same token, which is as good again
        # once that connection has dropped: the session is not lost to one lost packet.
        proxy.cut(upgrades=1)
        page.locator("#session", has_text="session recovered").wait_for(timeout=TIMEOUT * 1000)
        assert client_id_of(page) == client_id and page.evaluate("wsMicroClient.recovered") is True
        assert server.post("/api/rooms/lobby", news(1)).json()["delivered"] == 1
        log_entry(page, '{"n":1}')
        tokens = resume_tokens(sockets)
        assert tokens[0] is None and len(tokens) == 3 and tokens[1] == tokens[2]
        assert page.locator("#log li", has_text="joined").count() == 1  # its room kept, not joined again
        assert page.locator("#refusal").is_hidden()


def test_browser_client_starts_a_new_session_when_its_own_cannot_be_resumed(browser: Browser) -> None:
    with page_in_lobby(browser, "0.5") as (server, proxy, page, sockets):
        first_id = client_id_of(page)
        proxy.cut(hold=True)
        until(lambda: server.metric("ws_micro_sessions_total", outcome="expired") == 1,
              "the session to end when the window passed")
        proxy.release()

        page.locator("#session", has_text="new session").wait_for(timeout=TIMEOUT * 1000)
        second_id = client_id_of(page)
        assert second_id != first_id and page.evaluate("wsMicroClient.recovered") is False
        assert "new session: new id; frames sent meanwhile are lost, resynchronise" in log_lines(page)
        # It joined its room again, as in a new session it must.
        page.locator("#log li", has_text="joined").nth(1).wait_for(timeout=TIMEOUT * 1000)
        assert server.get(f"/api/clients/{second_id}").json()["rooms"] == ["lobby"]
        assert server.post("/api/rooms/lobby", news(1)).json()["delivered"] >= 1
        log_entry(page, '{"n":1}')
        assert page.evaluate("wsMicroClient.offset") == 2  # counted from the new session's connect frame
        tokens = resume_tokens(sockets)
        assert tokens[0] is None and str(tokens[1]).startswith(first_id + ".")
        # Every try brought it, the last one too: the gateway answered that one with a new session.
        assert len(set(tokens[1:])) == 1
        assert server.metric("ws_micro_sessions_total", outcome="not_recovered") == 1
        assert page.locator("#refusal").is_hidden()


# --------------------------------------------------------------------------
# Cluster mode: real redis-server, several real uvicorn instances
# --------------------------------------------------------------------------

REDIS_SERVER = os.environ.get("WS_MICRO_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
FAST_HEARTBEAT = ("--heartbeat-interval", "0.2", "--instance-ttl", "1.0")


class RedisServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start an empty, unpersisted redis-server and wait until it answers PING."""
        assert Path(REDIS_SERVER).is_file(), f"the cluster tests need {REDIS_SERVER}: apt-get install redis-server"
        self.process = subprocess.Popen([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert self.process.poll() is None, "redis-server exited"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16) == b"+PONG\r\n":
                    return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)

    def command(self, *args: str) -> Any:
        import redis

        with redis.Redis(port=self.port, decode_responses=True) as client:
            return client.execute_command(*args)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def cluster(redis_server: RedisServer, size: int, *args: str) -> Iterator[list[Server]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(run_server("--log-level", "warning", "--redis-url", redis_server.url,
                                              *FAST_HEARTBEAT, *args)) for _ in range(size)]


def instance_of(server: Server) -> str:
    return str(server.get("/healthz").json()["instance"])


async def recv_text(ws: ClientConnection) -> str | bytes:
    with anyio.fail_after(TIMEOUT):
        return await ws.recv()


def text(event: str, client_id: str, data: dict[str, Any] | None = None, **routing: str) -> str:
    return json.dumps(frame(event, client_id, data, **routing))


async def join(ws: ClientConnection, client_id: str, room: str) -> int:
    await ws.send(text("join", client_id, {"room": room}))
    reply = await recv_json(ws)
    assert reply["event"] == "joined", reply
    return int(reply["data"]["data"]["members"])


@pytest.mark.anyio
async def test_cluster_two_instances_behave_as_one_server(redis_server: RedisServer) -> None:
    with cluster(redis_server, 2) as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            # `to` reaches a client on the other instance, byte for byte, both ways.
            sent = text("chat", id_a, {"text": "hi B"}, to=id_b)
            await a.send(sent)
            assert await recv_text(b) == sent
            await b.send(text("chat", id_b, {"text": "hi A"}, to=id_a))
            assert json.loads(await recv_text(a))["data"]["data"] == {"text": "hi A"}

            # Rooms span instances: counts are cluster-wide, a member's frame reaches the others.
            assert await join(a, id_a, "lobby") == 1
            assert await join(b, id_b, "lobby") == 2
            sent = text("chat", id_b, {"text": "hi room"}, room="lobby")
            await b.send(sent)
            assert await recv_text(a) == sent

            # The API works on whichever instance the backend calls.
            assert y.post(f"/api/clients/{id_a}", {"event": "notice", "data": {"data": {"n": 1}}}).json() == {
                "delivered": 1}
            assert await recv_json(a) == {"event": "notice", "client_id": id_a, "data": {"data": {"n": 1}}}
            listed = x.get("/api/clients").json()
            assert listed["count"] == 2
            assert {c["client_id"]: c["instance"] for c in listed["clients"]} == {
                id_a: instance_of(x), id_b: instance_of(y)}
            entry = x.get(f"/api/clients/{id_b}").json()
            assert entry["instance"] == instance_of(y) and entry["rooms"] == ["lobby"]
            assert y.post("/api/rooms/lobby", {"event": "news", "data": {"data": {}}}).json() == {"delivered": 2}
            assert x.post("/api/broadcast", {"event": "all", "data": {"data": {}}}).json() == {"delivered": 2}
            for ws, own in ((a, id_a), (b, id_b)):
                assert await recv_json(ws) == {"event": "news", "client_id": own, "data": {"data": {}}}
                assert await recv_json(ws) == {"event": "all", "client_id": own, "data": {"data": {}}}

            # Ids that exist nowhere are still unknown.
            assert x.post("/api/clients/nobody", {"event": "x", "data": {"data": {}}}).status_code == 404
            assert x.get("/api/clients/nobody").status_code == 404
            await a.send(text("chat", id_a, to="nobody"))
            assert (await recv_json(a))["data"]["data"]["code"] == "unknown_client"

            # DELETE on the other instance closes the client, and it leaves the directory and its room.
            assert httpx.delete(f"{y.http}/api/clients/{id_a}", timeout=TIMEOUT).json() == {"disconnected": 1}
            with pytest.raises(ConnectionClosed):
                await recv_json(a)
            assert a.close_code == 1000 and a.close_reason == "disconnected by the server"
            await y.wait_until(lambda: y.get("/api/clients").json()["count"] == 1, "A to leave the directory")
            await b.send(text("chat", id_b, to=id_a))
            assert (await recv_json(b))["data"]["data"]["code"] == "unknown_client"
            await b.send(text("leave", id_b, {"room": "lobby"}))
            assert (await recv_json(b))["data"]["data"] == {"room": "lobby", "members": 0}


@pytest.mark.anyio
async def test_cluster_three_instances_share_rooms_and_broadcasts(redis_server: RedisServer) -> None:
    with cluster(redis_server, 3) as servers:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(ws_client(s.ws)) for s in servers]
            for count, (ws, own) in enumerate(clients, start=1):
                assert await join(ws, own, "r") == count
            (a, id_a), (b, _), (c, id_c) = clients
            sent = text("chat", id_c, {"from": "C"}, room="r")
            await c.send(sent)
            assert [await recv_text(a), await recv_text(b)] == [sent, sent]
            await a.send(text("chat", id_a, {"from": "A"}, to=id_c))
            assert (await recv_json(c))["data"]["data"] == {"from": "A"}
            assert servers[1].post("/api/broadcast", {"event": "all", "data": {"data": {}}}).json() == {
                "delivered": 3}
            for ws, own in clients:
                assert await recv_json(ws) == {"event": "all", "client_id": own, "data": {"data": {}}}
            assert servers[0].get("/api/clients").json()["count"] == 3


@pytest.mark.anyio
async def test_cluster_two_workers_on_one_port(redis_server: RedisServer) -> None:
    env = {"WS_MICRO_REDIS_URL": redis_server.url, "WS_MICRO_HEARTBEAT_INTERVAL": "0.2",
           "WS_MICRO_INSTANCE_TTL": "1.0"}
    with run_server("--workers", "2", "--log-level", "warning", env=env, uvicorn_app=True) as server:
        # Until a worker has joined the cluster its clients are in no directory: wait for both to say "ok".
        joined: set[str] = set()

        def both_joined() -> bool:
            health = server.get("/healthz").json()
            if health["status"] == "ok":
                joined.add(health["instance"])
            return len(joined) == 2

        await server.wait_until(both_joined, "both workers to join the cluster")
        async with contextlib.AsyncExitStack() as stack:
            # The kernel spreads connections over the workers; connect until both hold some.
            clients: dict[str, tuple[ClientConnection, str]] = {}
            for _ in range(60):
                ws, own = await stack.enter_async_context(ws_client(server.ws))
                where = (await anyio.to_thread.run_sync(server.get, f"/api/clients/{own}")).json()
                clients.setdefault(where["instance"], (ws, own))
                if len(clients) == 2:
                    break
            assert len(clients) == 2, "every connection landed on one worker"
            (a, id_a), (b, id_b) = clients.values()
            sent = text("chat", id_a, {"text": "across workers"}, to=id_b)
            await a.send(sent)
            assert await recv_text(b) == sent
            total = server.get("/api/clients").json()["count"]
            assert server.post("/api/broadcast", {"event": "all", "data": {"data": {}}}).json() == {
                "delivered": total}
            assert (await recv_json(a))["event"] == (await recv_json(b))["event"] == "all"


@pytest.mark.anyio
async def test_cluster_instance_killed_with_sigkill_drops_out(redis_server: RedisServer) -> None:
    ttl = 3.0
    with cluster(redis_server, 1, "--heartbeat-interval", "0.2", "--instance-ttl", str(ttl)) as (x,), \
            run_server("--log-level", "warning", "--redis-url", redis_server.url,
                       "--heartbeat-interval", "0.2", "--instance-ttl", str(ttl)) as doomed:
        async with ws_client(x.ws) as (a, id_a), ws_client(doomed.ws) as (c, id_c):
            await join(a, id_a, "r")
            assert await join(c, id_c, "r") == 2
            doomed.process.kill()
            killed_at = time.monotonic()
            doomed.process.wait(TIMEOUT)
            # Until its deadline passes the directory still names it: a frame for it is published to
            # nobody, so its sender is told it may not have arrived (C may only be reconnecting), and
            # it is counted as dropped (pub/sub is at most once).  So is a room frame.
            await a.send(text("chat", id_a, to=id_c))
            assert without_message(await recv_json(a)) == error(id_a, "backend_unavailable", "chat")
            await a.send(text("news", id_a, room="r"))
            assert without_message(await recv_json(a)) == error(id_a, "backend_unavailable", "news")
            assert x.metric("ws_micro_cluster_dropped_total", reason="no_subscriber") == 2
            await x.wait_until(lambda: x.get("/api/clients").json()["count"] == 1, "the killed instance to drop out")
            # Once it has dropped out, its client is gone.
            await a.send(text("chat", id_a, to=id_c))
            assert without_message(await recv_json(a)) == error(id_a, "unknown_client", "chat")
            assert time.monotonic() - killed_at < ttl + 1.0
            # No ghost clients or room members are left behind.
            assert x.get(f"/api/clients/{id_c}").status_code == 404
            await a.send(text("leave", id_a, {"room": "r"}))
            assert (await recv_json(a))["data"]["data"] == {"room": "r", "members": 0}
            # Its keys go at the next heartbeat of a live instance.
            await x.wait_until(lambda: redis_server.command("HKEYS", "ws_micro:directory") == [id_a],
                               "the killed instance's directory entries to be reaped")
            assert redis_server.command("ZRANGE", "ws_micro:instances", "0", "-1") == [instance_of(x)]
            assert redis_server.command("EXISTS", "ws_micro:room:r") == 0  # A left, C was reaped


@pytest.mark.anyio
async def test_cluster_survives_redis_going_away_and_coming_back(redis_server: RedisServer) -> None:
    with cluster(redis_server, 2) as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(x.ws) as (a2, id_a2), ws_client(y.ws) as (b, id_b):
            await join(a, id_a, "r")
            await join(b, id_b, "r")
            redis_server.stop()
            await x.wait_until(lambda: x.get("/healthz").json()["status"] == "degraded", "X to notice")
            assert x.get("/healthz").json()["redis"] == "unavailable"
            assert x.metric("ws_micro_cluster_up") == 0

            # Local delivery keeps working.
            sent = text("chat", id_a, {"local": True}, to=id_a2)
            await a.send(sent)
            assert await recv_text(a2) == sent
            # Cross-instance sends fail with a clear error, event or HTTP 503.
            await a.send(text("chat", id_a, to=id_b))
            error = (await recv_json(a))["data"]["data"]
            assert error["code"] == "backend_unavailable" and "Redis is unavailable" in error["message"]
            await a.send(text("chat", id_a, {"n": 1}, room="r"))
            assert (await recv_json(a))["data"]["data"]["code"] == "backend_unavailable"
            for response in (x.post(f"/api/clients/{id_b}", {"event": "x", "data": {"data": {}}}),
                             x.post("/api/broadcast", {"event": "x", "data": {"data": {}}}),
                             x.get("/api/clients")):
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "backend_unavailable"
            assert x.metric("ws_micro_cluster_dropped_total", reason="backend_unavailable") >= 3

            # Redis comes back empty: both instances reconnect and write their clients and rooms again.
            redis_server.start()
            for server in (x, y):
                await server.wait_until(lambda s=server: s.get("/healthz").json()["status"] == "ok",
                                        "the instance to reconnect")
            await y.wait_until(lambda: y.get("/api/clients").json()["count"] == 3, "every client re-registered")
            sent = text("chat", id_b, {"again": True}, to=id_a)
            await b.send(sent)
            assert await recv_text(a) == sent
            assert x.post("/api/rooms/r", {"event": "news", "data": {"data": {}}}).json() == {"delivered": 2}
            assert (await recv_json(a))["event"] == (await recv_json(b))["event"] == "news"


@pytest.mark.anyio
async def test_cluster_notices_a_redis_that_hangs_and_recovers(redis_server: RedisServer) -> None:
    assert redis_server.process is not None
    with cluster(redis_server, 2, "--redis-timeout", "0.5") as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            redis_server.process.send_signal(signal.SIGSTOP)  # no reset, no answer: only timeouts tell
            try:
                await x.wait_until(lambda: x.get("/healthz").json()["status"] == "degraded", "X to time out")
                await a.send(text("chat", id_a, to=id_b))
                assert (await recv_json(a))["data"]["data"]["code"] == "backend_unavailable"
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
            # Each instance reconnects on its own time; until Y has, its clients are in no directory.
            for server, name in ((x, "X"), (y, "Y")):
                await server.wait_until(lambda s=server: s.get("/healthz").json()["status"] == "ok",
                                        f"{name} to recover")
            sent = text("chat", id_a, {"n": 2}, to=id_b)
            await a.send(sent)
            assert await recv_text(b) == sent


def test_cluster_mode_embedded_runs_through_the_host_apps_lifespan(redis_server: RedisServer) -> None:
    gateway = create_app(redis_url=redis_server.url, heartbeat_interval=0.2, instance_ttl=1.0, api_token="t")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with gateway.router.lifespan_context(gateway):  # a Mount does not run it
            yield

    host = Starlette(routes=[Mount("/gateway", app=gateway)], lifespan=lifespan)
    with TestClient(host, headers={"Authorization": "Bearer t"}) as client:
        deadline = time.monotonic() + TIMEOUT
        while (health := client.get("/gateway/healthz").json())["redis"] != "ok":
            assert time.monotonic() < deadline, health
            time.sleep(0.02)
        with client.websocket_connect("/gateway/ws/py_client") as ws:
            own = ws.receive_json()["client_id"]
            listed = client.get("/gateway/api/clients").json()
            assert listed["clients"] == [{**client.get(f"/gateway/api/clients/{own}").json(),
                                          "instance": health["instance"]}]
    # Shutting down took the instance out of Redis at once.
    assert redis_server.command("ZCARD", "ws_micro:instances") == 0
    assert redis_server.command("HLEN", "ws_micro:directory") == 0


def dropped(server: Server) -> float:
    """``ws_micro_cluster_dropped_total``, every reason together."""
    return sum(sample.value for family in text_string_to_metric_families(server.get("/metrics").text)
               for sample in family.samples if sample.name == "ws_micro_cluster_dropped_total")


@pytest.mark.anyio
async def test_cluster_frames_for_an_instance_not_back_after_redis_restarts_are_refused_not_lost(
        redis_server: RedisServer) -> None:
    # Y is frozen while Redis restarts empty, so X is back first for as long as the test needs; a long
    # instance_ttl keeps X from giving up on Y meanwhile.
    with cluster(redis_server, 2, "--instance-ttl", "30") as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            await join(a, id_a, "r")
            assert await join(b, id_b, "r") == 2
            # X remembers Y from its heartbeats: what Redis forgets, X does not.
            await x.wait_until(lambda: x.get("/healthz").json()["instances"] == 2, "X to see Y")
            y.process.send_signal(signal.SIGSTOP)
            try:
                redis_server.stop()
                await x.wait_until(lambda: x.get("/healthz").json()["redis"] == "unavailable", "X to notice")
                redis_server.start()
                await x.wait_until(lambda: x.get("/healthz").json()["redis"] != "unavailable", "X to reconnect")
                before = dropped(x)
                # B is still connected: its frames are refused as undeliverable, never as unknown, never dropped
                # without a word.  The error echoes each frame's event, so each frame is matched to its answer.
                events = [f"{kind}{n}" for n in range(5) for kind in ("to", "room")]
                for event in events:
                    await a.send(text(event, id_a, to=id_b) if event.startswith("to") else
                                 text(event, id_a, room="r"))
                    assert without_message(await recv_json(a)) == error(id_a, "backend_unavailable", event)
                assert dropped(x) == before + len(events)
                # The API answers 503 as when Redis is away, and says nothing was delivered elsewhere.
                for response in (x.post(f"/api/clients/{id_b}", {"event": "x", "data": {"data": {}}}),
                                 x.post("/api/rooms/r", {"event": "x", "data": {"data": {}}}),
                                 x.post("/api/broadcast", {"event": "x", "data": {"data": {}}})):
                    assert response.status_code == 503
                    assert response.json()["error"]["code"] == "backend_unavailable"
                assert dropped(x) == before + len(events) + 3
                health = x.get("/healthz").json()
                assert (health["status"], health["redis"]) == ("degraded", "resyncing")
            finally:
                y.process.send_signal(signal.SIGCONT)
            await x.wait_until(lambda: x.get("/healthz").json()["status"] == "ok", "X to see Y back")
            # Nothing refused reached B; what is sent now does, both ways, by id and by room.
            for sender, own, receiver, routing in ((a, id_a, b, {"to": id_b}), (a, id_a, b, {"room": "r"}),
                                                   (b, id_b, a, {"to": id_a}), (b, id_b, a, {"room": "r"})):
                sent = text("after", own, None, **routing)
                await sender.send(sent)
                assert await recv_text(receiver) == sent
            assert x.metric("ws_micro_errors_total", code="unknown_client") == 0


@pytest.mark.anyio
async def test_cluster_a_stream_across_a_redis_restart_is_received_or_refused(redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--instance-ttl", "30") as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            await join(a, id_a, "r")
            await join(b, id_b, "r")
            await x.wait_until(lambda: x.get("/healthz").json()["instances"] == 2, "X to see Y")
            sent: list[str] = []
            received: list[str] = []
            refused: dict[str, str] = {}  # event -> error code
            streaming = True
            progress = anyio.Event()

            async def stream() -> None:  # about 100 frames a second, alternately by id and by room
                n = 0
                while streaming:
                    event = f"to{n}" if n % 2 == 0 else f"room{n}"
                    sent.append(event)
                    await a.send(text(event, id_a, to=id_b) if n % 2 == 0 else text(event, id_a, room="r"))
                    n += 1
                    await anyio.sleep(0.01)  # the pace of the stream, not a wait for anything

            async def read(ws: ClientConnection, note: Callable[[dict[str, Any]], None]) -> None:
                nonlocal progress
                async for message in ws:
                    note(json.loads(message))
                    progress.set()
                    progress = anyio.Event()

            async def until(predicate: Callable[[], bool]) -> None:
                with anyio.fail_after(TIMEOUT):
                    while not predicate():
                        await progress.wait()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(read, a, lambda answer: refused.update(
                    {answer["data"]["data"]["event"]: answer["data"]["data"]["code"]}))
                tasks.start_soon(read, b, lambda frame: received.append(frame["event"]))
                tasks.start_soon(stream)
                await until(lambda: len(received) >= 20)
                redis_server.stop()
                for server in (x, y):
                    await server.wait_until(lambda s=server: s.get("/healthz").json()["redis"] == "unavailable",
                                            "the instance to notice")
                # Each instance comes back on its own time: hold Y back while X streams to it for a while.
                y.process.send_signal(signal.SIGSTOP)
                try:
                    redis_server.start()
                    await x.wait_until(lambda: x.get("/healthz").json()["redis"] != "unavailable",
                                       "X to reconnect")
                    refused_before = len(refused)
                    await until(lambda: len(refused) >= refused_before + 20)
                finally:
                    y.process.send_signal(signal.SIGCONT)
                for server in (x, y):
                    await server.wait_until(lambda s=server: s.get("/healthz").json()["status"] == "ok",
                                            "the instance to be back")
                flowing_again = len(received) + 20
                await until(lambda: len(received) >= flowing_again)
                streaming = False
                # Every frame sent is received or refused; the last ones may still be on their way.
                await until(lambda: not set(sent) - set(received) - refused.keys())
                tasks.cancel_scope.cancel()
            assert refused, "the restart refused nothing: it did not happen while frames flowed"
            assert set(refused.values()) == {"backend_unavailable"}
            assert len(received) == len(set(received)), "a frame arrived twice"
            assert received == [event for event in sent if event in set(received)], "frames arrived out of order"
            assert dropped(x) == len(refused)
            assert dropped(y) == 0


# --------------------------------------------------------------------------
# Authentication, permissions, users and presence (docs/auth.md)
# --------------------------------------------------------------------------

JWT_SECRET = "test-secret-that-is-long-enough-for-hs256!"
BACKEND_SECRET = "backend-secret-for-signing-hook-requests"
GRANTED = "connection request granted"


def mint(claims: dict[str, Any] | None = None, key: Any = JWT_SECRET, algorithm: str = "HS256",
         lifetime: float = 60, **headers: Any) -> str:
    """A token as a backend mints one: ``sub`` alice, expiring in ``lifetime`` seconds, unless ``claims`` say
    (a claim set to None is left out)."""
    import jwt

    payload = {"sub": "alice", "exp": int(time.time() + lifetime), **(claims or {})}
    return jwt.encode({name: value for name, value in payload.items() if value is not None}, key,
                      algorithm=algorithm, headers=headers or None)


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[Any, str]:
    """A private RSA key, and its public key as PEM text."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def refusal(client: TestClient, url: str = "/ws/py_client", **headers: str) -> tuple[int, dict[str, Any]]:
    """The status and error body of a handshake the gateway must refuse."""
    with pytest.raises(WebSocketDenialResponse) as refused, client.websocket_connect(url, headers=headers):
        pass
    return refused.value.status_code, refused.value.json()["error"]


def greeting(client: TestClient, url: str = "/ws/py_client", **headers: str) -> dict[str, Any]:
    with client.websocket_connect(url, headers=headers) as ws:
        hello = ws.receive_json()
    assert hello["event"] == "connect"
    return dict(hello["data"]["data"])


def test_without_authentication_the_connect_frame_is_the_tutorials_byte_for_byte() -> None:
    with gateway() as client, client.websocket_connect("/ws/py_client") as ws:
        text = ws.receive_text()
    client_id = json.loads(text)["client_id"]
    assert text == f'{{"event":"connect","client_id":"{client_id}","data":{{"data":{{"message":"{GRANTED}"}}}}}}'


def test_a_valid_token_in_the_header_or_the_query_names_the_user_beside_the_tutorials_message() -> None:
    token = mint({"rooms": ["team:42"]})
    with gateway(jwt_secret=JWT_SECRET) as client:
        assert greeting(client, authorization=f"Bearer {token}") == {"message": GRANTED, "user": "alice",
                                                                     "rooms": ["team:42"]}
        assert greeting(client, f"/ws/py_client?token={token}")["user"] == "alice"


@pytest.mark.parametrize(("claims", "options", "message"), [
    ({"exp": int(time.time()) - 10}, {}, "the token has expired"),
    ({"nbf": int(time.time()) + 3600}, {}, "the token is not valid yet (nbf)"),
    ({"aud": "another-service"}, {}, "the token is not for this audience (None)"),
    ({"aud": "another-service"}, {"jwt_audience": "ws"}, "the token is not for this audience ('ws')"),
    ({"iss": "mallory"}, {"jwt_issuer": "auth.example"}, "the token is not from issuer 'auth.example'"),
    ({"sub": None}, {}, "the token has no 'sub' claim"),
    ({"exp": None}, {}, "the token has no 'exp' claim"),
    ({"rooms": "lobby"}, {}, "invalid token claims: Expected `array`, got `str` - at `$.rooms`"),
    ({"rooms": ["x" * 200]}, {}, "invalid token claims: room names have 1 to 128 characters"),
])
def test_tokens_that_are_not_valid_are_refused_with_401_saying_why(claims: dict[str, Any], options: dict[str, Any],
                                                                   message: str) -> None:
    token = mint(claims)
    with gateway(jwt_secret=JWT_SECRET, **options) as client:
        status, error = refusal(client, authorization=f"Bearer {token}")
        assert (status, error["code"]) == (401, "unauthorized")
        assert error["message"].startswith(message)
        assert client.get("/healthz").json()["connections"] == 0


def test_forged_tokens_are_refused_with_401(rsa_keys: tuple[Any, str]) -> None:
    import jwt

    private, _ = rsa_keys
    unsigned = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 60}, "", algorithm="none")
    with gateway(jwt_secret=JWT_SECRET) as client:
        for token, message in ((mint(key="another-secret-that-is-long-enough-too!"),
                                "the token's signature does not match"),
                               (unsigned, "tokens signed with 'none' are not accepted (only HS256)"),
                               (mint(key=private, algorithm="RS256"), "tokens signed with 'RS256' are not accepted"),
                               ("not.a.token", "invalid token:"),
                               ("", "a token is required")):
            status, error = refusal(client, f"/ws/py_client?token={token}")
            assert (status, error["message"][:len(message)]) == (401, message), token
        assert 'ws_micro_rejected_handshakes_total{reason="unauthorized"} 5' in client.get("/metrics").text
        assert client.get("/healthz").json()["connections"] == 0


def test_an_rs256_key_refuses_hs256_tokens_signed_with_its_own_text(rsa_keys: tuple[Any, str],
                                                                     tmp_path: Path) -> None:
    import hashlib
    import hmac as hmac_module

    private, public = rsa_keys
    # The classic confusion: HMAC-sign a token with the public key's PEM text (PyJWT itself refuses
    # to, so it is signed by hand here), hoping the server verifies HS256 with the key it has.
    header = msgspec.json.encode({"alg": "HS256", "typ": "JWT"})
    payload = msgspec.json.encode({"sub": "mallory", "exp": int(time.time()) + 60})

    def b64(data: bytes) -> str:
        import base64

        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(header)}.{b64(payload)}"
    forged = signing_input + "." + b64(hmac_module.new(public.encode(), signing_input.encode(),
                                                        hashlib.sha256).digest())
    key_file = tmp_path / "jwt.pub.pem"
    key_file.write_text(public)
    for key in (public, str(key_file)):  # PEM text, or a file
        with gateway(jwt_public_key=key, jwt_audience="ws") as client:
            assert refusal(client, f"/ws/py_client?token={forged}") == (
                401, {"code": "unauthorized", "message": "tokens signed with 'HS256' are not accepted (only RS256)"})
            assert greeting(client, authorization="Bearer " + mint({"aud": "ws"}, private, "RS256"))["user"] == "alice"


@contextlib.contextmanager
def signed_in(client: TestClient, claims: dict[str, Any] | None = None) -> Iterator[tuple[Any, str]]:
    with client.websocket_connect("/ws/py_client", headers={"authorization": f"Bearer {mint(claims)}"}) as ws:
        hello = ws.receive_json()
        yield ws, hello["client_id"]


def test_joins_and_room_frames_outside_the_connections_patterns_are_forbidden_and_change_nothing() -> None:
    claims = {"rooms": ["team:42"], "join": ["chat:*"], "publish": ["chat:general", "team:*"]}
    with gateway(jwt_secret=JWT_SECRET, default_join=("lobby",)) as client, \
            signed_in(client, claims) as (ws, me), signed_in(client, {"sub": "bob", **claims}) as (other, _):
        for room in ("chat:general", "chat:random", "lobby"):
            ws.send_json(frame("join", me, {"room": room}))
            assert ws.receive_json()["event"] == "joined"
        ws.send_json(frame("join", me, {"room": "admin"}))
        assert ws.receive_json()["data"]["data"] == {
            "code": "forbidden", "message": "this connection may not join room 'admin'", "event": "join",
            "room": "admin"}
        # Joined, but not granted to speak there: refused before the membership check.
        ws.send_json(frame("chat", me, {"text": "hi"}, room="chat:random"))
        assert ws.receive_json()["data"]["data"] == {
            "code": "forbidden", "message": "this connection may not send to room 'chat:random'", "event": "chat",
            "room": "chat:random"}
        # Relays by id are off with authentication on.
        ws.send_json(frame("chat", me, {"text": "psst"}, to=me))
        assert ws.receive_json()["data"]["data"]["code"] == "forbidden"
        # What is granted works: the auto-joined room, and a granted one.
        other.send_json(frame("join", _, {"room": "chat:general"}))
        assert other.receive_json()["event"] == "joined"
        for room in ("team:42", "chat:general"):
            ws.send_json(frame("chat", me, {"text": room}, room=room))
            assert other.receive_json()["data"]["data"] == {"text": room}
        rooms = client.get("/api/rooms").json()
        assert rooms == {"count": 4, "rooms": [{"room": "chat:general", "members": 2},
                                               {"room": "chat:random", "members": 1},
                                               {"room": "lobby", "members": 1}, {"room": "team:42", "members": 2}]}


def test_a_granted_relay_and_the_default_settings_open_what_tokens_do_not_grant() -> None:
    with gateway(jwt_secret=JWT_SECRET, default_relay=True, default_publish=("*",), default_join=("*",)) as client, \
            signed_in(client) as (a, id_a), signed_in(client, {"sub": "bob", "relay": False}) as (b, id_b):
        a.send_json(frame("chat", id_a, {"text": "hi"}, to=id_b))
        assert b.receive_json()["data"]["data"] == {"text": "hi"}
        b.send_json(frame("chat", id_b, {"text": "no"}, to=id_a))
        assert b.receive_json()["data"]["data"]["code"] == "forbidden"
        for ws, me in ((a, id_a), (b, id_b)):
            ws.send_json(frame("join", me, {"room": "anywhere"}))
            assert ws.receive_json()["event"] == "joined"
        a.send_json(frame("chat", id_a, {"text": "room"}, room="anywhere"))
        assert b.receive_json()["data"]["data"] == {"text": "room"}


def test_users_hold_several_connections_the_api_lists_pushes_to_and_logs_them_out() -> None:
    with gateway(jwt_secret=JWT_SECRET) as client, signed_in(client, {"meta": {"plan": "pro"}}) as (tab1, id1), \
            signed_in(client) as (tab2, id2), signed_in(client, {"sub": "bob"}) as (bob, id_bob):
        listed = client.get("/api/users/alice").json()
        assert (listed["user"], listed["count"]) == ("alice", 2)
        assert {entry["client_id"]: entry.get("meta") for entry in listed["clients"]} == {id1: {"plan": "pro"},
                                                                                         id2: None}
        assert {entry["client_id"]: entry["user"] for entry in client.get("/api/clients").json()["clients"]} == {
            id1: "alice", id2: "alice", id_bob: "bob"}
        reply = client.post("/api/users/alice", json={"event": "notice", "data": {"data": {"n": 1}}})
        assert (reply.status_code, reply.json()) == (202, {"delivered": 2})
        for tab, me in ((tab1, id1), (tab2, id2)):
            assert tab.receive_json() == frame("notice", me, {"n": 1})
        bob.send_json(frame("ping", id_bob))  # bob got no notice: his next frame is the pong
        assert bob.receive_json()["event"] == "pong"
        reply = client.delete("/api/users/alice")
        assert (reply.status_code, reply.json()) == (202, {"disconnected": 2})
        for tab in (tab1, tab2):
            with pytest.raises(WebSocketDisconnect) as closed:
                tab.receive_json()
            assert (closed.value.code, closed.value.reason) == (1000, "disconnected by the server")
        assert client.get("/api/users/alice").json() == {"user": "alice", "count": 0, "clients": []}
        assert client.post("/api/users/alice", json={"event": "x", "data": {"data": {}}}).json() == {"delivered": 0}


def test_rooms_and_their_members_are_listed_with_users() -> None:
    with gateway(jwt_secret=JWT_SECRET, default_join=("*",)) as client, \
            signed_in(client, {"rooms": ["lobby"]}) as (_, id_a), signed_in(client, {"sub": "bob"}) as (b, id_b):
        b.send_json(frame("join", id_b, {"room": "lobby"}))
        assert b.receive_json()["event"] == "joined"
        members = client.get("/api/rooms/lobby").json()
        assert (members["room"], members["count"]) == ("lobby", 2)
        assert sorted(members["members"], key=lambda m: m["user"]) == [{"client_id": id_a, "user": "alice"},
                                                                       {"client_id": id_b, "user": "bob"}]
        assert client.get("/api/rooms").json() == {"count": 1, "rooms": [{"room": "lobby", "members": 2}]}
        assert client.get("/api/rooms/empty").json() == {"room": "empty", "count": 0, "members": []}


def test_presence_events_tell_members_of_joins_leaves_and_disconnects() -> None:
    def presence(ws: Any) -> dict[str, Any]:
        received = ws.receive_json()
        assert received["event"] == "presence", received
        return dict(received["data"]["data"])

    with gateway(jwt_secret=JWT_SECRET, default_join=("*",), presence_events=True) as client, \
            signed_in(client, {"rooms": ["lobby"]}) as (a, id_a):
        assert presence(a) == {"room": "lobby", "action": "joined", "client_id": id_a, "user": "alice"}
        with signed_in(client, {"sub": "bob"}) as (b, id_b):
            b.send_json(frame("join", id_b, {"room": "lobby"}))
            assert b.receive_json()["event"] == "joined"  # its reply first, then it hears of itself
            assert presence(b) == presence(a) == {"room": "lobby", "action": "joined", "client_id": id_b,
                                                  "user": "bob"}
            b.send_json(frame("leave", id_b, {"room": "lobby"}))
            assert b.receive_json()["event"] == "left"
            assert presence(a) == {"room": "lobby", "action": "left", "client_id": id_b, "user": "bob"}
            b.send_json(frame("join", id_b, {"room": "lobby"}))
            assert presence(a)["action"] == "joined"
        assert presence(a) == {"room": "lobby", "action": "left", "client_id": id_b, "user": "bob"}


def test_without_presence_events_members_hear_nothing_of_each_other() -> None:
    with gateway(jwt_secret=JWT_SECRET, default_join=("*",)) as client, signed_in(client) as (a, id_a), \
            signed_in(client, {"sub": "bob"}) as (b, id_b):
        for ws, me in ((a, id_a), (b, id_b)):
            ws.send_json(frame("join", me, {"room": "lobby"}))
            assert ws.receive_json()["event"] == "joined"
        a.send_json(frame("ping", id_a))
        assert a.receive_json()["event"] == "pong"  # no presence frame came before it


def test_the_endpoint_answers_a_plain_get_with_what_a_handshake_would_get() -> None:
    with gateway(jwt_secret=JWT_SECRET, allowed_origins=("https://app.example",)) as client:
        refused = client.get("/ws/py_client?token=nonsense", headers={"origin": "https://app.example"})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.headers["access-control-allow-origin"] == "https://app.example"
        assert refused.headers["access-control-allow-credentials"] == "true"
        accepted = client.get(f"/ws/py_client?token={mint()}")
        assert (accepted.status_code, accepted.json()["error"]["code"]) == (426, "upgrade_required")
        assert "access-control-allow-origin" not in accepted.headers
        other = client.get("/ws/py_client", headers={"origin": "https://evil.example"})
        assert (other.status_code, other.json()["error"]["code"]) == (403, "origin")
        assert "access-control-allow-origin" not in other.headers
        assert client.get("/healthz").json()["connections"] == 0


def verify_signature_from_the_docs() -> Callable[[bytes, str, bytes], bool]:
    """The backend's signature check, exactly as docs/auth.md shows it."""
    page = (ROOT / "docs" / "auth.md").read_text()
    code = re.search(r"```python\n(import hashlib.*?)```", page, re.DOTALL)
    assert code is not None, "docs/auth.md lost its verify_signature example"
    namespace: dict[str, Any] = {}
    exec(code[1], namespace)
    return namespace["verify_signature"]  # type: ignore[no-any-return]


class BackendServer:
    """A real backend (Starlette on uvicorn, in a thread, on a free port) that checks the signature of
    each of the gateway's requests with the docs' function; a bad one gets 400."""

    def __init__(self, path: str, answer: Callable[[dict[str, Any]], Awaitable[Any]]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{path}"
        verify = verify_signature_from_the_docs()

        async def endpoint(request: Request) -> Any:
            body = await request.body()
            if not verify(BACKEND_SECRET.encode(), request.headers.get("x-ws-micro-signature", ""), body):
                return JSONResponse({"error": "bad signature"}, 400)
            return await answer(json.loads(body))

        import uvicorn

        config = uvicorn.Config(Starlette(routes=[Route(path, endpoint, methods=["POST"])]), host="127.0.0.1",
                                port=self.port, log_level="warning", lifespan="off", timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)

    def __enter__(self) -> Self:
        self.thread = threading.Thread(target=self.server.run)
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the backend did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)


class HookBackend(BackendServer):
    """The connect hook: it keeps each request, and answers as the handshake's ``mode`` query parameter
    asks: grant, 401, 403, slowly, 500, garbage or a grant out of bounds."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        super().__init__("/hook", self.answer)

    async def answer(self, asked: dict[str, Any]) -> Any:
        self.requests.append(asked)
        mode = asked["query"].get("mode", "grant")
        if mode == "slow":  # longer than the gateway's connect_hook_timeout
            await anyio.sleep(1)
        if mode in ("401", "403", "500"):
            return JSONResponse({"error": mode}, int(mode))
        if mode == "garbage":
            return PlainTextResponse("<html>oops</html>")
        if mode == "unbounded":
            return JSONResponse({"user": "alice", "meta": {"blob": "x" * 5000}})
        if mode == "empty":
            return Response(status_code=204)
        user = asked["headers"].get("cookie", "session=nobody").partition("=")[2]
        return JSONResponse({"user": user, "rooms": ["team:42"], "publish": ["team:*"], "meta": {"plan": "pro"}})


def hook_options(url: str) -> tuple[str, ...]:
    return ("--connect-hook-url", url, "--backend-secret", BACKEND_SECRET, "--connect-hook-timeout", "0.5",
            "--connect-hook-headers", "x-tenant")


@pytest.mark.anyio
async def test_e2e_the_connect_hook_grants_identities_refuses_and_fails_closed(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    with HookBackend() as backend, run_server(*hook_options(backend.url), log=log) as server:
        headers = {"Cookie": "session=carol", "X-Tenant": "acme", "User-Agent": "tests/1"}
        async with ws_client(server.ws + "?mode=grant&room=x", additional_headers=headers,
                             origin=Origin(server.http)) as (ws, me):
            # What the backend was asked, and what the client and the API see of its answer.
            asked = backend.requests[-1]
            assert asked["client_id"] == me
            assert asked["path"] == "/ws/py_client" and asked["websocket"] is True
            assert asked["query"] == {"mode": "grant", "room": "x"}
            assert asked["headers"] == {"cookie": "session=carol", "x-tenant": "acme", "user-agent": "tests/1",
                                        "origin": server.http}
            assert asked["remote"].startswith("127.0.0.1:")
            entry = server.get(f"/api/clients/{me}").json()
            assert (entry["user"], entry["meta"], entry["rooms"]) == ("carol", {"plan": "pro"}, ["team:42"])
            await ws.send(text("chat", me, {"text": "granted"}, room="team:42"))
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"  # the room frame was allowed: no error came first
        async with ws_client(server.ws + "?mode=empty") as (ws, me):
            assert server.get(f"/api/clients/{me}").json()["user"] is None

        expected = {"401": (401, "unauthorized"), "403": (403, "forbidden"), "slow": (503, "auth_unavailable"),
                    "500": (503, "auth_unavailable"), "garbage": (503, "auth_unavailable"),
                    "unbounded": (503, "auth_unavailable")}
        for mode, (status, code) in expected.items():
            with pytest.raises(InvalidStatus) as refused:
                await connect(server.ws + f"?mode={mode}", open_timeout=TIMEOUT)
            assert refused.value.response.status_code == status, mode
            assert json.loads(refused.value.response.body or b"")["error"]["code"] == code, mode
        for outcome, count in (("accepted", 2), ("refused", 2), ("timeout", 1), ("bad_status", 1),
                               ("bad_answer", 2), ("unreachable", 0)):
            assert server.metric("ws_micro_connect_hook_total", outcome=outcome) == count, outcome
        assert server.metric("ws_micro_rejected_handshakes_total", reason="auth_unavailable") == 4
        # A refused handshake leaves nothing behind.
        assert server.get("/healthz").json()["connections"] == 0
        assert server.get("/api/rooms").json() == {"count": 0, "rooms": []}
    lines = log.read_text().splitlines()
    warnings = [line for line in lines if "handshakes are refused with 503" in line]
    assert len(warnings) == 3, warnings  # one per kind of failure: timeout, a status, an answer
    assert any("the connect hook did not answer within 0.5 seconds" in line for line in warnings)
    assert not any("Traceback" in line for line in lines)


@pytest.mark.anyio
async def test_e2e_a_connect_hook_that_is_down_refuses_everyone_with_503() -> None:
    with run_server("--log-level", "warning", *hook_options(f"http://127.0.0.1:{free_port()}/hook")) as server:
        for _ in range(3):
            with pytest.raises(InvalidStatus) as refused:
                await connect(server.ws, open_timeout=TIMEOUT)
            assert refused.value.response.status_code == 503
        assert server.metric("ws_micro_connect_hook_total", outcome="unreachable") == 3
        assert server.get("/healthz").json()["connections"] == 0


def test_refused_and_failed_handshakes_leave_no_task_or_entry_behind() -> None:
    with HookBackend() as backend, \
            gateway(connect_hook_url=backend.url, backend_secret=BACKEND_SECRET, connect_hook_timeout=0.2,
                    jwt_secret=JWT_SECRET) as client:
        assert client.portal is not None

        def tasks() -> int:
            return len(asyncio.all_tasks())

        with client.websocket_connect("/ws/py_client?mode=grant") as ws:
            ws.receive_json()
        before = client.portal.call(tasks)
        for _ in range(5):
            for url in ("?mode=401", "?mode=slow", "?mode=garbage", f"?token={mint(lifetime=-5)}"):
                refusal(client, "/ws/py_client" + url)
        assert client.portal.call(tasks) == before
        assert client.get("/healthz").json()["connections"] == 0
        assert client.get("/api/clients").json() == {"count": 0, "clients": []}
        assert client.get("/api/rooms").json() == {"count": 0, "rooms": []}


@pytest.mark.anyio
async def test_e2e_tokens_in_the_header_or_query_and_never_in_any_log(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    token, expired = mint(), mint(lifetime=-10)
    with run_server("--log-level", "info", "--jwt-secret", JWT_SECRET, log=log) as server:
        async with ws_client(server.ws, additional_headers={"Authorization": f"Bearer {token}"}) as (_, me):
            assert server.get(f"/api/clients/{me}").json()["user"] == "alice"
        async with ws_client(f"{server.ws}?x=1&token={token}&y=2") as (ws, me):
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{server.ws}?token={expired}", open_timeout=TIMEOUT)
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body or b"")["error"] == {
            "code": "unauthorized", "message": "the token has expired"}
        assert server.get(f"/ws/py_client?token={token}").status_code == 426
        assert server.get(f"/?token={token}").status_code == 200
    logged = log.read_text()
    assert '"WebSocket /ws/py_client?x=1&token=[redacted]&y=2" [accepted]' in logged
    assert '"WebSocket /ws/py_client?token=[redacted]" 401' in logged
    assert '"GET /ws/py_client?token=[redacted] HTTP/1.1" 426' in logged
    assert '"GET /?token=[redacted] HTTP/1.1" 200' in logged
    for secret in (token, expired, token.split(".")[1], JWT_SECRET):
        assert secret not in logged


@pytest.mark.anyio
async def test_python_client_sends_its_token_and_raises_on_a_refusal() -> None:
    with run_server("--log-level", "warning", "--jwt-secret", JWT_SECRET) as server:
        async with Client(server.ws, token=mint({"sub": "dora"})) as client:
            assert client.user == "dora"
            assert server.get(f"/api/clients/{client.client_id}").json()["user"] == "dora"
        with pytest.raises(ws_micro.HandshakeRefused) as refused:
            await Client(server.ws, token=mint(key="not-the-secret-but-long-enough-for-hs256")).connect()
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")
        assert refused.value.message == "the token's signature does not match"
        with pytest.raises(ws_micro.HandshakeRefused) as refused:
            await Client(server.ws).connect()
        assert refused.value.status == 401

        def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "ws_micro.py", "client", server.ws, *args], cwd=ROOT, input="",
                                  capture_output=True, text=True, timeout=TIMEOUT,
                                  env={**os.environ, **(env or {})})

        for result in (cli("--token", mint({"sub": "erin"})), cli(env={"WS_MICRO_TOKEN": mint({"sub": "erin"})})):
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout.splitlines()[0])["data"]["data"]["user"] == "erin"
        result = cli("--token", "nonsense")
        assert result.returncode == 1
        assert result.stderr.startswith("ws-micro client: the server refused the connection: HTTP 401 unauthorized: "
                                        "invalid token:")
        assert "Traceback" not in result.stderr


@pytest.mark.anyio
async def test_cluster_users_and_presence_span_instances(redis_server: RedisServer) -> None:
    auth = ("--jwt-secret", JWT_SECRET, "--default-join", "*", "--presence-events")

    def signed(server: Server, sub: str) -> Any:
        return ws_client(server.ws, additional_headers={"Authorization": f"Bearer {mint({'sub': sub})}"})

    async def presence(ws: ClientConnection) -> dict[str, Any]:
        received = await recv_json(ws)
        assert received["event"] == "presence", received
        return dict(received["data"]["data"])

    # Presence from another instance is sent without waiting: alice's join, published by X before bob
    # joined on Y, may reach Y after bob's join began, and then bob hears of it too (docs/auth.md).
    stale: dict[str, Any] = {}

    async def hears(ws: ClientConnection, expected: dict[str, Any]) -> None:
        while (received := await recv_json(ws))["data"]["data"] == stale:
            pass
        assert received["event"] == "presence" and received["data"]["data"] == expected, received

    async def joins(ws: ClientConnection, me: str, room: str) -> int:
        await ws.send(text("join", me, {"room": room}))
        while (received := await recv_json(ws))["event"] != "joined":
            assert received["data"]["data"] == stale, received
        return int(received["data"]["data"]["members"])

    with cluster(redis_server, 2, *auth) as (x, y):
        async with signed(x, "alice") as (tab1, id1), signed(y, "alice") as (tab2, id2), \
                signed(y, "bob") as (bob, id_bob):
            for server in (x, y):
                listed = server.get("/api/users/alice").json()
                assert {entry["client_id"]: entry["instance"] for entry in listed["clients"]} == {
                    id1: instance_of(x), id2: instance_of(y)}
            # Presence: counts and members over both instances, and events from one to the other.
            assert await joins(tab1, id1, "lobby") == 1
            stale.update(room="lobby", action="joined", client_id=id1, user="alice")
            assert await presence(tab1) == stale
            assert await joins(bob, id_bob, "lobby") == 2
            joined = {"room": "lobby", "action": "joined", "client_id": id_bob, "user": "bob"}
            await hears(bob, joined)
            assert await presence(tab1) == joined  # from the other instance
            for server in (x, y):
                assert server.get("/api/rooms").json() == {"count": 1, "rooms": [{"room": "lobby", "members": 2}]}
                members = server.get("/api/rooms/lobby").json()["members"]
                assert sorted(members, key=lambda m: m["user"]) == [{"client_id": id1, "user": "alice"},
                                                                    {"client_id": id_bob, "user": "bob"}]
            # A push to a user reaches each of their tabs, wherever it is, and no one else.
            reply = y.post("/api/users/alice", {"event": "notice", "data": {"data": {"n": 1}}})
            assert (reply.status_code, reply.json()) == (202, {"delivered": 2})
            for tab, me in ((tab1, id1), (tab2, id2)):
                assert await recv_json(tab) == frame("notice", me, {"n": 1})
            # A logout from either instance closes every tab; bob's instance tells the room.
            reply = httpx.delete(x.http + "/api/users/alice", timeout=TIMEOUT)
            assert (reply.status_code, reply.json()) == (202, {"disconnected": 2})
            for tab in (tab1, tab2):
                assert await closed_with(tab) == (1000, "disconnected by the server")
            await hears(bob, {"room": "lobby", "action": "left", "client_id": id1, "user": "alice"})
            for server in (x, y):
                await server.wait_until(lambda s=server: s.get("/api/users/alice").json()["count"] == 0,
                                        "alice's connections to leave the cluster")
                assert server.get("/api/rooms/lobby").json()["members"] == [{"client_id": id_bob, "user": "bob"}]


@pytest.mark.anyio
async def test_cluster_a_dead_instances_users_and_room_members_are_reaped(redis_server: RedisServer) -> None:
    auth = ("--jwt-secret", JWT_SECRET, "--default-join", "*")
    with cluster(redis_server, 2, *auth) as (x, y):
        async with ws_client(x.ws, additional_headers={"Authorization": f"Bearer {mint()}"}) as (a, id_a), \
                ws_client(y.ws, additional_headers={"Authorization": f"Bearer {mint({'sub': 'bob'})}"}) as (b, id_b):
            assert await join(a, id_a, "lobby") == 1
            assert await join(b, id_b, "lobby") == 2
            assert x.get("/api/users/bob").json()["count"] == 1
            y.process.kill()
            await x.wait_until(lambda: x.get("/api/users/bob").json()["count"] == 0, "bob's instance to be reaped")
            assert x.get("/api/rooms").json() == {"count": 1, "rooms": [{"room": "lobby", "members": 1}]}
            assert x.get("/api/rooms/lobby").json()["members"] == [{"client_id": id_a, "user": "alice"}]
            await x.wait_until(lambda: redis_server.command("EXISTS", "ws_micro:user-members:bob", "ws_micro:user:bob",
                                                            "ws_micro:room-members:lobby") == 1,
                               "the dead instance's keys to be reaped (alice's membership stays)")
            assert redis_server.command("HKEYS", "ws_micro:room-members:lobby") == [id_a]


@pytest.mark.anyio
async def test_presence_of_many_slow_members_cut_off_at_once_is_announced_without_recursion() -> None:
    # Each member cut off is announced to the others, which cuts the next one off, and so on: a
    # recursion as deep as the room is large, had the announcements not been queued.
    registry, settings = Registry(), Settings(max_queue_messages=1)
    registry.presence_events = True
    members, outputs = [], []
    for _ in range(500):
        output = StallingOutput()
        outputs.append(output)
        connection = ws_micro._Connection(output, remote=None, settings=settings, metrics=registry.metrics,
                                          on_close=registry.remove)
        registry.add(connection)
        await registry.join(connection, "big")
        members.append(connection)
        output.stall()
    assert await registry.publish("big", "news") == 500  # in flight
    assert await registry.publish("big", "news") == 500  # queued
    assert await registry.publish("big", "news") == 0  # over the queue: every member is cut off
    assert len(registry) == 0 and registry.rooms == {}
    assert {member.close_reason for member in members} == {"slow_consumer"}
    for member, output in zip(members, outputs, strict=True):
        output.drain()
        await member.closed()


@pytest.mark.anyio
async def test_e2e_a_flood_of_handshakes_the_hook_cannot_answer_is_bounded(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    with HookBackend() as backend, run_server(*hook_options(backend.url), "--max-connections", "40",
                                              log=log) as server:
        async with ws_client(server.ws) as _:  # warm: the server's memory with one connection
            pass
        before = rss_mib(server.process)
        statuses: list[int] = []

        async def attempt() -> None:
            with pytest.raises(InvalidStatus) as refused:
                await connect(server.ws + "?mode=slow", open_timeout=TIMEOUT)
            statuses.append(refused.value.response.status_code)

        for _ in range(3):  # three waves of 200 handshakes at once, each waiting for a hook that hangs
            async with anyio.create_task_group() as tasks:
                for _ in range(200):
                    tasks.start_soon(attempt)
        assert set(statuses) == {503} and len(statuses) == 600
        full = server.metric("ws_micro_rejected_handshakes_total", reason="full")
        waited = server.metric("ws_micro_connect_hook_total", outcome="timeout")
        assert full + waited == 600 and 0 < waited <= 3 * 40  # at most max_connections wait on the hook at once
        assert server.get("/healthz").json()["connections"] == 0
        assert rss_mib(server.process) - before < 15
    lines = log.read_text().splitlines()
    # One line per 10 s, not one per handshake: the hook's failures, and uvicorn's (see _CLIENT_CAUSED).
    assert len([line for line in lines if line.startswith("WARNING")]) <= 2
    assert len([line for line in lines if line.startswith("ERROR")]) <= 2
    assert not any("Traceback" in line for line in lines)


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(SERVERS))
async def test_e2e_tokens_and_the_connect_hook_work_under_each_asgi_server(name: str) -> None:
    # daphne cannot send an HTTP status of the app's choosing: it refuses every handshake with 403.
    # It runs no lifespan either: the hook's pool is made on first use.
    refused = 403 if name == "daphne" else 401
    with HookBackend() as backend, run_server(asgi_server=name, env={
            "WS_MICRO_JWT_SECRET": JWT_SECRET, "WS_MICRO_CONNECT_HOOK_URL": backend.url,
            "WS_MICRO_BACKEND_SECRET": BACKEND_SECRET, "WS_MICRO_CONNECT_HOOK_TIMEOUT": "2"}) as server:
        for url, headers, user in ((server.ws, {"Authorization": f"Bearer {mint()}"}, "alice"),
                                   (server.ws + "?mode=grant", {"Cookie": "session=zed"}, "zed")):
            async with ws_client(url, additional_headers=headers) as (ws, me):
                await ws.send(text("ping", me))
                assert (await recv_json(ws))["event"] == "pong"
                assert server.get(f"/api/clients/{me}").json()["user"] == user
        for url in (server.ws + "?token=forged", server.ws + "?mode=401"):
            with pytest.raises(InvalidStatus) as refusal:
                await connect(url, open_timeout=TIMEOUT)
            assert refusal.value.response.status_code == refused
        assert server.get("/healthz").json()["connections"] == 0


def test_an_es256_key_takes_es256_tokens_and_other_key_types_are_refused_at_start() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    def pem(private: Any) -> str:
        return str(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo).decode())

    private = ec.generate_private_key(ec.SECP256R1())
    with gateway(jwt_public_key=pem(private), jwt_secret=JWT_SECRET) as client:
        assert greeting(client, authorization="Bearer " + mint({"sub": "eve"}, private, "ES256"))["user"] == "eve"
        assert greeting(client, authorization="Bearer " + mint())["user"] == "alice"  # and HS256 with the secret
    with pytest.raises(ValueError, match="jwt_public_key must be an RSA or P-256 key, but got"):
        create_app(jwt_public_key=pem(ed25519.Ed25519PrivateKey.generate()))


# --------------------------------------------------------------------------
# Forwarding client events, connects and disconnects to the backend (docs/backend.md)
# --------------------------------------------------------------------------


class EventBackend(BackendServer):
    """Takes forwarded events and notices at ``/events``, keeping each body in arrival order.

    An event is answered as its ``data.mode`` says: ``reply`` (two frames, numbered), ``none`` (204),
    ``500``, ``garbage``, ``slow`` (after 1 s). The first ``failing`` notices get 500.
    """

    def __init__(self, failing: int = 0, notice_delay: float = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.failing = failing
        self.notice_delay = notice_delay  # seconds each notice takes to be answered (under forward_timeout)
        self.notices_at_once = self.most_notices_at_once = 0
        super().__init__("/events", self.answer)

    async def answer(self, body: dict[str, Any]) -> Any:
        if body["type"] != "event" and self.failing > 0:
            self.failing -= 1
            return JSONResponse({"error": "not now"}, 500)
        if body["type"] != "event" and self.notice_delay:
            self.notices_at_once += 1
            self.most_notices_at_once = max(self.most_notices_at_once, self.notices_at_once)
            await anyio.sleep(self.notice_delay)
            self.notices_at_once -= 1
        self.received.append(body)
        mode = body.get("data", {}).get("mode", "reply")
        if body["type"] != "event" or mode == "none":
            return Response(status_code=204)
        if mode == "slow":
            await anyio.sleep(1)
        if mode == "500":
            return JSONResponse({"error": "boom"}, 500)
        if mode == "garbage":
            return PlainTextResponse("<html>oops</html>")
        n = body["data"].get("n", 0)
        return JSONResponse({"events": [{"event": "ack", "data": {"n": n, "part": 1}},
                                        {"event": "ack", "data": {"n": n, "part": 2}}]})

    def notices(self, client_id: str) -> list[tuple[str, str | None]]:
        return [(body["type"], body.get("reason")) for body in self.received
                if body["client_id"] == client_id and body["type"] != "event"]


@contextlib.contextmanager
def printing(lines: list[str], *command: str, env: dict[str, str]) -> Iterator[None]:
    """Run ``command`` while the block runs; then kill it, and put what it printed in ``lines``."""
    process = subprocess.Popen(command, text=True, stdout=subprocess.PIPE, env={**os.environ, **env})
    try:
        yield
    finally:
        process.kill()
        lines += process.communicate()[0].splitlines()


def forward_options(url: str, *more: str) -> tuple[str, ...]:
    return ("--forward-url", url, "--backend-secret", BACKEND_SECRET, "--forward-timeout", "0.5", *more)


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Wait, polling, for state another process (the backend's thread) changes; fail after TIMEOUT."""
    with anyio.move_on_after(TIMEOUT):
        while not predicate():  # noqa: ASYNC110 - the state lives in another thread, which has no event for us
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.anyio
async def test_e2e_events_reach_the_backend_and_its_answers_reach_the_sender(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    with EventBackend() as backend, run_server(*forward_options(backend.url), log=log) as server:
        async with ws_client(server.ws) as (ws, me):
            await join(ws, me, "lobby")
            await ws.send(text("chat", me, {"text": "hi", "n": 1}))
            assert await recv_json(ws) == frame("ack", me, {"n": 1, "part": 1})
            assert await recv_json(ws) == frame("ack", me, {"n": 1, "part": 2})
            assert [body["type"] for body in backend.received] == ["connect", "event"]  # the connect first
            forwarded = backend.received[-1]
            assert forwarded == {"type": "event", "client_id": me, "user": None, "meta": None, "event": "chat",
                                 "data": {"text": "hi", "n": 1}, "rooms": ["lobby"]}
            # No answer to send back: nothing comes, and the next frame's reply is the next thing.
            await ws.send(text("typing", me, {"mode": "none"}))
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"
            # What the sender sees when the backend fails, and the connection stays open.
            for mode, code, message in (
                    ("500", "backend_error", "the backend answered HTTP 500"),
                    ("garbage", "backend_error", 'the backend\'s answer is not {"events": [...]}: JSON is malformed'),
                    ("slow", "backend_unavailable", "the backend did not answer within 0.5 seconds")):
                await ws.send(text("chat", me, {"mode": mode}))
                reply = (await recv_json(ws))["data"]["data"]
                assert (reply["code"], reply["event"]) == (code, "chat")
                assert reply["message"].startswith(message), reply
                assert reply.get("status") == (None if mode == "slow" else 500 if mode == "500" else 200)
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"
        for outcome, count in (("ok", 2), ("backend_error", 2), ("timeout", 1), ("unreachable", 0), ("busy", 0)):
            assert server.metric("ws_micro_forwarded_total", outcome=outcome) == count, outcome
        assert server.metric("ws_micro_forward_seconds_count") == 5
        assert server.metric("ws_micro_forward_seconds_bucket", le="+Inf") == 5
        assert server.metric("ws_micro_forward_seconds_bucket", le="0.25") == 4  # all but the slow one
    assert not any("Traceback" in line for line in log.read_text().splitlines())


@pytest.mark.anyio
async def test_e2e_only_the_listed_events_are_forwarded_and_handlers_and_builtins_come_first() -> None:
    with EventBackend() as backend, run_server(*forward_options(backend.url, "--forward-events", "chat,game:*"),
                                               "--log-level", "warning") as server:
        async with ws_client(server.ws) as (ws, me):
            for name in ("game:move", "chat"):
                await ws.send(text(name, me, {"mode": "none"}))
            await ws.send(text("other", me))
            assert (await recv_json(ws))["data"]["data"]["code"] == "unknown_event"
            await ws.send(text("echo", me, {"n": 1}))
            assert (await recv_json(ws))["event"] == "echo"
    assert [body["event"] for body in backend.received if body["type"] == "event"] == ["game:move", "chat"]


@pytest.mark.anyio
async def test_e2e_a_backend_that_is_down_gets_backend_unavailable_and_the_connection_stays() -> None:
    with run_server(*forward_options(f"http://127.0.0.1:{free_port()}/events"), "--log-level", "warning") as server:
        async with ws_client(server.ws) as (ws, me):
            await ws.send(text("chat", me))
            reply = (await recv_json(ws))["data"]["data"]
            assert (reply["code"], reply["event"]) == ("backend_unavailable", "chat")
            assert reply["message"].startswith("the backend cannot be reached")
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"
        assert server.metric("ws_micro_forwarded_total", outcome="unreachable") == 1


@pytest.mark.anyio
async def test_e2e_each_connections_events_reach_the_backend_in_order_under_load() -> None:
    clients, events = 20, 50
    with EventBackend() as backend, run_server(*forward_options(backend.url), "--log-level", "warning") as server:

        async def talk() -> None:
            async with ws_client(server.ws) as (ws, me):
                for n in range(events):  # all at once: the gateway reads the next when the backend answered
                    await ws.send(text("move", me, {"n": n}))
                replies = [(await recv_json(ws))["data"]["data"] for _ in range(2 * events)]
                assert replies == [{"n": n, "part": part} for n in range(events) for part in (1, 2)]

        async with anyio.create_task_group() as tasks:
            for _ in range(clients):
                tasks.start_soon(talk)
    by_client: dict[str, list[int]] = {}
    for body in backend.received:
        if body["type"] == "event":
            by_client.setdefault(body["client_id"], []).append(body["data"]["n"])
    assert len(by_client) == clients
    assert all(sequence == list(range(events)) for sequence in by_client.values())


@pytest.mark.anyio
async def test_e2e_a_client_flooding_a_slow_backend_is_paused_and_the_gateway_stays_small() -> None:
    # One event in flight per connection: its next frames wait, unread, in the kernel's buffers and
    # then the client's, which stops sending. The gateway holds one frame per connection at most.
    with EventBackend() as backend, run_server(*forward_options(backend.url, "--forward-timeout", "5"),
                                               "--log-level", "warning") as server:
        async with ws_client(server.ws):
            pass
        before = rss_mib(server.process)
        sock, me = raw_websocket(server)
        sock.setblocking(False)
        flood = client_frame(0x1, text("chat", me, {"mode": "slow", "pad": "x" * 8000}).encode())
        sent = 0
        with contextlib.suppress(BlockingIOError):
            for _ in range(20_000):  # 160 MB, were it all taken
                sent += sock.send(flood)
        assert sent < 20 * 1024 * 1024, "the gateway kept reading while its backend was slow"
        await eventually(lambda: len([b for b in backend.received if b["type"] == "event"]) >= 2,
                    "two slow events to reach the backend")
        assert server.metric("ws_micro_forwarded_total", outcome="busy") == 0
        assert rss_mib(server.process) - before < 20
        assert server.get("/healthz").json()["connections"] == 1
        sock.close()


@pytest.mark.anyio
async def test_e2e_past_forward_max_pending_events_are_refused_at_once() -> None:
    with EventBackend() as backend, run_server(*forward_options(backend.url, "--forward-max-pending", "3",
                                                                "--forward-timeout", "5"),
                                               "--log-level", "warning") as server:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(ws_client(server.ws)) for _ in range(8)]
            for ws, me in clients[:3]:
                await ws.send(text("chat", me, {"mode": "slow"}))
            await eventually(lambda: len([b for b in backend.received if b["type"] == "event"]) == 3,
                        "three slow events to wait at the backend")
            for ws, me in clients[3:]:
                await ws.send(text("chat", me))
                reply = (await recv_json(ws))["data"]["data"]
                assert (reply["code"], reply["message"]) == (
                    "backend_unavailable", "3 events are waiting for the backend; try again later")
            for ws, _ in clients[:3]:
                assert (await recv_json(ws))["event"] == "ack"
        assert server.metric("ws_micro_forwarded_total", outcome="busy") == 5


@pytest.mark.anyio
async def test_e2e_the_backend_hears_of_each_connect_and_disconnect_once_however_it_ends() -> None:
    limits = ("--rate-limit", "5", "--rate-burst", "2", "--max-message-size", "70000", "--max-queue-bytes", "65536",
              "--send-timeout", "1", "--jwt-secret", JWT_SECRET, "--log-level", "warning")
    with EventBackend(failing=2) as backend, run_server(*forward_options(backend.url), *limits) as server:
        ends: dict[str, str] = {}
        bearer = {"Authorization": f"Bearer {mint()}"}

        async with ws_client(server.ws, additional_headers=bearer) as (ws, me):  # a normal close
            ends[me] = "closed"
            await ws.send(text("chat", me, {"mode": "none"}))
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"
        async with ws_client(server.ws, additional_headers=bearer) as (ws, me):  # kicked by the API
            ends[me] = "kicked"
            assert httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT).status_code == 202
            await closed_with(ws)
        async with ws_client(server.ws, additional_headers=bearer) as (ws, me):  # over the rate limit
            ends[me] = "rate_limited"
            for _ in range(10):
                await ws.send(text("ping", me))
            assert (await closed_with(ws))[0] == 1008
        async with ws_client(server.ws, additional_headers=bearer) as (ws, me):  # a frame too big
            ends[me] = "message_too_big"
            await ws.send(text("chat", me, {"pad": "x" * 80_000}))
            assert (await closed_with(ws))[0] == 1009
        sock, me = raw_websocket(server, query=f"?token={mint()}")  # gone without a close frame
        ends[me] = "abnormal"
        await eventually(lambda: ("connect", None) in backend.notices(me), "the dropped client's connect notice")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        sock, me = raw_websocket(server, query=f"?token={mint()}")  # a reader that stops: cut off as slow
        ends[me] = "slow_consumer"
        for _ in range(500):
            if server.post(f"/api/clients/{me}", {"event": "bulk", "data": {"data": {"pad": "x" * 60_000}}},
                           headers=JSON).status_code == 404:
                break
        else:
            raise AssertionError("the reader that stopped was never cut off")
        sock.close()
        async with ws_client(server.ws, additional_headers=bearer) as (ws, me):  # logged out with its user
            ends[me] = "kicked#user"
            assert httpx.delete(f"{server.http}/api/users/alice", timeout=TIMEOUT).json() == {"disconnected": 1}
            await closed_with(ws)
        await eventually(lambda: all(len(backend.notices(client_id)) == 2 for client_id in ends), "the notices so far")
        assert server.metric("ws_micro_notices_total", outcome="retried") == 2  # the first, failed twice
        assert server.metric("ws_micro_notices_total", outcome="sent") == 2 * len(ends)
        async with ws_client(server.ws, additional_headers=bearer) as (ws, me):  # the server stops
            ends[me] = "shutdown"
            server.process.send_signal(signal.SIGTERM)
            assert (await closed_with(ws))[0] == 1012
        assert server.process.wait(TIMEOUT) == 0
    for client_id, end in ends.items():
        assert backend.notices(client_id) == [("connect", None), ("disconnect", end.partition("#")[0])], end
    events = [body for body in backend.received if body["type"] == "event"]
    first = next(iter(ends))
    # Its connect notice was retried (the backend failed it twice), so its event went ahead of it after
    # forward_timeout; its disconnect waited for it.
    assert [body["type"] for body in backend.received if body["client_id"] == first] == [
        "event", "connect", "disconnect"]

    assert events[0]["user"] == "alice"
    connect = next(body for body in backend.received if body["type"] == "connect")
    assert connect == {"type": "connect", "id": f"{connect['client_id']}:connect", "client_id": connect["client_id"],
                       "user": "alice", "meta": None, "rooms": [], "remote": connect["remote"]}


@pytest.mark.anyio
async def test_e2e_notices_can_go_elsewhere_or_nowhere_and_are_dropped_counted_when_never_taken() -> None:
    with EventBackend() as events, EventBackend() as lifecycle:
        with run_server(*forward_options(events.url, "--lifecycle-url", lifecycle.url), "--log-level", "warning") \
                as server:
            async with ws_client(server.ws) as (ws, me):
                await ws.send(text("chat", me, {"mode": "none"}))
                await ws.send(text("ping", me))
                await recv_json(ws)
            await eventually(lambda: len(lifecycle.notices(me)) == 2, "the notices at the lifecycle URL")
        assert [body["type"] for body in events.received] == ["event"]
        with run_server(*forward_options(events.url, "--lifecycle-url", ""), "--log-level", "warning") as server:
            async with ws_client(server.ws) as (ws, me):
                await ws.send(text("chat", me, {"mode": "none"}))
                await ws.send(text("ping", me))
                await recv_json(ws)
            assert server.metric("ws_micro_notices_total", outcome="sent") == 0
        assert events.notices(me) == []
        # Without forward_url, a lifecycle URL alone: notices, and events are not taken.
        with run_server("--lifecycle-url", lifecycle.url, "--backend-secret", BACKEND_SECRET, "--log-level",
                        "warning") as server:
            async with ws_client(server.ws) as (ws, me):
                await ws.send(text("chat", me))
                assert (await recv_json(ws))["data"]["data"]["code"] == "unknown_event"
            await eventually(lambda: len(lifecycle.notices(me)) == 2, "the notices without forwarding")
    down = f"http://127.0.0.1:{free_port()}/events"
    with run_server(*forward_options(down, "--lifecycle-retries", "1"), "--log-level", "warning") as server:
        async with ws_client(server.ws) as (ws, me):
            pass
        await server.wait_until(lambda: server.metric("ws_micro_notices_total", outcome="dropped") == 2,
                                "both notices to be given up on")
        assert server.metric("ws_micro_notices_total", outcome="retried") == 2


@pytest.mark.anyio
async def test_e2e_the_docs_backend_answers_chat_through_the_sidecar_api_and_logs_disconnects(
        tmp_path: Path) -> None:
    page = (ROOT / "docs" / "backend.md").read_text()
    code = re.search(r"## A complete backend.*?```python\n(.*?)```", page, re.DOTALL)
    assert code is not None, "docs/backend.md lost its complete backend"
    (tmp_path / "backend.py").write_text(code[1])
    port, gateway_port = free_port(), free_port()
    printed: list[str] = []
    with printing(printed, sys.executable, str(tmp_path / "backend.py"), env={
            "WS_MICRO_BACKEND_SECRET": BACKEND_SECRET, "PORT": str(port),
            "GATEWAY": f"http://localhost:{gateway_port}"}), \
            run_server(*forward_options(f"http://127.0.0.1:{port}/"), "--forward-timeout", "5",
                       "--log-level", "warning", port=gateway_port) as server:
        async with ws_client(server.ws) as (a, id_a), ws_client(server.ws) as (b, id_b):
            await join(b, id_b, "lobby")
            await a.send(text("chat", id_a, {"room": "lobby", "text": "hi"}))
            assert await recv_json(a) == frame("sent", id_a, {"room": "lobby"})
            assert await recv_json(b) == frame("chat", id_b, {"from": id_a, "text": "hi"})
    # The gateway has stopped, after sending the notices it had: both clients closed normally.
    assert sorted(printed) == sorted([f"disconnected: {id_a} closed", f"disconnected: {id_b} closed"])


@pytest.mark.anyio
async def test_cluster_each_instance_forwards_its_clients_and_reports_them_once(redis_server: RedisServer) -> None:
    with EventBackend() as backend, cluster(redis_server, 2, *forward_options(backend.url)) as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            for ws, me in ((a, id_a), (b, id_b)):
                await ws.send(text("chat", me, {"n": 7}))
                assert await recv_json(ws) == frame("ack", me, {"n": 7, "part": 1})
                assert await recv_json(ws) == frame("ack", me, {"n": 7, "part": 2})
            assert httpx.delete(f"{x.http}/api/clients/{id_b}", timeout=TIMEOUT).status_code == 202  # b is on y
            await closed_with(b)
        await eventually(lambda: len(backend.notices(id_a)) == 2 and len(backend.notices(id_b)) == 2, "both notices")
    assert backend.notices(id_a) == [("connect", None), ("disconnect", "closed")]
    assert backend.notices(id_b) == [("connect", None), ("disconnect", "kicked")]
    assert sorted(body["client_id"] for body in backend.received if body["type"] == "event") == sorted([id_a, id_b])


def test_a_remembered_token_is_refused_once_it_expires() -> None:
    token = mint(lifetime=1)
    expires = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["exp"]
    with gateway(jwt_secret=JWT_SECRET) as client:
        assert greeting(client, authorization=f"Bearer {token}")["user"] == "alice"
        assert greeting(client, authorization=f"Bearer {token}")["user"] == "alice"  # remembered
        while time.time() < expires:  # the token's own clock: nothing to wait on but time
            time.sleep(0.05)
        assert refusal(client, authorization=f"Bearer {token}") == (
            401, {"code": "unauthorized", "message": "the token has expired"})


@pytest.mark.anyio
async def test_e2e_notices_are_sent_several_at_once_after_the_senders_were_idle() -> None:
    with EventBackend(notice_delay=0.2) as backend, run_server(*forward_options(backend.url), "--log-level",
                                                               "warning") as server:
        def notified(client_ids: list[str], notices: int) -> bool:
            return all(len(backend.notices(client_id)) == notices for client_id in client_ids)

        for wave in range(2):
            backend.most_notices_at_once = 0
            async with contextlib.AsyncExitStack() as stack:
                client_ids = [(await stack.enter_async_context(ws_client(server.ws)))[1] for _ in range(8)]
                await eventually(functools.partial(notified, client_ids, 1), "eight connect notices")
            await eventually(functools.partial(notified, client_ids, 2), "their disconnect notices")
            # The second wave finds every sender made by the first one idle: they must all wake.
            assert backend.most_notices_at_once >= 4, wave


@pytest.mark.anyio
async def test_e2e_a_hook_answer_over_its_limit_is_refused_even_when_it_is_valid_json() -> None:
    async def padded(asked: dict[str, Any]) -> Any:
        return Response(b'{"user": "big"}' + b" " * 70_000, media_type="application/json")

    with BackendServer("/hook", padded) as backend, \
            run_server(*hook_options(backend.url), "--log-level", "warning") as server:
        with pytest.raises(InvalidStatus) as refused:
            await connect(server.ws, open_timeout=TIMEOUT)
        assert refused.value.response.status_code == 503
        assert server.metric("ws_micro_connect_hook_total", outcome="bad_answer") == 1


@pytest.mark.anyio
async def test_cluster_a_client_kicked_while_its_join_waits_for_redis_is_in_no_room_after(
        redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--presence-events") as (x, y):
        async with ws_client(x.ws) as (watcher, watcher_id):
            assert await join(watcher, watcher_id, "r2") == 1
            assert (await recv_json(watcher))["event"] == "presence"  # its own
            async with ws_client(x.ws) as (kicked, kicked_id):
                assert redis_server.process is not None
                redis_server.process.send_signal(signal.SIGSTOP)  # the join's write waits for Redis
                try:
                    await kicked.send(text("join", kicked_id, {"room": "r2"}))
                    assert httpx.delete(f"{x.http}/api/clients/{kicked_id}", timeout=TIMEOUT).status_code == 202
                    assert await closed_with(kicked) == (1000, "disconnected by the server")
                finally:
                    redis_server.process.send_signal(signal.SIGCONT)
            members = [{"client_id": watcher_id, "user": None}]
            for server in (x, y):
                await server.wait_until(lambda s=server: s.get("/api/rooms/r2").json()["members"] == members,
                                        "the kicked client to be in no room")
            await x.wait_until(lambda: redis_server.command("HKEYS", "ws_micro:room-members:r2") == [watcher_id],
                               "Redis to hold only the watcher in the room")
            assert kicked_id not in redis_server.command("HKEYS", f"ws_micro:instance:{instance_of(x)}:clients")
            # The watcher never heard that the kicked client joined.
            await watcher.send(text("ping", watcher_id))
            while (received := await recv_json(watcher))["event"] != "pong":
                assert received["data"]["data"].get("action") != "joined", received


# --------------------------------------------------------------------------
# Connection recovery (docs/recovery.md)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recovering() -> Iterator[Server]:
    with run_server("--log-level", "warning", "--recovery-window", "60") as running:
        yield running


def cut(ws: ClientConnection) -> None:
    """Drop the TCP connection as a network would: a reset, no close frame."""
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()


async def until_away(server: Server, client_id: str) -> None:
    await server.wait_until(lambda: "away_since" in server.get(f"/api/clients/{client_id}").json(),
                            f"{client_id} to be away")


def resume_url(server: Server, token: str, offset: int | None = None) -> str:
    query = f"?resume_token={token}" + ("" if offset is None else f"&resume_offset={offset}")
    return server.ws + query


async def greeted(ws: ClientConnection) -> dict[str, Any]:
    hello = await recv_json(ws)
    assert hello["event"] == "connect", hello
    return dict(hello)


async def new_session(url: str, **options: Any) -> tuple[ClientConnection, str, str]:
    """A connection, its client id and its resume token."""
    ws = await connect(url, **options)
    hello = await greeted(ws)
    return ws, hello["client_id"], hello["data"]["data"]["resume_token"]


async def drop(ws: ClientConnection, server: Server, client_id: str) -> None:
    """Cut the connection, and wait until the server sees its session waiting."""
    cut(ws)
    await until_away(server, client_id)


def push(server: Server, path: str, event: str, n: int) -> None:
    assert server.post(path, {"event": event, "data": {"data": {"n": n}}}).json() == {"delivered": 1}, path


async def nothing_more(ws: ClientConnection, client_id: str) -> None:
    """The frames received so far were all there was: a ping's pong comes next."""
    await ws.send(json.dumps(frame("ping", client_id, {"last": True})))
    assert await recv_json(ws) == frame("pong", client_id, {"last": True})


@pytest.mark.anyio
async def test_recovery_gives_a_dropped_client_its_id_rooms_and_every_missed_frame_once_in_order(
        recovering: Server) -> None:
    server = recovering
    async with ws_client(server.ws) as (peer, peer_id):
        await peer.send(json.dumps(frame("join", peer_id, {"room": "lobby"})))
        await recv_json(peer)
        ws = await connect(server.ws)
        hello = await greeted(ws)
        me, token = hello["client_id"], hello["data"]["data"]["resume_token"]
        assert hello["data"]["data"]["recovered"] is False and token.startswith(me + ".")
        await ws.send(json.dumps(frame("join", me, {"room": "lobby"})))
        assert (await recv_json(ws))["event"] == "joined"  # frame 1
        # Sent while connected but never read: lost in the dead socket's buffers, as on a real network.
        push(server, f"/api/clients/{me}", "in_flight", 0)
        await drop(ws, server, me)
        assert server.get("/healthz").json()["connections"] == 1  # the away client is no open connection
        # While it is away: by id, to its room, to everyone, and relayed by another client.
        push(server, f"/api/clients/{me}", "direct", 1)
        assert server.post("/api/rooms/lobby", {"event": "room", "data": {"data": {"n": 2}}}).json() == {
            "delivered": 2}
        assert (await recv_json(peer))["event"] == "room"
        relayed = json.dumps(frame("relay", peer_id, {"n": 3}, to=me))
        await peer.send(relayed)
        room_relay = json.dumps(frame("chat", peer_id, {"n": 4}, room="lobby"))
        await peer.send(room_relay)
        await nothing_more(peer, peer_id)  # the relays went through before it answered
        assert server.post("/api/broadcast", {"event": "all", "data": {"data": {"n": 5}}}).json() == {"delivered": 2}
        assert (await recv_json(peer))["event"] == "all"

        async with connect(resume_url(server, token, offset=1)) as back:
            again = await greeted(back)
            assert again["client_id"] == me
            info = again["data"]["data"]
            assert (info["recovered"], info["rooms"], info["offset"], info["missed"]) == (True, ["lobby"], 1, 6)
            assert info["resume_token"] not in (token, None)
            received = [await recv_json(back) for _ in range(6)]
            assert [(f["event"], f["data"]["data"]["n"]) for f in received] == [
                ("in_flight", 0), ("direct", 1), ("room", 2), ("relay", 3), ("chat", 4), ("all", 5)]
            assert received[3] == json.loads(relayed) and received[4] == json.loads(room_relay)
            assert server.post("/api/rooms/lobby", {"event": "after", "data": {"data": {"n": 6}}}).json() == {
                "delivered": 2}
            assert (await recv_json(back))["event"] == "after"
            await nothing_more(back, me)
            assert server.get(f"/api/clients/{me}").json()["rooms"] == ["lobby"]
            assert "away_since" not in server.get(f"/api/clients/{me}").json()
    assert server.metric("ws_micro_sessions_total", outcome="resumed") >= 1


@pytest.mark.anyio
async def test_recovery_without_an_offset_replays_what_was_sent_while_away(recovering: Server) -> None:
    server = recovering
    ws, me, token = await new_session(server.ws)
    push(server, f"/api/clients/{me}", "before", 1)
    assert (await recv_json(ws))["event"] == "before"
    await drop(ws, server, me)
    push(server, f"/api/clients/{me}", "away", 2)
    async with connect(resume_url(server, token)) as back:
        assert (await greeted(back))["data"]["data"]["offset"] == 1
        assert (await recv_json(back))["event"] == "away"
        await nothing_more(back, me)


@pytest.mark.anyio
async def test_recovery_takes_over_a_connection_the_server_still_thinks_open(recovering: Server) -> None:
    server = recovering
    old, me, token = await new_session(server.ws)
    push(server, f"/api/clients/{me}", "unread", 1)
    # The client gave up on its connection (its network changed) before the server noticed anything.
    async with connect(resume_url(server, token, offset=0)) as back:
        info = (await greeted(back))["data"]["data"]
        assert info["recovered"] is True
        assert (await recv_json(back))["event"] == "unread"
        push(server, f"/api/clients/{me}", "new", 2)
        assert (await recv_json(back))["event"] == "new"
        await nothing_more(back, me)
        # The old connection was dropped by the server, and gets nothing more.
        with anyio.fail_after(TIMEOUT), contextlib.suppress(ConnectionClosed):
            while (json.loads(await old.recv()))["event"] == "unread":
                pass
            raise AssertionError("the old connection got a frame after its session moved")
        assert server.get("/api/clients").json()["clients"].count(server.get(f"/api/clients/{me}").json()) == 1


@pytest.mark.anyio
async def test_a_resume_token_works_once_and_cannot_be_guessed(recovering: Server) -> None:
    server = recovering
    ws, me, token = await new_session(server.ws)
    await drop(ws, server, me)
    # Guessed: the client id is no secret, the rest is.  A guess gets a new session and spoils nothing.
    for guess in (f"{me}.{'A' * 43}", me, f"{me}.", "x" * 5000, f"{uuid.uuid4()}.{token.split('.')[1]}"):
        async with connect(resume_url(server, guess, offset=0)) as stranger:
            info = await greeted(stranger)
            assert info["client_id"] != me and info["data"]["data"]["recovered"] is False
    push(server, f"/api/clients/{me}", "kept", 1)
    async with connect(resume_url(server, token, offset=0)) as back:
        assert (await greeted(back))["data"]["data"]["recovered"] is True
        assert (await recv_json(back))["event"] == "kept"
        # The same token again, while its session is in use: refused before the handshake, with a reason.
        with pytest.raises(InvalidStatus) as refused:
            await connect(resume_url(server, token, offset=0))
        assert refused.value.response.status_code == 409
        assert json.loads(refused.value.response.body or b"")["error"]["code"] == "resume_token_used"
        assert server.get(f"/ws/py_client?resume_token={token}").status_code == 409  # what the JS client asks
        await nothing_more(back, me)
    assert server.metric("ws_micro_sessions_total", outcome="token_reused") >= 1
    with pytest.raises(InvalidStatus) as bad_offset:
        await connect(resume_url(server, token) + "&resume_offset=-1")
    assert bad_offset.value.response.status_code == 400


@pytest.mark.anyio
async def test_a_session_ends_for_good_when_kicked_or_closed_by_its_client(recovering: Server) -> None:
    server = recovering
    ws, me, token = await new_session(server.ws)
    await drop(ws, server, me)
    assert server.http and httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT).status_code == 202
    assert server.post(f"/api/clients/{me}", {"event": "x", "data": {"data": {}}}).status_code == 404
    async with connect(resume_url(server, token, offset=0)) as stranger:
        info = await greeted(stranger)
        assert info["client_id"] != me and info["data"]["data"]["recovered"] is False

    async with connect(server.ws) as closing:
        hello = await greeted(closing)
        me, token = hello["client_id"], hello["data"]["data"]["resume_token"]
    await server.wait_until(lambda: server.get(f"/api/clients/{me}").status_code == 404, "a closed client to go")
    async with connect(resume_url(server, token, offset=0)) as stranger:
        assert (await greeted(stranger))["data"]["data"]["recovered"] is False


@pytest.mark.anyio
async def test_a_session_expires_after_the_window_and_resuming_then_says_not_recovered() -> None:
    with run_server("--log-level", "warning", "--recovery-window", "0.5") as server:
        ws, me, token = await new_session(server.ws)
        await ws.send(json.dumps(frame("join", me, {"room": "gone"})))
        await recv_json(ws)
        cut(ws)
        await server.wait_until(lambda: server.metric("ws_micro_sessions_total", outcome="expired") == 1,
                                "the session to expire")
        assert server.get(f"/api/clients/{me}").status_code == 404
        assert server.get("/api/rooms").json() == {"count": 0, "rooms": []}
        assert server.metric("ws_micro_sessions_away") == 0
        async with connect(resume_url(server, token, offset=1)) as back:
            info = await greeted(back)
            assert info["client_id"] != me and info["data"]["data"]["recovered"] is False


@pytest.mark.anyio
async def test_a_session_whose_missed_frames_pass_the_bounds_is_lost_and_says_so() -> None:
    with run_server("--log-level", "warning", "--recovery-window", "60", "--recovery-max-frames", "3") as server:
        ws, me, token = await new_session(server.ws)
        for n in range(5):  # connected, the oldest make room
            push(server, f"/api/clients/{me}", "seen", n)
            assert (await recv_json(ws))["data"]["data"]["n"] == n
        await drop(ws, server, me)
        for n in range(3):
            push(server, f"/api/clients/{me}", "kept", n)
        assert server.metric("ws_micro_sessions_kept_bytes") > 0
        # The fourth would push out a frame the client never saw: the session ends, and the push says so.
        assert server.post(f"/api/clients/{me}", {"event": "x", "data": {"data": {}}}).status_code == 404
        assert server.metric("ws_micro_sessions_total", outcome="overflowed") == 1
        assert server.metric("ws_micro_sessions_kept_bytes") == 0
        async with connect(resume_url(server, token, offset=5)) as back:
            info = await greeted(back)
            assert info["client_id"] != me and info["data"]["data"]["recovered"] is False
        # An offset older than what was kept while connected cannot be recovered either.
        ws, me, token = await new_session(server.ws)
        for n in range(5):
            push(server, f"/api/clients/{me}", "seen", n)
        await drop(ws, server, me)
        async with connect(resume_url(server, token, offset=1)) as back:
            assert (await greeted(back))["data"]["data"]["recovered"] is False
        assert server.metric("ws_micro_sessions_total", outcome="not_recovered") == 2  # each: its token or its frames


@pytest.mark.anyio
async def test_waiting_sessions_are_bounded_and_the_oldest_make_room() -> None:
    with run_server("--log-level", "warning", "--recovery-window", "60", "--recovery-max-sessions", "2") as server:
        sessions = []
        for _ in range(3):
            ws = await connect(server.ws)
            hello = await greeted(ws)
            sessions.append((hello["client_id"], hello["data"]["data"]["resume_token"]))
            cut(ws)
            await until_away(server, hello["client_id"])
        assert server.metric("ws_micro_sessions_away") == 2
        assert server.metric("ws_micro_sessions_total", outcome="evicted") == 1
        assert server.get(f"/api/clients/{sessions[0][0]}").status_code == 404
        for (_, token), recovered in zip(sessions, (False, True, True), strict=True):
            async with connect(resume_url(server, token, offset=0)) as back:
                assert (await greeted(back))["data"]["data"]["recovered"] is recovered


@pytest.mark.anyio
async def test_the_python_client_resumes_by_itself_and_says_whether_it_recovered(recovering: Server) -> None:
    server = recovering
    async with Client(server.ws) as client:
        await client.send("join", {"room": "py"})
        assert (await client.recv()).event == "joined"
        me = client.client_id
        assert client.recovered is False
        cut(client._connection)
        await until_away(server, me)
        push(server, "/api/rooms/py", "missed", 1)
        event = await client.recv()
        assert (event.event, event.data.data, client.client_id, client.recovered) == ("missed", {"n": 1}, me, True)
        await client.send("ping", {"n": 2})
        assert (await client.recv()).event == "pong"
        # Kicked while away: the next resume gets a new session, and the app hears of it.
        cut(client._connection)
        await until_away(server, me)
        assert httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT).status_code == 202
        with pytest.raises(ws_micro.SessionLost):
            await client.recv()
        assert client.client_id != me and client.recovered is False
        await client.send("ping", {"n": 3})
        assert (await client.recv()).event == "pong"


@pytest.mark.anyio
async def test_recovery_off_changes_nothing_on_the_wire(server: Server) -> None:
    async with connect(server.ws + "?resume_token=whatever.secret&resume_offset=3") as ws:
        hello = await greeted(ws)
        assert hello["data"]["data"] == {"message": "connection request granted"}


@pytest.mark.anyio
async def test_cluster_a_client_resumes_through_another_instance_with_every_missed_frame(
        redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--recovery-window", "60") as (x, y):
        async with ws_client(y.ws) as (peer, peer_id):
            await join(peer, peer_id, "lobby")
            ws, me, token = await new_session(x.ws)
            assert await join(ws, me, "lobby") == 2  # frame 1
            push(y, f"/api/clients/{me}", "in_flight", 0)  # never read: the socket dies with it
            assert (await recv_json(ws))["event"] == "in_flight"  # (it did arrive; the client lost it)
            await drop(ws, y, me)
            assert y.get("/api/rooms/lobby").json()["count"] == 2  # still a member while away
            push(y, f"/api/clients/{me}", "direct", 1)
            assert x.post("/api/rooms/lobby", {"event": "room", "data": {"data": {"n": 2}}}).json() == {"delivered": 2}
            assert (await recv_json(peer))["event"] == "room"
            relayed = text("relay", peer_id, {"n": 3}, to=me)
            await peer.send(relayed)
            await peer.send(text("chat", peer_id, {"n": 4}, room="lobby"))
            await nothing_more(peer, peer_id)
            assert y.post("/api/broadcast", {"event": "all", "data": {"data": {"n": 5}}}).json() == {"delivered": 2}
            assert (await recv_json(peer))["event"] == "all"

            async with connect(resume_url(y, token, offset=1)) as back:  # through the other instance
                info = await greeted(back)
                assert info["client_id"] == me
                assert (info["data"]["data"]["recovered"], info["data"]["data"]["rooms"]) == (True, ["lobby"])
                received = [await recv_json(back) for _ in range(6)]
                assert [(f["event"], f["data"]["data"]["n"]) for f in received] == [
                    ("in_flight", 0), ("direct", 1), ("room", 2), ("relay", 3), ("chat", 4), ("all", 5)]
                assert received[3] == json.loads(relayed)
                assert x.post("/api/rooms/lobby", {"event": "after", "data": {"data": {"n": 6}}}).json() == {
                    "delivered": 2}
                assert (await recv_json(back))["event"] == "after"
                await nothing_more(back, me)
                entry = x.get(f"/api/clients/{me}").json()
                assert entry["instance"] == instance_of(y) and "away_since" not in entry
                assert x.get("/api/rooms/lobby").json()["count"] == 2
                with pytest.raises(InvalidStatus) as refused:  # spent, across the cluster too
                    await connect(resume_url(x, token, offset=0))
                assert refused.value.response.status_code == 409

            # A client whose old connection the other instance still holds open takes it over.
            old, other, token = await new_session(x.ws)
            push(x, f"/api/clients/{other}", "unread", 1)
            async with connect(resume_url(y, token, offset=0)) as back:
                assert (await greeted(back))["data"]["data"]["recovered"] is True
                assert (await recv_json(back))["event"] == "unread"
                push(x, f"/api/clients/{other}", "new", 2)
                assert (await recv_json(back))["event"] == "new"
                await nothing_more(back, other)
            with anyio.fail_after(TIMEOUT), contextlib.suppress(ConnectionClosed):
                while json.loads(await old.recv())["event"] == "unread":
                    pass
                raise AssertionError("the old connection got a frame after its session moved")
        assert redis_server.command("KEYS", "ws_micro:kept:*") == []


@pytest.mark.anyio
async def test_cluster_a_waiting_session_ends_when_kicked_or_expired_and_its_room_hears_it(
        redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--recovery-window", "1", "--presence-events") as (x, y):
        async with ws_client(y.ws) as (peer, peer_id):
            await join(peer, peer_id, "lobby")
            assert (await recv_json(peer))["data"]["data"]["client_id"] == peer_id  # it hears its own join
            sessions = []
            for _ in range(2):
                ws = await connect(x.ws)
                hello = await greeted(ws)
                me = hello["client_id"]
                await join(ws, me, "lobby")
                joined = await recv_json(peer)
                assert (joined["event"], joined["data"]["data"]["client_id"]) == ("presence", me)
                sessions.append((me, hello["data"]["data"]["resume_token"]))
                await drop(ws, y, me)
            kicked, expired = sessions
            assert httpx.delete(f"{y.http}/api/clients/{kicked[0]}", timeout=TIMEOUT).status_code == 202
            for _ in range(2):  # the kick at once, the expiry within a heartbeat of the window's end
                left = (await recv_json(peer))["data"]["data"]
                assert left["action"] == "left" and left["client_id"] in (kicked[0], expired[0])
            assert x.metric("ws_micro_sessions_total", outcome="kicked") == 1
            await x.wait_until(lambda: x.metric("ws_micro_sessions_total", outcome="expired") == 1, "expiry")
            for me, token in sessions:
                assert y.get(f"/api/clients/{me}").status_code == 404
                async with connect(resume_url(y, token, offset=1)) as back:
                    info = await greeted(back)
                    assert info["client_id"] != me and info["data"]["data"]["recovered"] is False
            assert y.get("/api/rooms/lobby").json()["count"] == 1
        assert redis_server.command("KEYS", "ws_micro:session:*") == []


@pytest.mark.anyio
async def test_the_backend_hears_a_session_begin_and_end_once_however_often_its_connection_drops() -> None:
    with EventBackend() as backend, run_server(*forward_options(backend.url, "--recovery-window", "2"),
                                               "--log-level", "warning") as server:
        token = ""
        for attempt in range(3):
            ws = await connect(resume_url(server, token, offset=0) if token else server.ws)
            hello = await greeted(ws)
            me, token = hello["client_id"], hello["data"]["data"]["resume_token"]
            assert hello["data"]["data"]["recovered"] is (attempt > 0)
            await ws.send(text("chat", me, {"mode": "none", "n": attempt}))
            await nothing_more(ws, me)  # the event was forwarded before the ping was read
            await drop(ws, server, me)
        assert backend.notices(me) == [("connect", None)]
        await eventually(lambda: len(backend.notices(me)) == 2, "the session to expire")
        assert backend.notices(me) == [("connect", None), ("disconnect", "expired")]
        assert [body["data"]["n"] for body in backend.received if body["type"] == "event"] == [0, 1, 2]


@pytest.mark.anyio
async def test_cluster_sessions_outlive_a_rolling_restart_of_their_instance(redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--recovery-window", "60") as (x, y):
        ws, me, token = await new_session(x.ws)
        await join(ws, me, "lobby")
        x.process.send_signal(signal.SIGTERM)
        assert (await closed_with(ws))[0] == 1012
        assert x.process.wait(TIMEOUT) == 0
        await until_away(y, me)
        assert y.post("/api/rooms/lobby", {"event": "while_restarting", "data": {"data": {}}}).json() == {
            "delivered": 1}
        push(y, f"/api/clients/{me}", "direct", 1)
        async with connect(resume_url(y, token, offset=1)) as back:
            info = (await greeted(back))["data"]["data"]
            assert (info["recovered"], info["rooms"]) == (True, ["lobby"])
            assert [(await recv_json(back))["event"] for _ in range(2)] == ["while_restarting", "direct"]
            await nothing_more(back, me)


@pytest.mark.anyio
@pytest.mark.parametrize("instances", [1, 2])
async def test_a_resume_whose_answer_is_lost_can_be_made_again_with_the_same_token(
        redis_server: RedisServer, instances: int) -> None:
    options = ("--redis-url", redis_server.url, *FAST_HEARTBEAT) if instances == 2 else ()
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(run_server("--log-level", "warning", "--recovery-window", "60", *options))
                   for _ in range(instances)]
        first, last = servers[0], servers[-1]
        ws, me, token = await new_session(first.ws)
        await drop(ws, last, me)
        push(last, f"/api/clients/{me}", "missed", 1)
        # The gateway takes the token and answers with the next one; the network drops that answer.
        lost = await connect(resume_url(last, token, offset=0))
        await drop(lost, last, me)
        async with connect(resume_url(last, token, offset=0)) as back:
            info = (await greeted(back))["data"]["data"]
            assert (info["recovered"], info["missed"]) == (True, 1)
            assert (await recv_json(back))["event"] == "missed"
            # Used while its session is connected, it is refused: one connection holds a session.
            with pytest.raises(InvalidStatus) as refused:
                await connect(resume_url(first, token, offset=0))
            assert refused.value.response.status_code == 409
            await nothing_more(back, me)


@pytest.mark.anyio
async def test_cluster_concurrent_resumes_with_one_token_have_one_winner_that_stays_reachable(
        redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--recovery-window", "60") as (x, y):
        ws, me, token = await new_session(x.ws)
        await drop(ws, y, me)
        outcomes: list[Any] = []

        async def resume() -> None:
            try:
                connection = await connect(resume_url(y, token, offset=0))
            except InvalidStatus as exc:
                outcomes.append(exc.response.status_code)
                return
            outcomes.append(((await greeted(connection))["data"]["data"]["recovered"], connection))

        async with anyio.create_task_group() as tasks:
            for _ in range(3):
                tasks.start_soon(resume)
        winners = [outcome[1] for outcome in outcomes if isinstance(outcome, tuple) and outcome[0] is True]
        assert len(winners) == 1, outcomes
        assert all(outcome == 409 or outcome[0] is False for outcome in outcomes if not (
            isinstance(outcome, tuple) and outcome[1] is winners[0])), outcomes
        push(x, f"/api/clients/{me}", "reachable", 1)
        assert (await recv_json(winners[0]))["event"] == "reachable"
        await nothing_more(winners[0], me)
        for outcome in outcomes:
            if isinstance(outcome, tuple):
                await outcome[1].close()
        await y.wait_until(lambda: y.get(f"/api/clients/{me}").status_code == 404, "the winner to leave when closed")


@pytest.mark.anyio
async def test_cluster_a_stream_of_frames_reaches_a_client_dropping_and_resuming_once_each_in_order(
        redis_server: RedisServer) -> None:
    # Frames published through the instance the client drops from, resumed through the other: the
    # moments a frame can fall between the two, or reach the client both ways, are all crossed.
    with cluster(redis_server, 2, "--recovery-window", "60") as (x, y):
        ws, me, token = await new_session(x.ws)
        await join(ws, me, "stream")
        received = 1  # joined
        numbers: list[int] = []
        total, publishers = 600, 4

        async def publish(first: int) -> None:  # each its own sequence: first, first + publishers, ...
            async with httpx.AsyncClient(base_url=(x if first % 2 else y).http, timeout=TIMEOUT) as api:
                for n in range(first, total, publishers):
                    body = {"event": "n", "data": {"data": {"n": n}}}
                    response = await api.post("/api/rooms/stream" if n % 3 else "/api/broadcast", json=body)
                    assert response.json() == {"delivered": 1}, (n, response.text)

        async with anyio.create_task_group() as tasks:
            for first in range(publishers):
                tasks.start_soon(publish, first)
            while len(numbers) < total // 4:
                numbers.append((await recv_json(ws))["data"]["data"]["n"])
                received += 1
            cut(ws)
            async with connect(resume_url(y, token, offset=received)) as back:
                assert (await greeted(back))["data"]["data"]["recovered"] is True
                while len(numbers) < total:
                    numbers.append((await recv_json(back))["data"]["data"]["n"])
                await nothing_more(back, me)
        assert sorted(numbers) == list(range(total))  # each once
        for first in range(publishers):  # and each publisher's in the order it sent them
            assert [n for n in numbers if n % publishers == first] == list(range(first, total, publishers))


@pytest.mark.anyio
async def test_a_resume_keeps_only_the_rooms_its_new_credentials_allow() -> None:
    with run_server("--log-level", "warning", "--recovery-window", "60", "--jwt-secret", JWT_SECRET) as server:
        granted = mint({"rooms": ["secret"]})
        ws = await connect(server.ws, additional_headers={"Authorization": f"Bearer {granted}"})
        hello = await greeted(ws)
        me, token = hello["client_id"], hello["data"]["data"]["resume_token"]
        assert hello["data"]["data"]["rooms"] == ["secret"]
        await drop(ws, server, me)
        revoked = mint({"rooms": ["public"]})
        async with connect(resume_url(server, token, offset=0),
                           additional_headers={"Authorization": f"Bearer {revoked}"}) as back:
            info = (await greeted(back))["data"]["data"]
            assert (info["recovered"], info["rooms"]) == (True, ["public"])
            await server.wait_until(lambda: server.get(f"/api/clients/{me}").json()["rooms"] == ["public"],
                                    "the revoked room to be left")
            assert server.post("/api/rooms/secret", {"event": "x", "data": {"data": {}}}).json() == {"delivered": 0}
        # Someone else's credentials do not take the session.
        ws, me, token = await new_session(server.ws, additional_headers={"Authorization": f"Bearer {granted}"})
        await drop(ws, server, me)
        mallory = mint({"sub": "mallory"})
        async with connect(resume_url(server, token, offset=0),
                           additional_headers={"Authorization": f"Bearer {mallory}"}) as other:
            info = await greeted(other)
            assert info["client_id"] != me and info["data"]["data"]["recovered"] is False
        assert "away_since" in server.get(f"/api/clients/{me}").json()


@pytest.mark.anyio
async def test_a_frame_over_the_size_limit_ends_the_session_too(recovering: Server) -> None:
    ws, me, token = await new_session(recovering.ws, max_size=None)
    await ws.send("x" * (70 * 1024))
    assert (await closed_with(ws))[0] == 1009
    await recovering.wait_until(lambda: recovering.get(f"/api/clients/{me}").status_code == 404, "the session to end")
    async with connect(resume_url(recovering, token, offset=0)) as back:
        assert (await greeted(back))["data"]["data"]["recovered"] is False
