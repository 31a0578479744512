"""Tests of ws_micro under the ASGI servers, and of what it relies on in uvicorn's internals.

The fast path (frames written straight to uvicorn's transport), the bounds on
what uvicorn's engine handles alone, the guarded HTTP protocol, the log
filters, and the same gateway under uvicorn, hypercorn, granian and daphne.
Each test starts a real server process on a free loopback port and talks to
it with real `websockets` clients or raw sockets.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx2 as httpx
import pytest
import uvicorn
from conftest import (
    BACKEND_SECRET,
    JWT_SECRET,
    ROOT,
    SERVERS,
    TIMEOUT,
    HookBackend,
    Server,
    client_frame,
    closed_with,
    drop,
    frame,
    free_port,
    greeted,
    half_handshakes,
    hook_calls,
    hooks_app,
    join,
    mint,
    new_session,
    raw_websocket,
    recv_json,
    recv_text,
    replying_server,
    rss_mib,
    run_server,
    segments_in,
    server_sockets,
    server_texts,
    text,
    ws_client,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as connect_sync
from websockets.typing import Origin

import ws_micro
from ws_micro import RESUME_TOKEN_HEADER

pytestmark = [pytest.mark.anyio, pytest.mark.process]


# --------------------------------------------------------------------------
# Under each ASGI server, and uvicorn's fast path
# --------------------------------------------------------------------------


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
        async with ws_micro.Client(server.ws) as client:  # requests and replies: the id comes back
            with anyio.fail_after(TIMEOUT):
                pong = await client.request("ping", {"n": 2})
                assert (pong.event, pong.id, pong.data.data) == ("pong", 1, {"n": 2})
                with pytest.raises(ws_micro.RequestError) as failed:
                    await client.request("nothing")
                assert (failed.value.code, failed.value.answer.id) == ("unknown_event", 2)
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


def tree_rss_mib(pid: int) -> float:
    """The RSS of a process and all its descendants: servers such as granian serve from worker processes."""
    children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    own = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return own / 1024 + sum(tree_rss_mib(child) for child in children)


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
# And how the app hears of it, as on_disconnect's reason: uvicorn tells it the code it closed with; hypercorn tells
# it nothing and ends its call; granian and daphne may stop before the app's call ends (granian's worker exits,
# and daphne, when the signal comes right after a connection opened, skips cancelling the calls it waits for).
SHUTDOWN_REASON = {"uvicorn": "shutdown", "uvicorn-wsproto": "shutdown", "hypercorn": "abnormal", "granian": None,
                   "daphne": None}


@pytest.mark.parametrize("name", list(SERVERS))
async def test_e2e_sigterm_ends_every_connection_under_each_asgi_server(name: str, tmp_path: Path) -> None:
    # Served as a host app that mounts the gateway, with lifecycle hooks (conftest's HOOKS_APP): on_connect refuses
    # with 403 or joins rooms, and on_disconnect hears of the session's end once, as the server stops.
    with run_server(asgi_server=name, asgi_app="hooks:app", cwd=tmp_path, env=hooks_app(tmp_path)) as server:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{server.ws}?token={mint({'meta': {'mode': 'refuse'}})}"):
                pass
        assert refused.value.response.status_code == 403
        if name != "daphne":  # which has no denial responses: a bare 403
            assert json.loads(refused.value.response.body)["error"]["message"] == "not today, alice"
        async with ws_client(f"{server.ws}?token={mint({'meta': {'rooms': ['lobby']}})}") as (ws, me):
            assert await recv_json(ws) == frame("joined", me, {"room": "lobby", "members": 1})
            server.process.send_signal(signal.SIGTERM)
            code, _ = await closed_with(ws)
        assert code == SHUTDOWN_CLOSE[name]
        await anyio.to_thread.run_sync(lambda: server.process.wait(TIMEOUT))
    connects = [call for call in hook_calls(tmp_path) if call[0] == "connect"]
    assert len(connects) == 2  # the refused one, and the one let in
    ended = [call for call in hook_calls(tmp_path) if call[0] == "disconnect"]
    reason = SHUTDOWN_REASON[name]
    if reason is None:
        assert ended in ([], [["disconnect", me, "alice", "abnormal"]]), ended
    else:
        assert ended == [["disconnect", me, "alice", reason]]


def sized(client_id: str, size: int, **routing: str) -> str:
    """A chat frame of exactly ``size`` bytes."""
    padding = size - len(json.dumps(frame("c", client_id, {"p": ""}, **routing), separators=(",", ":")))
    text = json.dumps(frame("c", client_id, {"p": "x" * padding}, **routing), separators=(",", ":"))
    assert len(text.encode()) == size
    return text


@pytest.mark.internals
@pytest.mark.parametrize("deflate", [False, True], ids=["written-to-the-socket", "compressed-through-asgi"])
async def test_e2e_frames_of_every_length_arrive_intact(deflate: bool, tmp_path: Path) -> None:
    options = ("--max-message-size", "200000", *(("--per-message-deflate",) if deflate else ()))
    log = tmp_path / "server.log"
    with run_server("--log-level", "warning", *options, log=log) as server:
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
    # Under ws-micro compression is off unless asked for: then the fast path's being off is no news.
    assert "WARNING" not in log.read_text(), log.read_text()


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


class Tracer:
    \"\"\"A middleware that wraps receive and send, as tracing middleware often does.\"\"\"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def traced_receive():
            return await receive()

        async def traced_send(message):
            await send(message)

        await self.app(scope, traced_receive, traced_send)


class HttpOnlyTracer(Tracer):
    \"\"\"The same, letting WebSocket scopes through unwrapped, as docs/embedding.md advises.\"\"\"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        await super().__call__(scope, receive, send)


app = Starlette(routes=[Route("/healthz", healthz), Mount("/gateway", app=ws_micro.create_app())])
spied = Spy(app)
traced = Tracer(app)
traced_http_only = HttpOnlyTracer(app)
"""


