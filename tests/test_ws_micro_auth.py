"""Tests of authentication, permissions, users and presence (docs/auth.md).

Tokens and their grants are checked in process under Starlette's TestClient;
the connect hook and what reaches the logs, against a real server process and
a real backend (marked ``process``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import msgspec
import pytest
from conftest import (
    BACKEND_SECRET,
    JWT_SECRET,
    ROOT,
    TIMEOUT,
    BackendServer,
    HookBackend,
    Server,
    StallingOutput,
    closed_with,
    drop,
    eventually,
    frame,
    free_port,
    gateway,
    mint,
    new_session,
    recv_json,
    resume_url,
    rss_mib,
    run_server,
    text,
    ws_client,
)
from starlette.responses import Response
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

import ws_micro
from ws_micro import Client, Registry, Settings, create_app

pytestmark = pytest.mark.anyio


GRANTED = "connection request granted"


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


def hook_options(url: str) -> tuple[str, ...]:
    return ("--connect-hook-url", url, "--backend-secret", BACKEND_SECRET, "--connect-hook-timeout", "0.5",
            "--connect-hook-headers", "x-tenant")


@pytest.mark.process
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
                    "unbounded": (503, "auth_unavailable"), "nested": (503, "auth_unavailable")}
        for mode, (status, code) in expected.items():
            with pytest.raises(InvalidStatus) as refused:
                await connect(server.ws + f"?mode={mode}", open_timeout=TIMEOUT)
            assert refused.value.response.status_code == status, mode
            assert json.loads(refused.value.response.body or b"")["error"]["code"] == code, mode
        for outcome, count in (("accepted", 2), ("refused", 2), ("timeout", 1), ("bad_status", 1),
                               ("bad_answer", 3), ("unreachable", 0)):
            assert server.metric("ws_micro_connect_hook_total", outcome=outcome) == count, outcome
        assert server.metric("ws_micro_rejected_handshakes_total", reason="auth_unavailable") == 5
        # A refused handshake leaves nothing behind.
        assert server.get("/healthz").json()["connections"] == 0
        assert server.get("/api/rooms").json() == {"count": 0, "rooms": []}
    lines = log.read_text().splitlines()
    warnings = [line for line in lines if "handshakes are refused with 503" in line]
    assert len(warnings) == 3, warnings  # one per kind of failure: timeout, a status, an answer
    assert any("the connect hook did not answer within 0.5 seconds" in line for line in warnings)
    assert not any("Traceback" in line for line in lines)


@pytest.mark.process
async def test_e2e_a_connect_hook_that_is_down_refuses_everyone_with_503() -> None:
    with run_server("--log-level", "warning", *hook_options(f"http://127.0.0.1:{free_port()}/hook")) as server:
        for _ in range(3):
            with pytest.raises(InvalidStatus) as refused:
                await connect(server.ws, open_timeout=TIMEOUT)
            assert refused.value.response.status_code == 503
        assert server.metric("ws_micro_connect_hook_total", outcome="unreachable") == 3
        assert server.get("/healthz").json()["connections"] == 0


@pytest.mark.process
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


@pytest.mark.process
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


@pytest.mark.process
async def test_e2e_a_token_whose_unsigned_header_nests_deep_is_a_401_and_no_traceback(
        rsa_keys: tuple[Any, str], tmp_path: Path) -> None:
    # With two keys the gateway reads the token's header (unverified) to pick one: that read is a parser a
    # client's bytes reach before any check.
    key, log = tmp_path / "key.pem", tmp_path / "gateway.log"
    key.write_text(rsa_keys[1])
    nested = base64.urlsafe_b64encode(b'{"alg":' + b"[" * 3000 + b"]" * 3000 + b"}").rstrip(b"=").decode()
    token = f"{nested}.{base64.urlsafe_b64encode(b'{}').rstrip(b'=').decode()}.c2ln"
    with run_server("--jwt-public-key", str(key), env={"WS_MICRO_JWT_SECRET": JWT_SECRET}, log=log) as server:
        for _ in range(10):
            with pytest.raises(InvalidStatus) as refused:
                await connect(server.ws, additional_headers={"Authorization": f"Bearer {token}"},
                              open_timeout=TIMEOUT)
            assert refused.value.response.status_code == 401
            assert json.loads(refused.value.response.body or b"")["error"]["code"] == "unauthorized"
            probe = server.get(f"/ws/py_client?token={token}")
            assert (probe.status_code, probe.json()["error"]["code"]) == (401, "unauthorized")
        async with ws_client(server.ws, additional_headers={"Authorization": f"Bearer {mint()}"}):
            pass  # and the gateway still takes a good token
    logged = log.read_text()
    assert "Traceback" not in logged and "RecursionError" not in logged, logged
    # uvicorn's request lines, about 3 for each pair, and no more (each used to write a 38-line traceback).
    assert len(logged.splitlines()) < 60, logged


def probe(server: Server, token: str) -> tuple[int, str]:
    """What a handshake with ``token`` would get (the endpoint's plain GET): its status and error message."""
    answer = server.get(f"/ws/py_client?token={token}")
    return answer.status_code, answer.json()["error"]["message"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.process
async def test_e2e_a_revoked_users_tokens_are_refused_cached_or_not_and_on_a_resume() -> None:
    issued = int(time.time()) - 5  # tokens minted a while ago
    remembered, unseen, without_iat = mint({"iat": issued}), mint({"iat": issued, "n": 2}), mint()
    with run_server("--recovery-window", "60", env={"WS_MICRO_JWT_SECRET": JWT_SECRET}) as server:
        async with (ws_client(server.ws, additional_headers=bearer(remembered)) as (open_, _),
                    ws_client(server.ws, additional_headers=bearer(mint({"sub": "bob"}))) as (bystander, bob)):
            away, away_id, resume_token = await new_session(server.ws, additional_headers=bearer(remembered))
            await drop(away, server, away_id)
            answer = httpx.delete(f"{server.http}/api/users/alice?revoke=true", timeout=TIMEOUT)
            assert answer.status_code == 202 and answer.json()["disconnected"] == 2  # the open one, the away one
            assert answer.json()["revoked_before"][:10] == time.strftime("%Y-%m-%d", time.gmtime())
            assert await closed_with(open_) == (1000, "disconnected by the server")
            for token in (remembered, unseen, without_iat):  # the gateway's cache holds the first
                status, message = probe(server, token)
                assert status == 401 and "were revoked; get a new one" in message, message
                with pytest.raises(InvalidStatus) as refused:
                    await connect(server.ws, additional_headers=bearer(token))
                assert refused.value.response.status_code == 401
            with pytest.raises(InvalidStatus) as refused:  # nor back into the session it had
                await connect(resume_url(server, resume_token), additional_headers=bearer(remembered))
            assert refused.value.response.status_code == 401
            # A token issued after the revocation is taken (within its second, iat must tell: a fraction), and
            # another user was never touched.
            async with ws_client(server.ws, additional_headers=bearer(mint({"iat": time.time()}))) as (_, me):
                assert server.get(f"/api/clients/{me}").json()["user"] == "alice"
            await bystander.send(text("ping", bob))
            assert (await recv_json(bystander))["event"] == "pong"
        # Revoking without disconnecting; a bad flag is named.
        answer = httpx.delete(f"{server.http}/api/users/bob?revoke=1&disconnect=false", timeout=TIMEOUT)
        assert answer.status_code == 202 and "disconnected" not in answer.json()
        bad = httpx.delete(f"{server.http}/api/users/bob?revoke=maybe", timeout=TIMEOUT)
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_parameter")
        assert "revoke must be true or false, but got 'maybe'" in bad.json()["error"]["message"]
        twice = httpx.delete(f"{server.http}/api/users/bob?revoke=1&revoke=0", timeout=TIMEOUT)
        assert (twice.status_code, twice.json()["error"]["message"]) == (400, "revoke is given twice")


@pytest.mark.process
async def test_e2e_a_revocation_expires_after_revocation_ttl() -> None:
    token = mint({"iat": int(time.time()) - 5})
    with run_server("--revocation-ttl", "1", env={"WS_MICRO_JWT_SECRET": JWT_SECRET}) as server:
        assert httpx.delete(f"{server.http}/api/users/alice?revoke=true&disconnect=false").status_code == 202
        assert probe(server, token)[0] == 401
        await server.wait_until(lambda: probe(server, token)[0] == 426, "the revocation to expire")


@pytest.mark.process
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
        # A program's own log at DEBUG, where websockets writes the headers the client sends: no token.
        token = mint({"sub": "frank"})
        script = ("import logging, sys, anyio, ws_micro\n"
                  "logging.basicConfig(level=logging.DEBUG, stream=sys.stdout)\n"
                  "async def main():\n"
                  "    async with ws_micro.Client(sys.argv[1], token=sys.argv[2]) as client:\n"
                  "        print('user', client.user)\n"
                  "anyio.run(main)\n")
        result = await anyio.to_thread.run_sync(functools.partial(
            subprocess.run, [sys.executable, "-c", script, server.ws, token], cwd=ROOT, capture_output=True,
            text=True, timeout=TIMEOUT))
        assert "user frank" in result.stdout and "authorization" in result.stdout.lower(), result.stdout
        assert token not in result.stdout and token.split(".")[1] not in result.stdout, result.stdout


async def test_presence_of_many_slow_members_cut_off_at_once_is_announced_without_recursion() -> None:
    # Each member cut off is announced to the others, which cuts the next one off, and so on: a
    # recursion as deep as the room is large, had the announcements not been queued.
    registry, settings = Registry(), Settings(max_queue_messages=1, presence_events=True)
    registry._use(settings, ws_micro._Backend(), lambda connection: None)
    members, outputs = [], []
    for _ in range(500):
        output = StallingOutput()
        outputs.append(output)
        connection = ws_micro._Connection(output, remote=None, settings=settings, metrics=registry._metrics,
                                          on_close=registry._remove)
        registry._add(connection)
        await registry._join(connection, "big")
        members.append(connection)
        output.stall()
    assert await registry.publish("big", "news") == 500  # in flight
    assert await registry.publish("big", "news") == 500  # queued
    assert await registry.publish("big", "news") == 0  # over the queue: every member is cut off
    assert len(registry) == 0 and registry._rooms == {}
    assert {member.close_reason for member in members} == {"slow_consumer"}
    for member, output in zip(members, outputs, strict=True):
        output.drain()
        await member.closed()


@pytest.mark.process
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
        over_share = server.metric("ws_micro_rejected_handshakes_total", reason="over_share")
        waited = server.metric("ws_micro_connect_hook_total", outcome="timeout")
        # At most connect_hook_max_pending_per_address (10) of one address wait on the hook at once.
        assert full + over_share + waited == 600 and 0 < waited <= 3 * 10
        assert server.get("/healthz").json()["connections"] == 0
        assert rss_mib(server.process) - before < 15
    lines = log.read_text().splitlines()
    # One line per 10 s, not one per handshake: the hook's failures, and uvicorn's (see _CLIENT_CAUSED).
    assert len([line for line in lines if line.startswith("WARNING")]) <= 2
    assert len([line for line in lines if line.startswith("ERROR")]) <= 2
    assert not any("Traceback" in line for line in lines)


@pytest.mark.process
async def test_e2e_handshakes_from_one_address_that_hang_the_hook_leave_it_to_other_addresses() -> None:
    # 150 handshakes from one address, each held 3 s by the hook, filled the hook's pool of 100: a
    # handshake from elsewhere waited for them, up to connect_hook_timeout, and then got 503.
    attackers, share, delay = 150, 10, 3.0
    with HookBackend() as backend, run_server(*hook_options(backend.url), "--connect-hook-timeout", "10",
                                              "--log-level", "warning") as server:

        async def handshake_seconds() -> float:
            started = time.perf_counter()
            async with ws_client(server.ws, local_addr=("127.0.0.2", 0)):
                return time.perf_counter() - started

        await handshake_seconds()  # the hook's first pooled connection
        free = max([await handshake_seconds() for _ in range(5)])
        refusals: list[tuple[int, dict[str, str]]] = []
        accepted: list[str] = []

        async def attempt() -> None:
            try:
                async with ws_client(f"{server.ws}?mode=slow&delay={delay}") as (_, client_id):
                    accepted.append(client_id)
            except InvalidStatus as refused:
                refusals.append((refused.response.status_code,
                                 json.loads(refused.response.body or b"{}")["error"]))

        def held() -> int:
            return len([asked for asked in backend.requests if asked["query"].get("mode") == "slow"])

        async with anyio.create_task_group() as tasks:
            for _ in range(attackers):
                tasks.start_soon(attempt)
            await eventually(lambda: held() + len(refusals) >= attackers or held() >= ws_micro.BACKEND_POOL_SIZE,
                             "the attack to be in place")
            attacked = max([await handshake_seconds() for _ in range(5)])
        print(f"127.0.0.2's worst of 5 handshakes: {free:.3f} s free, {attacked:.3f} s with {attackers} handshakes "
              "from 127.0.0.1 that the hook holds")
        assert attacked < free + 0.5, (free, attacked)
        assert len(accepted) == share and len(refusals) == attackers - share
        assert {(status, error["code"], error["message"]) for status, error in refusals} == {(
            503, "over_share", "address 127.0.0.1 has 10 handshakes waiting for the connect hook "
                               "(connect_hook_max_pending_per_address); try again later")}
        assert server.metric("ws_micro_rejected_handshakes_total", reason="over_share") == attackers - share


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


def test_a_remembered_token_is_refused_once_it_expires() -> None:
    token = mint(lifetime=2)  # exp is whole seconds: a lifetime of 1 may leave none, the token dead at its first use
    expires = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["exp"]
    with gateway(jwt_secret=JWT_SECRET) as client:
        assert greeting(client, authorization=f"Bearer {token}")["user"] == "alice"
        assert greeting(client, authorization=f"Bearer {token}")["user"] == "alice"  # remembered
        while time.time() < expires:  # the token's own clock: nothing to wait on but time
            time.sleep(0.05)
        assert refusal(client, authorization=f"Bearer {token}") == (
            401, {"code": "unauthorized", "message": "the token has expired"})


@pytest.mark.process
async def test_e2e_a_hook_answer_over_its_limit_is_refused_even_when_it_is_valid_json() -> None:
    async def padded(asked: dict[str, Any]) -> Any:
        return Response(b'{"user": "big"}' + b" " * 70_000, media_type="application/json")

    with BackendServer("/hook", padded) as backend, \
            run_server(*hook_options(backend.url), "--log-level", "warning") as server:
        with pytest.raises(InvalidStatus) as refused:
            await connect(server.ws, open_timeout=TIMEOUT)
        assert refused.value.response.status_code == 503
        assert server.metric("ws_micro_connect_hook_total", outcome="bad_answer") == 1


# --------------------------------------------------------------------------
# The docs' example token, minted and used as docs/auth.md shows
# --------------------------------------------------------------------------


@pytest.mark.process
async def test_e2e_the_docs_token_joins_and_publishes_its_room(tmp_path: Path) -> None:
    # Its token used to grant team:42 without publishing to it: the example's first message got forbidden.
    page = (ROOT / "docs" / "auth.md").read_text()
    minting = re.search(r"```python\n(import os, time\n.*?)```", page, re.DOTALL)
    assert minting is not None, "docs/auth.md lost its example of minting a token"
    (tmp_path / "mint.py").write_text(minting[1])
    piped = re.search(r"```sh\n(echo .*\| WS_MICRO_TOKEN=\"\$\(python3 mint.py\)\" ws-micro client)\n```", page)
    assert piped is not None, "docs/auth.md lost its example of using the token"
    env = {**os.environ, "WS_MICRO_JWT_SECRET": JWT_SECRET}  # as the page exports it, for the gateway and mint.py
    minted = await anyio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "mint.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT))
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    with run_server("--log-level", "warning", env={"WS_MICRO_JWT_SECRET": JWT_SECRET}) as server:
        async with ws_client(server.ws, additional_headers={"Authorization": f"Bearer {token}"}) as (teammate, mate):
            # The page's command, with this checkout's client and python for ws-micro's and python3's.
            command = piped[1].replace("python3 mint.py", f"{sys.executable} {tmp_path / 'mint.py'}").replace(
                "ws-micro client", f"{sys.executable} ws_micro.py client {server.ws}")
            result = await anyio.to_thread.run_sync(lambda: subprocess.run(
                command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT))
            assert result.returncode == 0, result.stderr
            frames = [json.loads(line) for line in result.stdout.splitlines()]
            assert [received["event"] for received in frames] == ["connect"], frames  # no error: it may send there
            greeting, sender = frames[0]["data"]["data"], frames[0]["client_id"]
            assert (greeting["user"], greeting["rooms"]) == ("alice", ["team:42"]), greeting
            assert await recv_json(teammate) == frame("chat", sender, {"text": "hello team"}, room="team:42")
            # A chat: room, to listen in only.
            await teammate.send(text("join", mate, {"room": "chat:lobby"}))
            assert (await recv_json(teammate))["event"] == "joined"
            await teammate.send(text("chat", mate, {"text": "hi"}, room="chat:lobby"))
            refused = await recv_json(teammate)
            assert refused["data"]["data"]["code"] == "forbidden", refused
