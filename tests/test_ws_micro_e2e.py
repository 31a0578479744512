"""End-to-end tests of ws_micro's core: a real server process, real clients, and hostile ones.

Each test starts `python ws_micro.py` (or `uvicorn ws_micro:app`) as a real
process on a free loopback port, or uses the module's shared one, and talks to
it with real `websockets` clients, or with raw sockets where a client library
would not misbehave.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
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
    frame,
    free_port,
    half_handshakes,
    join,
    raw_websocket,
    recv_json,
    recv_text,
    run_server,
    server_sockets,
    ws_client,
)
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as connect_sync

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
# Errors that name the fix
# --------------------------------------------------------------------------

# Each optional package, the options that need it, and the command that installs it: one that works for a
# copied ws_micro.py and a checkout alike (ws-micro is not on PyPI, so 'pip install ws-micro[hook]' would fail).
NEEDS = {
    "forward_url": ("aiohttp", {"WS_MICRO_FORWARD_URL": "http://127.0.0.1:9/"}, "pip install aiohttp"),
    "connect_hook_url": ("aiohttp", {"WS_MICRO_CONNECT_HOOK_URL": "http://127.0.0.1:9/"}, "pip install aiohttp"),
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
    assert len(told) == 1 and f"{setting} needs" in told[0] and install in told[0], result.stderr
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