@pytest.mark.parametrize(("how", "fast"), [("ws_micro:app", 1), ("host:app", 1), ("host:spied", 0)],
                         ids=["served", "mounted-in-a-host-app", "behind-a-middleware-that-wraps-send"])
@pytest.mark.internals
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


# A host app that says, for each WebSocket uvicorn's engine holds now, the types of its receive queue and of its
# writable flag: what ws_micro_servers.py swaps in after accept to keep an idle connection small.
ENGINES_APP = """
import contextlib
import gc

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

import ws_micro

gateway = ws_micro.create_app()


async def engines(request):
    return JSONResponse([[type(engine.queue).__name__, type(engine.writable).__name__]
                         for engine in gc.get_objects() if isinstance(engine, WebSocketsSansIOProtocol)])


@contextlib.asynccontextmanager
async def lifespan(app):
    async with gateway.router.lifespan_context(gateway):
        yield


app = Starlette(routes=[Route("/engines", engines), Mount("/", app=gateway)], lifespan=lifespan)
"""


@pytest.mark.internals
async def test_e2e_each_connection_holds_the_lean_queue_and_flag_under_uvicorns_engine(tmp_path: Path) -> None:
    # 3 KiB of an idle connection's 10 (docs/performance.md, "Issue 24, first pass"): nothing on the wire shows
    # whether the swap happened, and it stands down quietly on an engine of other types, so ask the engine.
    (tmp_path / "engines.py").write_text(ENGINES_APP)
    with run_server("--ws-per-message-deflate", "false", uvicorn_app="engines:app", cwd=tmp_path,
                    env={"PYTHONPATH": str(ROOT)}) as server:
        async with ws_client(server.ws) as (a, id_a), ws_client(server.ws) as (b, id_b):
            await a.send(json.dumps(frame("ping", id_a, {"n": 1})))
            assert await recv_json(a) == frame("pong", id_a, {"n": 1})
            await b.send(json.dumps(frame("chat", id_b, {"n": 2}, to=id_a)))
            assert await recv_json(a) == frame("chat", id_b, {"n": 2}, to=id_a)
            held = httpx.get(f"{server.http}/engines", timeout=TIMEOUT).json()
            assert held == [["_Messages", "_Flag"], ["_Messages", "_Flag"]], held


@pytest.mark.parametrize("fast_path", ["on", "off"])
@pytest.mark.internals
async def test_e2e_frames_go_from_uvicorns_parser_straight_to_the_gateway_unless_the_setting_says_not(
        fast_path: str) -> None:
    # The read fast path changes nothing on the wire (it must not): only the counter tells it engaged.  Every kind
    # of frame a client sends most, answered at once: a ping, a relay, an echo, an error.
    with run_server(*(("--no-fast-path",) if fast_path == "off" else ())) as server:
        async with ws_client(server.ws) as (a, id_a), ws_client(server.ws) as (b, id_b):
            for n in range(10):
                await a.send(json.dumps({**frame("ping", id_a, {"n": n}), "id": n}))
                assert await recv_json(a) == {**frame("pong", id_a, {"n": n}), "id": n}
            await a.send(text("chat", id_a, {"hi": 1}, to=id_b))
            assert await recv_json(b) == frame("chat", id_a, {"hi": 1}, to=id_b)
            await b.send(text("echo", id_b, {"e": 1}))
            assert await recv_json(b) == frame("echo", id_b, {"e": 1})
            await b.send("not json")
            assert (await recv_json(b))["data"]["data"]["code"] == "invalid_json"
            assert server.metric("ws_micro_messages_received_total") == 13
            assert server.metric("ws_micro_fast_reads_total") == (13 if fast_path == "on" else 0)
            assert server.metric("ws_micro_fast_path") == (1 if fast_path == "on" else 0)


