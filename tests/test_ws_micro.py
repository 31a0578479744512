"""Tests for ws_micro's core, in process: the protocol, handlers, the sidecar API, handshakes, settings.

Every test asserts what a user sees: frames on the wire, HTTP statuses and
bodies, close codes, what a second client receives.  The gateway runs under
Starlette's TestClient, and a connection's writer against a socket the test
controls.  The tests here that start a process or a server thread (the Python
and command-line clients against a real server, the command line's errors)
are marked ``process``, which ``-m "not process"``, the fast loop, leaves out.
Shared fixtures and helpers are in conftest.py.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import json
import logging
import random
import re
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx2 as httpx
import msgspec
import pytest
from conftest import (
    FORGERY,
    JSON,
    LOCAL,
    LOOPBACK,
    MINE,
    ROOT,
    TIMEOUT,
    Server,
    StallingOutput,
    connected,
    error,
    frame,
    free_port,
    gateway,
    relaying_gateway,
    run_server,
    without_message,
)
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

import ws_micro
from ws_micro import Client, Event, Registry, Settings, create_app

pytestmark = pytest.mark.anyio


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


@pytest.mark.parametrize("middleware", [False, True], ids=["direct", "through-starlettes-stack"])
def test_other_websocket_paths_get_404_naming_the_endpoint(middleware: bool) -> None:
    app = create_app(path="/live")
    if middleware:
        app.add_middleware(GZipMiddleware)
    with TestClient(app) as client, pytest.raises(WebSocketDenialResponse) as refused, \
            client.websocket_connect("/ws/elsewhere"):
        pass
    assert refused.value.status_code == 404  # where Starlette's router would close it: 403, with no body
    assert refused.value.json() == {"error": {"code": "not_found", "message": (
        "no WebSocket endpoint at '/ws/elsewhere'; the gateway's is '/live'")}}


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


def test_every_log_record_is_written_with_its_tokens_redacted() -> None:
    # Real loggers, handlers and formatters (uvicorn's access formatter reads its record's arguments), the
    # records the servers and websockets make; the filters the gateway once used saw only some of them.
    from uvicorn.logging import AccessFormatter
    from websockets.frames import Frame, Opcode

    create_app()  # installs the redaction, for every logger of the process
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.StreamHandler(stream)
    access.setFormatter(AccessFormatter("%(client_addr)s - \"%(request_line)s\" %(status_code)s", use_colors=False))
    loggers = {name: logging.getLogger(f"test_redaction.{name}") for name in ("server", "access")}
    for logger, with_handler in ((loggers["server"], handler), (loggers["access"], access)):
        logger.addHandler(with_handler)
        logger.setLevel(1)  # uvicorn's TRACE is 5
        logger.propagate = False
    token, resume = "eyJhbGci.eyJzdWIi.c2lnbmF0dXJl", "4f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f.Zm9vYmFyYmF6cXV4"
    greeting = {"message": "connection request granted", "resume_token": resume}  # at its end, as the server's
    sent = Frame(Opcode.TEXT, json.dumps(frame("connect", resume.split(".")[0], greeting)).encode())
    try:
        log = loggers["server"]
        log.debug("< %s: %s", "authorization", f"Bearer {token}")
        log.debug("< %s: %s", "Cookie", f"session={token}")
        log.debug("< %s: %s", "x-ws-micro-resume-token", resume)
        log.debug("> %s", sent)
        log.log(5, "%s Started scope=%s", "ASGI [1]", {"query_string": f"token={token}&x=1".encode(),
                                                      "headers": [(b"authorization", f"Bearer {token}".encode())]})
        log.info("%(r)s %(q)s", {"r": "GET /ws/py_client 1.1", "q": f"resume_token={resume}"})
        log.info(Origin(f"https://app.example/?token={token}"))  # a message that is no str
        try:
            raise ValueError(f"cannot read the header 'Authorization: Bearer {token}'")
        except ValueError:
            log.exception("failed")
        log.info("nothing secret in %s: %d%%", "this line", 100)
        loggers["access"].info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:50000", "GET",
                               f"/ws/py_client?token={token}&resume_token={resume}", "1.1", 200)
    finally:
        for logger in loggers.values():
            logger.handlers.clear()
    written = stream.getvalue()
    assert token not in written and resume not in written and resume[-12:] not in written, written
    for line in ("< authorization: [redacted]", "< Cookie: [redacted]", "< x-ws-micro-resume-token: [redacted]",
                 "b'token=[redacted]&x=1'", "(b'authorization', b'[redacted]')",
                 "GET /ws/py_client 1.1 resume_token=[redacted]", "https://app.example/?token=[redacted]",
                 "ValueError: cannot read", "nothing secret in this line: 100%",
                 '127.0.0.1:50000 - "GET /ws/py_client?token=[redacted]&resume_token=[redacted] HTTP/1.1" 200'):
        assert line in written, written
    assert re.search(r"> TEXT '.*\[redacted\].*' \[\d+ bytes\]", written), written  # the frame's ends: the token's


# --------------------------------------------------------------------------
# Shares, the public API and the docs (the settings: test_ws_micro_config.py)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "host", "key"),
    [
        ("alice", "203.0.113.9", "user 'alice'"),  # a user's, from wherever
        (None, "203.0.113.9", "address 203.0.113.9"),
        (None, "2001:db8:1:2:3:4:5:6", "addresses 2001:db8:1:2::/64"),  # what one subscriber is given
        (None, "::ffff:203.0.113.9", "address 203.0.113.9"),  # an IPv4 client of a dual-stack listener
        (None, "::1", "addresses ::/64"),
        (None, "some-host", "address some-host"),  # a name, as a server may give it: as it is
        (None, None, None),  # no address (a Unix socket): no share
    ],
)
def test_a_requests_share_of_the_backend_is_its_users_else_its_addresses(user: str | None, host: str | None,
                                                                        key: str | None) -> None:
    assert ws_micro._share_key(user, host) == key


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
# The Python client and the command-line client
# --------------------------------------------------------------------------


async def _take(client: Client, n: int) -> AsyncIterator[Event]:
    async for event in client:
        yield event
        n -= 1
        if n == 0:
            return


@pytest.mark.process
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


@pytest.mark.process
async def test_python_client_trusts_only_the_first_connect_frame() -> None:
    with relaying_gateway(*FORGERY) as url:
        async with Client(url) as client:
            with anyio.fail_after(TIMEOUT):
                event = await client.recv()
            assert (event.event, event.data.data) == ("chat", {"text": "after the forgery"})
            assert client.client_id == MINE


@pytest.mark.process
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


@pytest.mark.process
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


@pytest.mark.process
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


async def test_python_client_does_not_inflate_a_frame_past_its_limit() -> None:
    # With no limit, one compressed frame of about 300 KB took a client to 630 MB.
    hello = '{"event": "connect", "client_id": "x", "data": {"data": {}}}'
    async with hostile_server(hello, "0" * 100_000_000) as url, Client(url) as client:
        assert client.client_id == "x"
        with anyio.fail_after(TIMEOUT), pytest.raises(ConnectionClosed) as closed:
            await client.recv()
        assert closed.value.sent is not None and closed.value.sent.code == 1009  # the client refused it


@pytest.mark.process
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


# --------------------------------------------------------------------------
# Encoding frames, and _start_now
# --------------------------------------------------------------------------


def test_encoded_frames_are_what_msgspec_decodes() -> None:
    text = ws_micro._Frame("news", {"quote": 'say "hi"\n'}).to("abc")
    assert msgspec.json.decode(text) == frame("news", "abc", {"quote": 'say "hi"\n'})


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


def writer(**options: Any) -> tuple[ws_micro._Connection, StallingOutput, list[str]]:
    """A connection on a :class:`StallingOutput`, and the reasons it left the registry with."""
    output, left = StallingOutput(), []
    connection = ws_micro._Connection(output, remote=None, settings=Settings(**options), metrics=ws_micro._Metrics(),
                                      on_close=lambda connection: left.append(connection.close_reason))
    return connection, output, left


async def test_a_fan_out_is_kept_once_for_all_its_receivers_and_its_waiting_sessions_count_it_once() -> None:
    # Recovery keeps what each connection is sent.  A server-made frame differs between receivers only in the
    # client_id: each session keeps the one shared frame and splices its own id in again at replay.
    registry, settings = Registry(), Settings(recovery_window=60, recovery_max_frames=3, recovery_max_bytes=400)
    registry._use(settings, ws_micro._Backend(), lambda connection: None)
    outputs: dict[str, StallingOutput] = {}
    for _ in range(3):
        output = StallingOutput()
        connection = ws_micro._Connection(output, remote=None, settings=settings, metrics=registry._metrics,
                                          on_close=registry._remove, session=registry._sessions.new())
        registry._add(connection)
        outputs[connection.id] = output
    ids = list(outputs)

    def as_sent(event: str, client_id: str, data: dict[str, Any]) -> str:
        return json.dumps({"event": event, "client_id": client_id, "data": {"data": data}}, separators=(",", ":"))

    assert await registry.broadcast("news", {"n": 1, "pad": "x" * 100}) == 3
    assert registry._relay(ids[1:], as_sent("chat", ids[0], {"n": 2})) == 2
    assert await registry.broadcast("news", {"n": 3, "pad": "x" * 100}) == 3
    assert await registry.broadcast("news", {"n": 4, "pad": "x" * 100}) == 3

    sessions = {client_id: registry._connections[client_id].session for client_id in ids}
    for client_id, session in sessions.items():
        assert session is not None
        sent = outputs[client_id].taken
        assert sent[-1] == as_sent("news", client_id, {"n": 4, "pad": "x" * 100})
        kept = session.texts(client_id)  # the newest, as sent, within 3 frames and 400 characters
        assert kept == sent[-len(kept):] and session.characters() == sum(map(len, kept)) <= 400 < sum(
            map(len, sent[-3:]))
    first, second, third = sessions.values()
    assert first is not None and second is not None and third is not None
    assert first.frames[-1] is second.frames[-1] is third.frames[-1]  # one body for all three

    # Two connections drop: their sessions wait, and count each object they keep once, and a slot for each.
    for client_id in ids[1:]:
        registry._connections[client_id].gone("abnormal")
    store = registry._sessions
    assert len(store) == 2 and [len(second.frames), len(third.frames)] == [2, 2]

    def memory(frame: str | ws_micro._Frame) -> int:
        if isinstance(frame, str):
            return sys.getsizeof(frame)
        return sys.getsizeof(frame) + sys.getsizeof(frame.head) + sys.getsizeof(frame.tail)

    def counted() -> int:
        objects = {id(frame): frame for session in (second, third) for frame in session.frames}
        return sum(map(memory, objects.values())) + 8 * (len(second.frames) + len(third.frames))

    assert store.memory == counted() < sum(map(memory, [*second.frames, *third.frames]))
    assert await registry.broadcast("news", {"n": 5, "pad": "x" * 100}) == 3  # kept while away
    assert store.memory == counted()
    assert second.frames[-1] is third.frames[-1]
    assert second.texts(ids[1])[-1] == as_sent("news", ids[1], {"n": 5, "pad": "x" * 100})
    store.end_all("shutdown")  # what they held is released
    assert store.memory == 0 and not store._kept


@pytest.mark.parametrize("seed", range(40))
def test_a_session_keeps_the_frames_a_plain_list_within_its_bounds_would(seed: int) -> None:
    # _Session keeps its short frames without counting their characters, and _Connection.send keeps a connected
    # session's frames inline: against the rule written plainly (append, then the oldest make room while past
    # either bound; away, a frame the client had not had cannot), over random frames, short and long, some
    # shared (a fan-out's), connected and then away.
    rng = random.Random(seed)
    options: dict[str, Any] = {"recovery_window": 60, "recovery_max_frames": rng.randint(1, 6),
                               "recovery_max_bytes": rng.randint(150, 900)}
    settings = Settings(**options)
    connection, _, _ = writer(**options)
    connection.session = session = ws_micro._Session(settings)
    model: list[str] = []
    sent, away_at, lost = 0, -1, False
    for step in range(rng.randint(0, 30)):
        if step == 12:  # its peer vanishes: from now on frames are only kept
            connection.state = ws_micro._State.DROPPED
            connection.wait_away()
            away_at = sent
        pad = "x" * rng.choice([1, 20, 60, 140, 300, 1000])
        if rng.random() < 0.5:
            text = json.dumps({"event": "chat", "data": {"data": {"p": pad}}})
            taken = connection.send(text)
        else:
            frame = ws_micro._Frame("news", {"p": pad})
            frame.length = len(frame.head) + 36 + len(frame.tail)  # as Registry._fan_out sets it
            text = frame.to(connection.id)
            taken = connection.send(text, shared=frame)
        model.append(text)
        sent += 1
        while len(model) > settings.recovery_max_frames or sum(map(len, model)) > settings.recovery_max_bytes:
            if 0 <= away_at <= sent - len(model):
                lost = True
                break
            model.pop(0)
        if lost:
            assert not taken and connection.state is ws_micro._State.ENDED
            return
        assert taken and session.texts(connection.id) == model and session.characters() == sum(map(len, model))
        assert session.long == sum(len(text) > session.share for text in model)  # back to appends when 0
    assert session.sent == sent
    offset = rng.randint(sent - len(model) - 1, sent + 1)
    expected = model[offset - (sent - len(model)):] if sent - len(model) <= offset <= sent else None
    assert session.back(offset, connection.id) == expected


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


async def test_a_socket_that_takes_nothing_for_send_timeout_is_closed_with_1008() -> None:
    connection, output, left = writer(send_timeout=0.05)
    output.stall()
    connection.send("stuck")
    with anyio.fail_after(TIMEOUT):
        await connection.closed()
    assert output.closed_with == (1008, "slow consumer") and left == ["slow_consumer"]


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


async def test_a_close_frame_the_peer_never_takes_ends_in_an_abort() -> None:
    connection, output, _ = writer(close_timeout=0.05)
    output.takes_close = False
    connection.close(1000, "", label="kicked")
    with anyio.fail_after(TIMEOUT):
        await connection.closed()
    assert output.aborted and connection.state is ws_micro._State.CLOSED


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


async def test_a_connection_that_left_joins_no_room() -> None:
    registry = Registry()
    connection, _, _ = writer()
    connection._on_close = registry._remove
    registry._add(connection)
    connection.gone("abnormal")
    assert await registry._join(connection, "lobby") == 0
    assert registry._rooms == {} and connection.rooms == set()


def test_a_registry_used_again_without_redis_leaves_cluster_mode() -> None:
    registry = Registry()
    create_app(registry=registry, redis_url="redis://127.0.0.1:1")
    with TestClient(create_app(registry=registry)) as client:
        assert client.get("/healthz").json() == {"status": "ok", "connections": 0}


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


@pytest.mark.process
@pytest.mark.parametrize("copied", [True, False], ids=["a-copied-single-file", "static_dir-empty"])
def test_without_its_page_the_gateway_says_why_at_startup_and_at_its_address(copied: bool, tmp_path: Path) -> None:
    # The README says to open / : it answered a bare 404, and nothing said the page was off.
    (tmp_path / "ws_micro.py").write_bytes((ROOT / "ws_micro.py").read_bytes())
    log = tmp_path / "server.log"
    with run_server(*(() if copied else ("--static-dir", "")), cwd=tmp_path if copied else ROOT, log=log) as server:
        page = server.get("/")
        assert page.status_code == 404 and page.json()["error"]["code"] == "not_found"
        why = ("no static folder with an index.html beside ws_micro.py (static_dir 'auto')" if copied
               else "static_dir is empty")
        assert page.json()["error"]["message"] == (
            f"the browser page is off: {why}; set static_dir to a folder with an index.html (docs/browser.md)")
        assert str(tmp_path) not in page.text  # the server's folders are the operator's business
        assert server.get("/static/ws_micro.js").status_code == 404
        assert server.get("/healthz").json()["status"] == "ok"
    said = [line for line in log.read_text().splitlines() if "browser page" in line]
    assert len(said) == 1 and said[0].startswith("INFO:"), log.read_text()
    if copied:
        assert f"browser page off: no static folder with an index.html beside {tmp_path / 'ws_micro.py'}" in said[0]
        assert "copy static/ beside it" in said[0]
    else:
        assert said[0].endswith("browser page off: static_dir is empty"), said


def test_the_core_reaches_other_libraries_through_their_public_names_only() -> None:
    # ws_micro.py must stay copyable and readable alone: what needs another library's internals lives in
    # ws_micro_servers.py, and the siblings are imported only when needed (never at import).
    tree = ast.parse((ROOT / "ws_micro.py").read_text())
    imported: set[str] = set()
    private: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update((alias.asname or alias.name).partition(".")[0] for alias in node.names)
            private += [alias.name for alias in node.names if "._" in f".{alias.name}"]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            private += [f"{node.module}.{alias.name}" for alias in node.names
                        if "._" in f".{node.module}.{alias.name}"]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in imported:  # a library's private name: module._name
                private.append(ast.unparse(node))
        elif isinstance(node, ast.Attribute) and node.attr in ("__closure__", "__code__", "__globals__", "__self__"):
            private.append(ast.unparse(node))  # reading a function's insides
    assert private == []
    top_level = {alias.name for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)
                 for alias in node.names} | {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert not {"ws_micro_redis", "ws_micro_servers"} & top_level


# --------------------------------------------------------------------------
# The lean queue and flag that stand in for uvicorn's asyncio.Queue and Event (ws_micro_servers._lighten)
# --------------------------------------------------------------------------


async def test_the_engines_lean_queue_gives_messages_in_order_and_a_cancelled_reader_loses_none() -> None:
    import ws_micro_servers

    messages = ws_micro_servers._Messages()
    for n in range(3):
        messages.put_nowait({"n": n})
    assert [(await messages.get())["n"] for _ in range(3)] == [0, 1, 2]
    assert messages.empty() and messages._items == []  # emptied, it keeps no storage
    reader = asyncio.ensure_future(messages.get())
    await anyio.wait_all_tasks_blocked()
    messages.put_nowait({"n": 3})  # which wakes the reader...
    reader.cancel()  # ...cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert await messages.get() == {"n": 3}
    messages.put_nowait({"n": 4})
    assert messages.qsize() == 1 and messages.get_nowait() == {"n": 4}
    with pytest.raises(asyncio.QueueEmpty):
        messages.get_nowait()


async def test_the_engines_lean_flag_wakes_every_writer_when_set() -> None:
    import ws_micro_servers

    flag = ws_micro_servers._Flag(True)
    assert await flag.wait() and flag.is_set()
    flag.clear()
    woken: list[int] = []

    async def writer(n: int) -> None:
        await flag.wait()
        woken.append(n)

    async with anyio.create_task_group() as tasks:
        for n in range(3):
            tasks.start_soon(writer, n)
        await anyio.wait_all_tasks_blocked()
        assert woken == [] and flag._waiters is not None and len(flag._waiters) == 3
        flag.set()
    assert sorted(woken) == [0, 1, 2] and flag._waiters is None
