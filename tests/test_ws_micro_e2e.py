"""End-to-end tests of ws_micro's core: a real server process, real clients, and hostile ones.

Each test starts `python ws_micro.py` (or `uvicorn ws_micro:app`) as a real
process on a free loopback port, or uses the module's shared one, and talks to
it with real `websockets` clients, or with raw sockets where a client library
would not misbehave.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest
from conftest import (
    BACKEND_SECRET,
    JSON,
    ROOT,
    TIMEOUT,
    Server,
    client_frame,
    closed_with,
    error,
    frame,
    free_port,
    half_handshakes,
    join,
    raw_websocket,
    recv_json,
    recv_text,
    replying_server,
    run_server,
    server_sockets,
    text,
    without_message,
    ws_client,
)
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as connect_sync

import ws_micro
from ws_micro import MAX_REQUEST_ID_LENGTH, MAX_SAFE_INTEGER, Client, Event, RequestError

pytestmark = [pytest.mark.anyio, pytest.mark.process]


# --------------------------------------------------------------------------
# End to end: a real uvicorn process, real websockets clients
# --------------------------------------------------------------------------


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


async def test_e2e_api_push_and_unknown_client(server: Server) -> None:
    async with ws_client(server.ws) as (ws, me):
        response = await anyio.to_thread.run_sync(
            lambda: server.post(f"/api/clients/{me}", {"event": "pushed", "data": {"data": {"n": 7}}}))
        assert (response.status_code, response.json()) == (202, {"delivered": 1})
        assert await recv_json(ws) == frame("pushed", me, {"n": 7})
    missing = server.post("/api/clients/ghost", {"event": "x", "data": {"data": {}}})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_client"


async def test_e2e_binary_and_oversized_frames_close_with_1003_and_1009(server: Server) -> None:
    async with ws_client(server.ws) as (ws, _):
        await ws.send(b"\x00\x01")
        assert (await closed_with(ws))[0] == 1003
    async with ws_client(server.ws) as (ws, me):
        await ws.send(json.dumps(frame("echo", me, {"pad": "x" * 5000})))  # the server allows 4096 bytes
        assert (await closed_with(ws))[0] == 1009
    await server.wait_until(lambda: server.get("/healthz").json()["connections"] == 0, "registry to empty")


async def test_e2e_origin_refused_before_accept(server: Server) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.ws, origin="http://evil.example"):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403
    assert b"not allowed" in refused.value.response.body
    async with ws_client(server.ws, origin=f"http://127.0.0.1:{server.port}") as (_, me):
        assert me


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


async def test_e2e_flood_is_closed_with_1008() -> None:
    with run_server("--log-level", "warning", "--rate-limit", "5", "--rate-burst", "5") as server:
        async with ws_client(server.ws) as (ws, me):
            for _ in range(30):
                await ws.send(json.dumps(frame("ping", me)))
            assert await closed_with(ws) == (1008, "rate limit exceeded")
        assert server.metric("ws_micro_errors_total", code="rate_limited") >= 1
        assert server.metric("ws_micro_disconnects_total", reason="rate_limited") == 1


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


async def test_e2e_delete_closes_with_1000_and_a_reason(server: Server) -> None:
    async with ws_client(server.ws) as (ws, me):
        response = httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT)
        assert response.status_code == 202
        assert await closed_with(ws) == (1000, "disconnected by the server")


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


# --------------------------------------------------------------------------
# Requests and replies: a frame's id comes back on every answer to it
# --------------------------------------------------------------------------

REQUEST_IDS = [7, 0, -MAX_SAFE_INTEGER, MAX_SAFE_INTEGER, "req-1", "é🙂 ñ", "x" * MAX_REQUEST_ID_LENGTH]


def answer(event: str, client_id: str, data: dict[str, Any] | None, request_id: Any) -> dict[str, Any]:
    return {**frame(event, client_id, data), "id": request_id}


def wire(request_id: Any) -> str:
    """A JSON value as the gateway writes it: compact, non-ASCII characters as they are."""
    return json.dumps(request_id, ensure_ascii=False, separators=(",", ":"))


@pytest.mark.parametrize("request_id", REQUEST_IDS)
async def test_e2e_every_answer_to_a_frame_carries_its_id_back(server: Server, request_id: Any) -> None:
    async with ws_client(server.ws) as (a, me), ws_client(server.ws) as (b, id_b):

        async def ask(sent: dict[str, Any]) -> Any:
            await a.send(json.dumps({**sent, "id": request_id}))  # non-ASCII escaped: the same value comes back
            return await recv_json(a)

        await a.send(json.dumps({**frame("ping", me, {"n": 1}), "id": request_id}))
        assert await recv_text(a) == f'{{"event":"pong","client_id":"{me}","id":{wire(request_id)},' \
                                     '"data":{"data":{"n":1}}}'
        assert await ask(frame("echo", me, {"t": "hi"})) == answer("echo", me, {"t": "hi"}, request_id)
        assert await ask(frame("join", me, {"room": "ids"})) == answer("joined", me, {"room": "ids", "members": 1},
                                                                       request_id)
        assert await ask(frame("leave", me, {"room": "ids"})) == answer("left", me, {"room": "ids", "members": 0},
                                                                        request_id)
        for sent, code in ((frame("leave", me, {"room": "ids"}), "not_in_room"),
                           (frame("join", me, {"room": ""}), "invalid_event"),
                           (frame("chat", me, to="ghost"), "unknown_client"),
                           (frame("chat", me, room="elsewhere"), "not_in_room"),
                           (frame("chat", id_b), "client_id_mismatch"),
                           (frame("chat", me, to=id_b, room="ids"), "invalid_event"),
                           (frame("pong", me), "invalid_event"),
                           (frame("nothing", me), "unknown_event"),
                           ({"event": "chat", "client_id": me}, "invalid_event")):  # no data: not an envelope
            assert without_message(await ask(sent)) == {**error(me, code, sent["event"]), "id": request_id}, sent
        # A relay reaches its recipient unchanged, id and all, and its sender gets no answer.
        relayed = json.dumps({**frame("chat", me, {"t": 1}, to=id_b), "id": request_id})
        await a.send(relayed)
        assert await recv_text(b) == relayed
        await a.send(text("ping", me, {"after": "the relay"}))
        assert await recv_json(a) == frame("pong", me, {"after": "the relay"})  # nothing came before it


@pytest.mark.parametrize(("sent_id", "shown"), [
    ("3.5", "3.5"), ("1e3", "1000.0"), ("true", "true"), ('""', "''"), ("[1]", "[1]"), ('{"a":1}', '{"a":1}'),
    (json.dumps("x" * (MAX_REQUEST_ID_LENGTH + 1)), f"'{'x' * 40}'... ({MAX_REQUEST_ID_LENGTH + 1} characters)"),
    (str(MAX_SAFE_INTEGER + 1), str(MAX_SAFE_INTEGER + 1)), (str(-MAX_SAFE_INTEGER - 1), str(-MAX_SAFE_INTEGER - 1)),
    ("9" * 400, "an integer of more than 40 digits"),
])
async def test_e2e_an_id_of_the_wrong_type_or_size_gets_invalid_event_naming_it(
        server: Server, sent_id: str, shown: str) -> None:
    async with ws_client(server.ws) as (ws, me):
        await ws.send(f'{{"event":"ping","client_id":"{me}","data":{{"data":{{}}}},"id":{sent_id}}}')
        refused = await recv_json(ws)
        assert refused["data"]["data"].pop("message") == (
            f"id must be a string of 1 to {MAX_REQUEST_ID_LENGTH} characters or an integer from "
            f"{-MAX_SAFE_INTEGER} to {MAX_SAFE_INTEGER}, but got {shown}")
        assert refused == error(me, "invalid_event", "ping")  # and no id: it has none to carry back
        # A frame that is not JSON has no id to read: invalid_json, without one.
        await ws.send(f'{{"event":"ping","client_id":"{me}","id":7,')
        assert without_message(await recv_json(ws)) == error(me, "invalid_json", None)
        await ws.send(text("ping", me))
        assert await recv_json(ws) == frame("pong", me)  # the connection goes on


async def test_e2e_frames_without_an_id_are_the_tutorials_byte_for_byte(server: Server) -> None:
    async with connect(server.ws) as a, ws_client(server.ws) as (b, id_b):
        hello = str(await recv_text(a))
        me = json.loads(hello)["client_id"]
        assert hello == f'{{"event":"connect","client_id":"{me}","data":{{"data":{{"message":"connection request ' \
                        'granted"}}}'
        # What the tutorial's client sends (json.dumps, with its spaces), and what comes back, byte for byte.
        for sent, expected in (
                (text("ping", me, {"n": 1}), f'{{"event":"pong","client_id":"{me}","data":{{"data":{{"n":1}}}}}}'),
                (text("echo", me, {"n": 1}), text("echo", me, {"n": 1})),
                (text("join", me, {"room": "t"}),
                 f'{{"event":"joined","client_id":"{me}","data":{{"data":{{"room":"t","members":1}}}}}}'),
                (text("chat", me, to="nobody"),
                 f'{{"event":"error","client_id":"{me}","data":{{"data":{{"code":"unknown_client","message":'
                 f'"no client with id \'nobody\'","event":"chat"}}}}}}'),
                (text("leave", me, {"room": "t"}),
                 f'{{"event":"left","client_id":"{me}","data":{{"data":{{"room":"t","members":0}}}}}}')):
            await a.send(sent)
            assert await recv_text(a) == expected
        relayed = text("chat", me, {"text": "hello B"}, to=id_b)
        await a.send(relayed)
        assert await recv_text(b) == relayed
    # The Python client's frames carry no id either: echo sends back what it sent, byte for byte.
    async with ws_micro.Client(server.ws) as client:
        await client.send("echo", {"n": 1})
        with anyio.fail_after(TIMEOUT):
            assert await client.recv_text() == \
                f'{{"event":"echo","client_id":"{client.client_id}","data":{{"data":{{"n":1}}}}}}'


async def test_e2e_a_frame_over_the_rate_limit_is_refused_with_its_id(tmp_path: Path) -> None:
    # Burst 5, next to no refill: 5 frames served, 5 refused with rate_limited, then the close.
    with run_server("--log-level", "warning", "--rate-limit", "0.001", "--rate-burst", "5") as server:
        async with ws_client(server.ws) as (ws, me):
            # An integer of more digits than can be read at all (the server allows 64 KiB frames).
            await ws.send(f'{{"event":"ping","client_id":"{me}","data":{{"data":{{}}}},"id":{"9" * 5000}}}')
            refused = await recv_json(ws)
            assert "id" not in refused and refused["data"]["data"]["code"] == "invalid_event"
            assert refused["data"]["data"]["message"].startswith(f"id must be a string of 1 to {MAX_REQUEST_ID_LENGTH}")
            for n in range(4):
                await ws.send(json.dumps({**frame("ping", me, {"n": n}), "id": n}))
                assert await recv_json(ws) == answer("pong", me, {"n": n}, n)
            for sent, request_id in ((json.dumps({**frame("ping", me), "id": "over"}), "over"),
                                     (json.dumps({"event": "x", "id": 9}), 9),  # not an envelope: its id still
                                     (json.dumps({**frame("ping", me), "id": 2.5}), None),  # a bad id: none
                                     ("not json", None), (json.dumps([1, 2]), None)):
                await ws.send(sent)
                refused = await recv_json(ws)
                expected = error(me, "rate_limited", None)
                assert without_message(refused) == (expected if request_id is None else {**expected, "id": request_id})
            await ws.send(text("ping", me))
            assert await closed_with(ws) == (1008, "rate limit exceeded")
        assert server.metric("ws_micro_errors_total", code="rate_limited") == 5


@pytest.fixture(scope="module")
def replying(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """The gateway serving REPLYING_APP, whose handlers reply in every way a handler may; and its log."""
    folder = tmp_path_factory.mktemp("replying")
    log = folder / "server.log"
    with replying_server(folder, log=log) as server:
        yield server, log


async def test_e2e_a_handlers_reply_goes_to_its_sender_with_the_frames_id(replying: tuple[Server, Path]) -> None:
    server, log = replying
    async with ws_client(server.ws) as (ws, me), ws_client(server.ws) as (other, id_other):
        await ws.send(json.dumps({**frame("add", me, {"numbers": [1, 2, 3]}), "id": "sum-1"}))
        assert await recv_text(ws) == f'{{"event":"add","client_id":"{me}","id":"sum-1",' \
                                      '"data":{"data":{"sum":6,"id":"sum-1"}}}'  # the handler sees the id too
        await ws.send(json.dumps({**frame("rename", me, {"n": 2}), "id": 2}))
        assert await recv_json(ws) == answer("added", me, {"n": 2}, 2)
        # Without an id, a reply all the same, without one: a handler that returns None sends nothing.
        await ws.send(text("add", me, {"numbers": [4]}))
        assert await recv_json(ws) == frame("add", me, {"sum": 4, "id": None})
        await ws.send(json.dumps({**frame("quiet", me), "id": 3}))
        await ws.send(json.dumps({**frame("ping", me), "id": 4}))
        assert await recv_json(ws) == answer("pong", me, None, 4)  # nothing for "quiet" came first
        # A handler that fails, returns what is no reply, or replies with an event only the gateway sends:
        # internal_error, with the id; the reason is in the log, and nothing else reaches anyone.
        refused_before = server.metric("ws_micro_server_events_refused_total", source="python")
        for name, logged in (("boom", "ZeroDivisionError: boom"),
                             ("bad", "handler for event 'bad' (client {me}): it returned 42, of type int; a handler "
                                     "returns None, a mapping (the reply's data.data), or (event name, mapping)"),
                             ("forge", "handler for event 'forge' (client {me}): it replied 'pong', an event only "
                                       "the gateway sends; reply with another name")):
            logged = logged.format(me=me)
            await ws.send(json.dumps({**frame(name, me), "id": name}))
            refused = await recv_json(ws)
            assert refused["data"]["data"].pop("message") == f"the handler for {name!r} failed"
            assert refused == {**error(me, "internal_error", name), "id": name}
            await server.wait_until(lambda logged=logged: logged in log.read_text(), f"the log to say {logged!r}")
        assert server.metric("ws_micro_server_events_refused_total", source="python") == refused_before + 1
        await other.send(text("ping", id_other))
        assert await recv_json(other) == frame("pong", id_other)  # the first frame it got
        await ws.send(text("ping", me))
        assert await recv_json(ws) == frame("pong", me)  # the connection goes on
    assert log.read_text().count("Traceback") == 1  # the failing handler's; the others' mistakes are one line


async def test_e2e_python_client_request_returns_the_answer_or_raises(replying: tuple[Server, Path]) -> None:
    server, _ = replying
    async with Client(server.ws) as client, Client(server.ws) as other:
        with anyio.fail_after(TIMEOUT):
            pong = await client.request("ping", {"n": 1})
            assert (pong.event, pong.client_id, pong.id, pong.data.data) == ("pong", client.client_id, 1, {"n": 1})
            joined = await client.request("join", {"room": "r"})
            assert (joined.event, joined.id, joined.data.data) == ("joined", 2, {"room": "r", "members": 1})
            added = await client.request("add", {"numbers": [2, 3]})
            assert (added.event, added.data.data) == ("add", {"sum": 5, "id": 3})
            with pytest.raises(RequestError) as refused:
                await client.request("nothing")
            assert (refused.value.code, refused.value.message) == ("unknown_event", "no handler for event 'nothing'")
            assert refused.value.answer.id == 4 and refused.value.answer.event == "error"
            with pytest.raises(RequestError, match=r"^internal_error: the handler for 'bad' failed$"):
                await client.request("bad")
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"^no answer to 'quiet' \(id 6\) within 0.3 seconds$"):
            await client.request("quiet", timeout=0.3)  # its handler replies nothing
        assert 0.3 <= time.monotonic() - started < 2

        with anyio.fail_after(TIMEOUT):
            # Frames that come while a request waits are kept for recv(), in order; the answer is not among
            # them.  A frame relayed from another client with the same id is no answer: it has its sender's id.
            for n in range(3):
                await other.send("chat", {"n": n, "id": 7}, to=client.client_id)
            await other.send_text(json.dumps({**frame("chat", other.client_id, {"n": 3}, to=client.client_id),
                                              "id": 7}))
            assert (await other.request("ping")).event == "pong"  # so the relays have reached client's socket
            pong = await client.request("ping", {"n": 2})
            assert (pong.event, pong.id, pong.data.data) == ("pong", 7, {"n": 2})
            relayed = [await client.recv() for _ in range(4)]
            assert [(event.event, event.client_id, event.id, event.data.data["n"]) for event in relayed] == [
                ("chat", other.client_id, None, 0), ("chat", other.client_id, None, 1),
                ("chat", other.client_id, None, 2), ("chat", other.client_id, 7, 3)]

            # A task receiving and requests at the same time: each frame goes to one of them, the right one.
            received: list[Event] = []

            async def receive() -> None:
                received.append(await client.recv())

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(receive)
                answers = [await client.request("ping", {"k": k}) for k in range(3)]
                await other.send("chat", {"n": 4}, to=client.client_id)
            assert [(event.event, event.data.data) for event in answers] == [("pong", {"k": k}) for k in range(3)]
            assert [(event.event, event.data.data) for event in received] == [("chat", {"n": 4})]
            await client.send("ping", {"plain": True})  # no id: an ordinary frame, for recv()
            assert (await client.recv()).data.data == {"plain": True}


async def test_e2e_python_client_requests_are_bounded(replying: tuple[Server, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = replying
    monkeypatch.setattr(ws_micro, "MAX_PENDING_REQUESTS", 3)
    monkeypatch.setattr(ws_micro, "MAX_UNREAD_FRAMES", 2)
    async with Client(server.ws) as client, Client(server.ws) as other:
        with anyio.fail_after(TIMEOUT):
            # Requests waiting for their answers: at most MAX_PENDING_REQUESTS, and the table empties after.
            async with anyio.create_task_group() as tasks:
                for _ in range(3):
                    tasks.start_soon(functools.partial(client.request, "quiet", timeout=1))
                await wait_for(lambda: len(client._requests) == 3, "three requests to wait")
                with pytest.raises(RuntimeError, match=r"^3 requests are waiting for their answers already"):
                    await client.request("ping")
                tasks.cancel_scope.cancel()
            assert not client._requests
            # Frames read while a request waits, kept for recv(): at MAX_UNREAD_FRAMES the request reads no more.
            for n in range(3):
                await other.send("chat", {"n": n}, to=client.client_id)
            assert (await other.request("ping")).event == "pong"
            with pytest.raises(TimeoutError, match=r"within 0.5 seconds; 2 frames received meanwhile wait for recv"):
                await client.request("ping", timeout=0.5)
            frames = [await client.recv() for _ in range(4)]
            # The answer that came too late is an ordinary frame now.
            assert [(event.event, event.data.data.get("n"), event.id) for event in frames] == [
                ("chat", 0, None), ("chat", 1, None), ("chat", 2, None), ("pong", None, 4)]


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Wait for state in this process that has no event to wait on (a client's table of requests)."""
    with anyio.fail_after(TIMEOUT):
        while not predicate():  # noqa: ASYNC110 - the table is the client's own, with no event for it
            await anyio.sleep(0.01)