@pytest.mark.internals
async def test_e2e_the_answers_to_frames_that_arrive_together_go_out_in_one_write() -> None:
    # Corking (docs/performance.md): a client's frames that one read brings are answered with a write or two (the
    # first answer at once, the rest as the read's handling ends), not one per answer: on loopback, a segment each.
    with run_server() as server:
        sock, me = await anyio.to_thread.run_sync(raw_websocket, server, 65536)
        with sock:
            burst = b"".join(client_frame(0x1, json.dumps({**frame("ping", me), "id": n}).encode()) for n in range(40))
            segments = segments_in(sock)
            sock.sendall(burst)
            answers = await anyio.to_thread.run_sync(server_texts, sock, 40)
            assert [(answer["event"], answer["id"]) for answer in answers] == [("pong", n) for n in range(40)]
            assert segments_in(sock) - segments <= 8  # about 40 without corking


@pytest.mark.parametrize("fast_path", ["on", "off"])
async def test_e2e_a_frame_that_must_wait_holds_back_the_frames_after_it_on_either_read_path(
        fast_path: str, tmp_path: Path) -> None:
    # Frames a handler answers after a wait, between frames answered at once, all in one write: each is answered
    # in the order sent.  With the read fast path, those answered at once are handled as the server parses them,
    # so one that overtook a waiting handler would be answered first.
    env = {"WS_MICRO_FAST_PATH": "true" if fast_path == "on" else "false"}
    with replying_server(tmp_path, env=env) as server:
        sock, me = await anyio.to_thread.run_sync(raw_websocket, server)
        with sock:
            burst = [("slow", 1), ("ping", 2), ("add", 3), ("ping", 4), ("slow", 5), ("echo", 6), ("ping", 7)]
            sock.sendall(b"".join(client_frame(0x1, json.dumps(
                {**frame(name, me, {"numbers": [n]}), "id": n}).encode()) for name, n in burst))
            answers = await anyio.to_thread.run_sync(server_texts, sock, len(burst))
            assert [(answer["event"], answer["id"]) for answer in answers] == [
                ("slow", 1), ("pong", 2), ("add", 3), ("pong", 4), ("slow", 5), ("echo", 6), ("pong", 7)]
            # On: the first (then those that came while the task waited), not those behind a wait.
            fast_reads = server.metric("ws_micro_fast_reads_total")
            assert (1 <= fast_reads < len(burst)) if fast_path == "on" else fast_reads == 0, fast_reads


# How the docs' host app is run, and the line the log must hold about the fast path (None: none that says it is off).
EMBEDDED_RUNS = {
    "plain-uvicorn": ("host:app", (), "fast path off: permessage-deflate was negotiated, and it rewrites every frame "
                                      "(to keep the fast path, run uvicorn with --ws-per-message-deflate false: "
                                      "docs/embedding.md); frames go through ASGI"),
    "without-compression": ("host:app", ("--ws-per-message-deflate", "false"), None),
    "tracing-middleware": ("host:traced", ("--ws-per-message-deflate", "false"),
                           "fast path off: receive is wrapped by 'Tracer.__call__.<locals>.traced_receive' (a "
                           "middleware?), which hides uvicorn's engine, so its bounds are off too (to keep both, "
                           "let WebSocket scopes through the middleware unwrapped: docs/embedding.md); frames go "
                           "through ASGI"),
    "tracing-middleware-http-only": ("host:traced_http_only", ("--ws-per-message-deflate", "false"), None),
}


@pytest.mark.parametrize("run", EMBEDDED_RUNS)
@pytest.mark.internals
async def test_e2e_embedded_under_plain_uvicorn_the_fast_path_off_is_a_warning_naming_the_fix(
        run: str, tmp_path: Path) -> None:
    # Under plain uvicorn, compression is on and the gateway's logger has no handler: the reason was an INFO line
    # nobody saw.  A WARNING reaches stderr through logging's last resort, uvicorn's configuration leaving it be.
    how, options, warning = EMBEDDED_RUNS[run]
    (tmp_path / "host.py").write_text(HOST_APP)
    log = tmp_path / "server.log"
    with run_server(*options, uvicorn_app=how, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}, log=log) as server:
        for _ in range(2):  # said once, however many connect
            async with ws_client(f"ws://127.0.0.1:{server.port}/gateway/ws/py_client") as (ws, me):  # offers deflate
                await ws.send(json.dumps(frame("ping", me)))
                assert (await recv_json(ws))["event"] == "pong"
        assert server.metric("ws_micro_fast_path", path="/gateway/metrics") == (1 if warning is None else 0)
    said = [line for line in log.read_text().splitlines() if "fast path" in line]
    assert said == ([] if warning is None else [warning]), log.read_text()


@pytest.mark.internals
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


@pytest.mark.internals
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


@pytest.mark.internals
def test_ws_micro_logs_whether_the_fast_path_is_on(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with run_server(log=log) as server, connect_sync(server.ws) as ws:
        assert json.loads(ws.recv(timeout=TIMEOUT))["event"] == "connect"
    assert log.read_text().count("fast path on: frames are written straight to uvicorn's transport") == 1


@pytest.mark.internals
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


# --------------------------------------------------------------------------
# Hostile clients: what uvicorn's engine and HTTP protocol must bound (raw sockets)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "reason"), [
    (("--rate-limit", "0"), "slow_consumer"),  # only the outgoing bound can stop it
    ((), "rate_limited"),  # pings count against the rate limit too
])
@pytest.mark.internals
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


@pytest.mark.parametrize(("start", "flood", "reply"), [
    (b"", bytes((0x8A, 0x80)) + b"\0\0\0\0", (1008, b"rate limit exceeded")),  # empty unsolicited pongs
    (bytes((0x01, 0x80)) + b"\0\0\0\0", bytes((0x00, 0x80)) + b"\0\0\0\0",  # a message that never ends
     (1009, b"message in more than 1000 fragments")),
])
@pytest.mark.internals
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


@pytest.mark.internals
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


@pytest.mark.internals
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


@pytest.mark.internals
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


@pytest.mark.internals
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
    for line in ("Unsupported upgrade request", "Invalid HTTP request received"):
        assert sum(line in logged for logged in lines) == 1, lines
    # uvicorn 0.55 no longer logs its spurious error after each refused handshake (its PR #3138).
    spurious = 1 if tuple(map(int, uvicorn.__version__.split(".")[:2])) < (0, 55) else 0
    assert sum("ASGI callable returned without completing handshake" in logged for logged in lines) == spurious
    assert len(lines) < 20, lines


@pytest.mark.internals
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


@pytest.mark.internals
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


@pytest.mark.internals
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


# --------------------------------------------------------------------------
# Request heads too large for the server, or for websockets' parser (raw sockets)
# --------------------------------------------------------------------------