# --------------------------------------------------------------------------
# Errors that name the fix
# --------------------------------------------------------------------------

# Each optional package, the options that need it, and the command that installs it: one that works for a
# copied ws_micro.py and a checkout alike (ws-micro is not on PyPI, so 'pip install ws-micro[hook]' would fail).
NEEDS = {
    "forward_url": ("h11", {"WS_MICRO_FORWARD_URL": "http://127.0.0.1:9/"}, "pip install h11"),
    "connect_hook_url": ("h11", {"WS_MICRO_CONNECT_HOOK_URL": "http://127.0.0.1:9/"}, "pip install h11"),
    "jwt_secret": ("jwt", {"WS_MICRO_JWT_SECRET": "s" * 32}, "pip install 'pyjwt[crypto]'"),
    "redis_url": ("redis", {"WS_MICRO_REDIS_URL": "redis://127.0.0.1:1"}, "pip install 'redis[hiredis]'"),
}


@pytest.mark.parametrize("how", ["python-ws_micro.py", "uvicorn-ws_micro:app"])
@pytest.mark.parametrize("setting", NEEDS)
def test_without_an_optional_package_the_server_says_in_one_line_what_to_pip_install(
        setting: str, how: str, tmp_path: Path) -> None:
    package, environ, install = NEEDS[setting]
    # A folder ahead of site-packages whose module of that name is not there, as where it was never installed.
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / f"{package}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{package}'\", "
                                           f"name='{package}')\n")
    command = [sys.executable, "ws_micro.py"] if how == "python-ws_micro.py" else [
        sys.executable, "-m", "uvicorn", "ws_micro:app", "--port", str(free_port())]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env={
        **os.environ, "WS_MICRO_BACKEND_SECRET": BACKEND_SECRET, **environ, "PYTHONPATH": str(missing)})
    assert result.returncode != 0, result
    told = [line for line in result.stderr.splitlines() if "pip install" in line]
    # Named as it was given: the variable.
    variable = next(iter(environ))
    assert len(told) == 1 and f"{variable} needs" in told[0] and install in told[0], result.stderr
    assert "pip install 'ws-micro" not in told[0] and "pip install ws-micro" not in told[0], told[0]
    assert "Traceback" not in result.stderr, result.stderr