UPGRADE = (b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


def handshake_head(target: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    """A WebSocket handshake's request head (and ``body``), with these header lines besides the handshake's own."""
    return b"GET " + target + b" HTTP/1.1\r\n" + UPGRADE + b"".join(line + b"\r\n" for line in headers) + b"\r\n" + body


def read_to_end(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (a reset ends it too); TimeoutError after TIMEOUT."""
    sock.settimeout(TIMEOUT)
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def first_answer(sock: socket.socket) -> bytes:
    """The server's first HTTP response, whole (by its content-length), or what came before it closed the
    connection; TimeoutError after TIMEOUT."""
    sock.settimeout(TIMEOUT)
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
            head, end, body = received.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            if end and len(body) >= (int(length[1]) if length else 0):
                break
    return received


def answer_to(server: Server, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before it was all sent
            sock.sendall(head)
        return read_to_end(sock)


def json_answer(answer: bytes) -> tuple[int, dict[str, str]]:
    """The status and the error object of an HTTP error response."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer
    return int(head.split()[1]), json.loads(body)["error"]


# uvicorn 0.55 answers the handshakes websockets refuses itself (websockets' text, or its own 400) and closes at
# once: its fix of the bug docs/upstream.md describes.  Before it, ws-micro's guarded protocol answers them.
UVICORN_ANSWERS_REFUSED_HANDSHAKES = tuple(map(int, uvicorn.__version__.split(".")[:2])) >= (0, 55)


def without_httptools(folder: Path) -> dict[str, str]:
    """The environment of a server whose uvicorn finds no httptools and parses HTTP with h11, as it does when
    installed without uvicorn[standard]."""
    (folder / "httptools.py").write_text("raise ImportError('hidden by the test: uvicorn falls back to h11')\n")
    return {"PYTHONPATH": str(folder)}


def open_descriptors(server: Server) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


# What ws-micro answers to the handshakes websockets' parser refuses, which uvicorn hands it after its own parser
# took them: the status, the error code and the start of the message.
REFUSED_BY_WEBSOCKETS = {
    "9 KB bearer token": (handshake_head(b"/ws/py_client", b"Authorization: Bearer " + b"a" * 9000),
                          431, "header 'authorization' is 9007 bytes long"),
    "9 KB token in the query": (handshake_head(b"/ws/py_client?token=" + b"a" * 9000), 414,
                                "the request line is 9035 bytes long"),
    "200 headers": (handshake_head(b"/ws/py_client", *(b"X-%d: y" % n for n in range(200))), 431,
                    "the request has 205 headers"),
    "a body": (handshake_head(b"/ws/py_client", b"Content-Length: 5", body=b"hello"), 400,
               "not a WebSocket handshake this server can read: unsupported request body"),
}


@pytest.mark.internals
@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_e2e_handshakes_websockets_refuses_are_answered_and_closed(parser: str, tmp_path: Path) -> None:
    # websockets refuses a line over 8192 bytes, more than 128 headers or a body by queueing its answer and
    # producing no event; uvicorn writes nothing until an event comes: no answer, no close, no deadline (the
    # socket had become a WebSocket), and uncounted: 300 of them against --max-connections 200 held 233
    # descriptors for more than 40 s, while /healthz said 0 connections.
    env = without_httptools(tmp_path) if parser == "h11" else None
    with run_server("--log-level", "warning", "--max-connections", "20", "--jwt-secret", JWT_SECRET,
                    "--close-timeout", "30", env=env) as server:  # the refused wait for their client to close
        before = open_descriptors(server)
        for case, (head, status, message) in REFUSED_BY_WEBSOCKETS.items():
            answer = await anyio.to_thread.run_sync(answer_to, server, head)  # answered, and closed
            if UVICORN_ANSWERS_REFUSED_HANDSHAKES:
                assert answer.startswith(b"HTTP/1.1 %d " % status), (case, answer)
                continue
            refused = json_answer(answer)
            assert refused[0] == status and refused[1]["message"].startswith(message), (case, answer)
            assert refused[1]["code"] == ("invalid_request" if status == 400 else "too_large"), case

        # Three times max_connections: each is answered (431, or 503 while the others count), and the server
        # closes its side; each counts against max_connections until the client has closed its own.
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) for _ in range(60)]
        try:
            for sock in socks:
                sock.sendall(REFUSED_BY_WEBSOCKETS["9 KB bearer token"][0])
            answers = [await anyio.to_thread.run_sync(read_to_end, sock) for sock in socks]
            assert all(answer.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 503 ")) for answer in answers), answers
            if not UVICORN_ANSWERS_REFUSED_HANDSHAKES:  # else each was closed at once, and counts no more
                assert server.get("/healthz").status_code == 503
        finally:
            for sock in socks:
                sock.close()
        await server.wait_until(lambda: open_descriptors(server) <= before, "the server to let go of the sockets")
        assert server.metric("ws_micro_rejected_handshakes_total", reason="too_large") == 3 + sum(
            answer.startswith(b"HTTP/1.1 431 ") for answer in answers)
        assert server.metric("ws_micro_rejected_handshakes_total", reason="invalid_request") == 1
        async with ws_client(server.ws, additional_headers={"Authorization": f"Bearer {mint()}"}) as (_, me):
            assert server.get(f"/api/clients/{me}").json()["user"] == "alice"


@pytest.mark.internals
@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_e2e_a_request_head_over_max_head_size_gets_431_and_the_server_keeps_none_of_it(
        parser: str, tmp_path: Path) -> None:
    # httptools keeps any head it is sent: one socket that streamed header lines for 4 s grew the server by
    # 590 MiB, before the head deadline cut it off.
    env = without_httptools(tmp_path) if parser == "h11" else None
    with run_server("--log-level", "warning", "--jwt-secret", JWT_SECRET, env=env) as server:
        before = rss_mib(server.process)

        def stream_a_head() -> tuple[int, bytes]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                lines, sent = (b"X-Padding: " + b"p" * 90 + b"\r\n") * 640, 0  # 64 KB at a time
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    while sent < 500_000_000:
                        sock.sendall(lines)
                        sent += len(lines)
                return sent, read_to_end(sock)

        sent, answer = await anyio.to_thread.run_sync(stream_a_head)
        assert sent < 10_000_000  # what the kernel's buffers took before the server closed
        assert json_answer(answer) == (431, {"code": "too_large", "message":
                                             "the request head is larger than 32768 bytes (max_head_size)"})
        assert rss_mib(server.process) - before < 5
        # A whole head past the limit at once: a token with 10,000 rooms, signed.
        huge = mint({"rooms": [f"room-{n}" for n in range(10_000)]})
        answer = await anyio.to_thread.run_sync(
            answer_to, server, handshake_head(b"/ws/py_client", f"Authorization: Bearer {huge}".encode()))
        assert json_answer(answer)[0] == 431
        # One within it is served, and so is a kept-alive connection's next request.
        padded = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"p" * 30_000 + b"\r\n\r\n"
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            for _ in range(2):
                sock.sendall(padded)
                response = b""
                while not response.endswith(b"}"):
                    response += await anyio.to_thread.run_sync(sock.recv, 4096)
                assert response.startswith(b"HTTP/1.1 200 OK\r\n"), response
        assert server.metric("ws_micro_rejected_handshakes_total", reason="too_large") == 2


@pytest.mark.parametrize("name", list(SERVERS))
async def test_e2e_oversized_handshakes_get_an_answer_or_a_close_under_each_asgi_server(name: str) -> None:
    # docs/configuration.md's table of request heads, for ws_micro:app served by each server.
    huge = mint({"rooms": [f"room-{n}" for n in range(10_000)]})  # 150 KB
    heads = {case: head for case, (head, _, _) in REFUSED_BY_WEBSOCKETS.items()}
    heads["a token with 10,000 rooms"] = handshake_head(b"/ws/py_client", f"Authorization: Bearer {huge}".encode())
    with run_server(asgi_server=name, env={"WS_MICRO_JWT_SECRET": JWT_SECRET}) as server:
        socks = {case: socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) for case in heads}
        try:
            for case, sock in socks.items():
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(heads[case])
            if name == "uvicorn" and not UVICORN_ANSWERS_REFUSED_HANDSHAKES:
                # uvicorn's bug before 0.55 (docs/upstream.md): websockets refuses each of these heads, and
                # uvicorn writes nothing and closes nothing; the app never sees them.
                for sock in socks.values():
                    sock.settimeout(0.5)
                    with pytest.raises(TimeoutError):
                        sock.recv(1)
                assert server.get("/healthz").json()["connections"] == 0
                return
            for case, sock in socks.items():  # a refusal, or a close (daphne: a line over 16 KiB)
                answer = await anyio.to_thread.run_sync(first_answer, sock)
                assert answer == b"" or int(answer.split()[1]) >= 400, (case, answer[:200])
        finally:
            for sock in socks.values():
                sock.close()


# --------------------------------------------------------------------------
# Tokens and the connect hook under each ASGI server (docs/auth.md)
# --------------------------------------------------------------------------


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


# Each server at its most verbose, its access log on: (server, its options, lines the log must still hold).
# hypercorn's and granian's access logs print no query or header by default: these formats print them.
VERBOSE_LOGS: dict[str, tuple[str | None, tuple[str, ...], tuple[str, ...]]] = {
    "ws-micro-debug": (None, ("--log-level", "debug"), (
        "< authorization: [redacted]", "< cookie: [redacted]", "< x-ws-micro-resume-token: [redacted]",
        '"WebSocket /ws/py_client?token=[redacted]&resume_token=[redacted]" [accepted]')),
    "ws-micro-trace": (None, ("--log-level", "trace"), (
        "< authorization: [redacted]", "'query_string': b'token=[redacted]&resume_token=[redacted]'")),
    "uvicorn-debug": ("uvicorn", ("--log-level", "debug"), (  # compressed: frames go through ASGI, and are logged
        "< authorization: [redacted]", "< x-ws-micro-resume-token: [redacted]", "> TEXT '{\"event\":\"connect\"",
        '"GET /ws/py_client?token=[redacted]&resume_token=[redacted] HTTP/1.1" 426')),
    "uvicorn-trace": ("uvicorn", ("--log-level", "trace"), (
        "< cookie: [redacted]", "'query_string': b'token=[redacted]&resume_token=[redacted]'")),
    "uvicorn-wsproto-trace": ("uvicorn-wsproto", ("--log-level", "trace"), (
        "'query_string': b'token=[redacted]'",)),
    "hypercorn-debug": ("hypercorn", (
        "--log-level", "debug", "--access-logfile", "-", "--error-logfile", "-", "--access-logformat",
        '"%(R)s" %(s)s %({authorization}i)s cookie=%({cookie}i)s resume=%({x-ws-micro-resume-token}i)s'), (
        '"GET /ws/py_client?token=[redacted]&resume_token=[redacted] 1.1" 101',
        "Bearer [redacted] cookie=[redacted]")),
    "granian-debug": ("granian", (
        "--log-level", "debug", "--access-log", "--access-log-fmt",
        '"%(method)s %(path)s?%(query_string)s" %(status)d %(header{authorization})s cookie=%(header{cookie})s'), (
        '/ws/py_client?token=[redacted]&resume_token=[redacted]" 101', "Bearer [redacted] cookie=[redacted]")),
    "daphne-verbosity-2": ("daphne", ("-v", "2", "--access-log", "-"), (
        '"GET /ws/py_client?token=[redacted]&resume_token=[redacted]" 426',)),
}


async def send_tokens_every_way(server: Server, token: str) -> list[str]:
    """Send ``token`` in the Authorization header and in the query, a cookie, and resume tokens in their header
    and in the query; the secrets the log must not hold."""
    cookie = secrets.token_urlsafe(16)
    first, me, resume = await new_session(server.ws, additional_headers={"Authorization": f"Bearer {token}",
                                                                         "Cookie": f"session={cookie}"})
    await drop(first, server, me)
    second = await connect(f"{server.ws}?token={token}", additional_headers={RESUME_TOKEN_HEADER: resume})
    again = (await greeted(second))["data"]["data"]
    assert again["recovered"] is True, again
    await drop(second, server, me)
    third = await connect(f"{server.ws}?token={token}&resume_token={again['resume_token']}")
    last = (await greeted(third))["data"]["data"]
    assert last["recovered"] is True, last
    await third.close()
    probed = await anyio.to_thread.run_sync(
        lambda: server.get(f"/ws/py_client?token={token}&resume_token={last['resume_token']}"))
    assert probed.status_code == 426
    issued = [resume, again["resume_token"], last["resume_token"]]
    return [token, cookie, *issued, *(issued_token.split(".", 1)[1] for issued_token in issued)]


@pytest.mark.parametrize("config", list(VERBOSE_LOGS))
async def test_e2e_tokens_never_reach_the_log_at_any_level_under_each_server(config: str, tmp_path: Path) -> None:
    # At DEBUG, websockets logged "< authorization: Bearer <token>" for each handshake; at TRACE, uvicorn logged
    # each scope with query_string b'token=<token>'; daphne's access log and any format printing hypercorn's or
    # granian's query or headers printed them whole.
    name, options, expected = VERBOSE_LOGS[config]
    log = tmp_path / "server.log"
    env = {"WS_MICRO_JWT_SECRET": JWT_SECRET, "WS_MICRO_RECOVERY_WINDOW": "30"}
    with run_server(*options, asgi_server=name, log=log, env=env) as server:  # name None: ws-micro
        leaked = await send_tokens_every_way(server, mint())
    logged = log.read_text()
    for secret in leaked:
        assert secret not in logged, f"{secret} is in the log"
    for line in expected:  # still written, with the secret redacted
        assert line in logged, logged[-3000:]


# --------------------------------------------------------------------------
# The core alone, and its siblings' checks (the layout of docs/embedding.md's "Which files to copy")
# --------------------------------------------------------------------------


def copy_modules(folder: Path, *names: str, replace: tuple[str, str, str] | None = None) -> None:
    """Copy these modules of the checkout into ``folder``; ``replace``: (module, pattern, text), a regular
    expression replaced once in that module's copy, as if it came from another release."""
    for name in names:
        source = (ROOT / name).read_text()
        if replace is not None and replace[0] == name:
            source, count = re.subn(replace[1], replace[2], source, count=1)
            assert count == 1, f"{replace[1]!r} is not in {name}"
        (folder / name).write_text(source)


async def ping(server: Server) -> None:
    async with ws_client(server.ws, compression=None) as (ws, me):  # plain uvicorn offers compression
        await ws.send(json.dumps(frame("ping", me, {"n": 1})))
        assert await recv_json(ws) == frame("pong", me, {"n": 1})


@pytest.mark.parametrize("uvicorn_app", [False, True], ids=["python-ws_micro.py", "uvicorn-ws_micro:app"])
async def test_the_core_copied_alone_serves_and_says_once_that_frames_go_through_asgi(
        uvicorn_app: bool, tmp_path: Path) -> None:
    # An installed ws-micro's siblings are not beside the copy: they must not be picked up.
    copy_modules(tmp_path, "ws_micro.py")
    log = tmp_path / "server.log"
    with run_server(uvicorn_app=uvicorn_app, cwd=tmp_path, log=log) as server:
        assert server.get("/healthz").json() == {"status": "ok", "connections": 0}
        await ping(server)
        await ping(server)
        assert server.metric("ws_micro_fast_path") == 0
    text = log.read_text()
    if not uvicorn_app:  # plain uvicorn shows no INFO line of ws_micro's logger
        assert text.count("fast path off: ws_micro_servers.py is not beside ws_micro.py") == 1, text
    assert "Traceback" not in text and "WARNING" not in text, text


async def test_a_servers_module_of_another_version_is_refused_with_one_warning(tmp_path: Path) -> None:
    copy_modules(tmp_path, "ws_micro.py", "ws_micro_servers.py",
                 replace=("ws_micro_servers.py", r'__version__ = "[^"]+"', '__version__ = "0.0.1"'))
    log = tmp_path / "server.log"
    with run_server(cwd=tmp_path, log=log) as server:
        await ping(server)
        await ping(server)
        assert server.metric("ws_micro_fast_path") == 0
    text = log.read_text()
    warnings = [line for line in text.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, text
    assert f"ws_micro_servers.py 0.0.1 cannot run beside ws_micro.py {ws_micro.__version__}" in warnings[0]


@pytest.mark.internals
async def test_an_untested_uvicorn_turns_the_servers_module_off_with_one_warning_naming_it(tmp_path: Path) -> None:
    # As when a uvicorn newer than the module knows is installed: the gateway runs on ASGI alone.
    copy_modules(tmp_path, "ws_micro.py", "ws_micro_servers.py",
                 replace=("ws_micro_servers.py", r'"uvicorn": \(\([\d, ]+\), \([\d, ]+\)\)',
                          '"uvicorn": ((0, 1), (0, 2))'))
    log = tmp_path / "server.log"
    with run_server("--handshake-timeout", "0.5", cwd=tmp_path, log=log) as server:
        await ping(server)
        await ping(server)
        assert server.metric("ws_micro_fast_path") == 0
        # The deadline on request heads is off too: a silent socket is not answered 408.
        with socket.create_connection(("127.0.0.1", server.port)) as silent:
            silent.settimeout(1.5)
            with pytest.raises(TimeoutError):
                silent.recv(1)
    text = log.read_text()
    warnings = [line for line in text.splitlines() if "WARNING" in line]
    version = importlib.metadata.version("uvicorn")
    assert len(warnings) == 1, text
    assert (f"uvicorn {version} is not a version ws_micro_servers.py was tested with "
            "(0.1 up to, not including, 0.2)") in warnings[0]
    assert "fast path" in warnings[0] and "deadline on request heads" in warnings[0]


@pytest.mark.internals
async def test_a_gateway_vendored_in_a_package_finds_its_siblings_there(tmp_path: Path) -> None:
    # myapp/ws_micro.py with its siblings beside it, mounted by the host app: as embedding.md shows.
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    copy_modules(package, "ws_micro.py", "ws_micro_servers.py", "ws_micro_redis.py")
    (tmp_path / "host.py").write_text(
        "from myapp.ws_micro import _redis_backend, create_app\n"
        "app = create_app(static_dir='')\n"
        "cluster = create_app(redis_url='redis://127.0.0.1:1', static_dir='')  # its module loads\n"
        "assert type(cluster.state.registry._backend).__module__ == 'myapp.ws_micro_redis'\n")
    log = tmp_path / "server.log"
    with run_server(uvicorn_app="host:app", cwd=tmp_path, log=log) as server:
        await ping(server)
        assert server.metric("ws_micro_fast_path") == 1
    assert "WARNING" not in log.read_text() and "Traceback" not in log.read_text(), log.read_text()


def test_a_core_copy_beside_another_imported_ws_micro_refuses_its_siblings_saying_why(tmp_path: Path) -> None:
    # This process imported the checkout's ws_micro: a vendored copy's siblings would get that one.
    package = tmp_path / "vendored"
    package.mkdir()
    (package / "__init__.py").write_text("")
    copy_modules(package, "ws_micro.py", "ws_micro_redis.py")
    sys.path.insert(0, str(tmp_path))
    try:
        vendored = importlib.import_module("vendored.ws_micro")
        with pytest.raises(ValueError, match=r"needs the ws_micro.py beside it .* but another module named "
                                             r"ws_micro is imported already"):
            vendored.create_app(redis_url="redis://127.0.0.1:1", static_dir="")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name.startswith("vendored")]:
            del sys.modules[name]