# A host app that mounts the gateway under /gateway, as docs/embedding.md shows.
MOUNTING_HOST = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import ws_micro


async def healthz(request):
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/healthz", healthz), Mount("/gateway", app=ws_micro.create_app())])
"""


def refused(url: str) -> tuple[int, Any]:
    """The status and JSON body with which the server refuses a handshake to ``url``."""
    with pytest.raises(InvalidStatus) as refusal, connect_sync(url, open_timeout=TIMEOUT):
        pass
    response = refusal.value.response
    assert response.headers["content-type"] == "application/json", response.headers
    return response.status_code, json.loads(response.body)


@pytest.mark.parametrize("mounted", [False, True], ids=["served", "mounted-under-gateway"])
def test_e2e_a_websocket_to_another_path_gets_404_naming_the_endpoint(mounted: bool, tmp_path: Path) -> None:
    # A typo, or a forgotten mount prefix, used to get 403 with an empty body: nothing said what was wrong.
    (tmp_path / "host.py").write_text(MOUNTING_HOST)
    prefix = "/gateway" if mounted else ""
    with run_server("--log-level", "warning", uvicorn_app="host:app" if mounted else False,
                    cwd=tmp_path if mounted else ROOT, env={"PYTHONPATH": str(ROOT)}) as server:
        base = f"ws://127.0.0.1:{server.port}{prefix}"
        for path in ("/ws/py_clent", "/", "/ws/py_client/", "/static/ws_micro.js", "/api/clients"):
            assert refused(base + path) == (404, {"error": {"code": "not_found", "message": (
                f"no WebSocket endpoint at '{prefix}{path}'; the gateway's is '{prefix}/ws/py_client'")}}), path
        assert server.metric("ws_micro_rejected_handshakes_total", path=f"{prefix}/metrics", reason="not_found") == 5
        long = "/x" * 2000  # within the 8 KB request line websockets reads
        status, body = refused(base + long)
        assert status == 404 and len(body["error"]["message"]) < 300, body
        if not mounted:  # a line break in the path, which a route's regular expression (a Mount's too) does not match
            assert refused(base + "/a%0D%0ASet-Cookie:%20x=1") == (404, {"error": {"code": "not_found", "message": (
                "no WebSocket endpoint at '/a\\r\\nSet-Cookie: x=1'; the gateway's is '/ws/py_client'")}})
            assert server.metric("ws_micro_rejected_handshakes_total", reason="not_found") == 7
        # The command-line client says the same.
        result = subprocess.run([sys.executable, "ws_micro.py", "client", f"{base}/wrong"], cwd=ROOT, input="",
                                capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 1
        assert result.stderr == (f"ws-micro client: the server refused the connection: HTTP 404 not_found: no "
                                 f"WebSocket endpoint at '{prefix}/wrong'; the gateway's is '{prefix}/ws/py_client'\n")
        if mounted:  # the host's own router answers outside the mount, with 403 and no body: the client guesses
            result = subprocess.run([sys.executable, "ws_micro.py", "client", f"ws://127.0.0.1:{server.port}/ws/py_client"],
                                    cwd=ROOT, input="", capture_output=True, text=True, timeout=TIMEOUT)
            assert result.returncode == 1
            assert result.stderr == ("ws-micro client: the server refused the connection: HTTP 403 http_error: no "
                                     "reason given: a host app answers so for a path outside the gateway's mount (is "
                                     "the URL's path right?), and daphne for any refusal\n")
        # The endpoint itself still answers.
        with connect_sync(f"{base}/ws/py_client", open_timeout=TIMEOUT) as ws:
            assert json.loads(ws.recv(timeout=TIMEOUT))["event"] == "connect"
