"""Shared fixtures and helpers for ws_micro's tests.

In process: frames and the gateway under Starlette's TestClient.  End to end:
the gateway as a real process on a free loopback port (``run_server``, the
module-scoped ``server``), real `websockets` clients and raw sockets,
redis-server for cluster mode, and real backends for the connect hook and
forwarding.

Tests are marked by what they start: ``process`` (a server, redis-server or
Chromium), ``redis`` and ``browser``.  The helpers here fail a test that
starts one of these without its mark, so that ``-m "not process"`` is the
fast, in-process loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterator
from pathlib import Path
from typing import Any, Self

import anyio
import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import ws_micro
from ws_micro import create_app

ROOT = Path(__file__).parent.parent  # the repository: servers run from it, docs are read from it
LOOPBACK = ("127.0.0.1", 50000)
LOCAL = "http://localhost"  # a loopback name: without a token, the API answers no other Host
JSON = {"Content-Type": "application/json"}
TIMEOUT = 10  # seconds any single wait may take before the test fails


# --------------------------------------------------------------------------
# Marks: what a test starts, it must be marked with
# --------------------------------------------------------------------------

_running: pytest.Item | None = None  # the test being run, from its setup to its teardown


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    global _running
    _running = item
    try:
        return (yield)
    finally:
        _running = None


def require_marks(doing: str, *marks: str) -> None:
    """Fail the running test unless it carries each of ``marks``, which what it is ``doing`` needs.

    ``-m "not process"`` (the fast loop), ``-m "not redis"`` and ``-m "not browser"`` go by the marks: a
    mark forgotten would put a slow test in the fast loop, or a test that needs redis-server or Chromium
    where they are not installed.
    """
    item = _running
    if item is None:  # not during a test: a helper used by hand
        return
    missing = [mark for mark in marks if item.get_closest_marker(mark) is None]
    if missing:
        pytest.fail(f"{item.nodeid} {doing}, so it must be marked "
                    f"{' and '.join(f'@pytest.mark.{mark}' for mark in missing)} "
                    "(on the test, or in its module's pytestmark)", pytrace=False)


def _require_process_for_subprocesses(event: str, args: tuple[Any, ...]) -> None:
    """An audit hook: any subprocess a test starts (a server, the CLI, Chromium's driver) needs ``process``."""
    if event == "subprocess.Popen" and _running is not None:
        require_marks(f"starts a process ({Path(os.fsdecode(args[0])).name})", "process")


sys.addaudithook(_require_process_for_subprocesses)


def pytest_report_header() -> str:
    """The versions the servers' tests ran under: ws_micro_servers.py knows only those in its TESTED table."""
    import importlib.metadata

    packages = ("uvicorn", "websockets", "starlette", "hypercorn", "granian", "daphne", "redis")
    return "servers: " + ", ".join(f"{name} {importlib.metadata.version(name)}" for name in packages)


# --------------------------------------------------------------------------
# Frames and the gateway, in process
# --------------------------------------------------------------------------


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
# A real server process and real clients
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
               open_files: int | None = None, asgi_server: str | None = None,
               asgi_app: str = "ws_micro:app") -> Iterator[Server]:
    """Start the gateway as its own process (on a free port by default); stop it (SIGTERM, then kill) in finally.

    ``uvicorn_app``: run ``uvicorn ws_micro:app``, or uvicorn with that app; ``asgi_server``: run
    ``asgi_app`` under that ASGI server instead (see SERVERS); ``log``: a file for its output;
    ``open_files``: its file-descriptor limit, soft and hard.
    """
    require_marks("starts a server process (run_server)", "process")
    port = port or free_port()
    if asgi_server is not None:
        command = [sys.executable, "-m", *(asgi_app if part == "ws_micro:app" else part
                                           for part in SERVERS[asgi_server](port)), *args]
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


@pytest.fixture(scope="session")
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


# --------------------------------------------------------------------------
# Raw sockets, and servers that misbehave
# --------------------------------------------------------------------------


def rss_mib(process: subprocess.Popen[str]) -> float:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {process.pid}")


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


def server_texts(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    """Read ``count`` unmasked text frames (shorter than 64 KiB) the server writes, as JSON."""
    received, texts = b"", list[dict[str, Any]]()
    while len(texts) < count:
        while len(received) >= 2 and len(received) >= (end := frame_end(received)):
            assert received[0] == 0x81, received[:2]  # a whole text frame
            texts.append(json.loads(received[end - (received[1] if received[1] < 126 else
                                                      int.from_bytes(received[2:4], "big")):end]))
            received = received[end:]
        if len(texts) < count:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {texts}"
            received += chunk
    return texts


def frame_end(received: bytes) -> int:
    """Where the server frame at the start of ``received`` ends (past its end if its head is incomplete)."""
    length = received[1] & 0x7F
    if length < 126:
        return 2 + length
    return 4 + int.from_bytes(received[2:4], "big") if len(received) >= 4 else 1 << 30


def segments_in(sock: Any) -> int:
    """The TCP segments a client's socket has received (tcp_info's tcpi_segs_in, Linux): on loopback, about one for
    each write the server made to it (it sets TCP_NODELAY), and its ACKs.  Counted on the client, whatever system
    call the server's event loop writes with (uvloop's write(), asyncio's send())."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, 140)[0])  # after tcpi_bytes_received


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


@contextlib.contextmanager
def relaying_gateway(*frames: dict[str, Any]) -> Iterator[str]:
    """A WebSocket server that sends ``frames`` to whoever connects, as a gateway that relays any event name would."""
    require_marks("starts a WebSocket server in a thread (relaying_gateway)", "process")
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


# --------------------------------------------------------------------------
# A socket the test controls
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


# --------------------------------------------------------------------------
# redis-server, and gateways that use it
# --------------------------------------------------------------------------


REDIS_SERVER = os.environ.get("WS_MICRO_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
FAST_HEARTBEAT = ("--heartbeat-interval", "0.2", "--instance-ttl", "1.0")


class RedisServer:
    """An empty, unpersisted redis-server on loopback; ``options`` are added to its command line (``password``
    must be among them as ``--requirepass``, for :meth:`command`)."""

    def __init__(self, port: int, *options: str, password: str | None = None) -> None:
        self.port, self.options, self.password = port, options, password
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def command_line(self) -> list[str]:
        return [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                *self.options]

    def start(self) -> None:
        """Start it and wait until it answers PING (or asks for the password)."""
        require_marks("starts redis-server", "process", "redis")
        assert Path(REDIS_SERVER).is_file(), f"the cluster tests need {REDIS_SERVER}: apt-get install redis-server"
        self.process = subprocess.Popen(self.command_line(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert self.process.poll() is None, "redis-server exited"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith((b"+PONG\r\n", b"-NOAUTH")):
                    return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)

    def command(self, *args: str) -> Any:
        import redis

        with redis.Redis(port=self.port, password=self.password, decode_responses=True) as client:
            return client.execute_command(*args)


class SentinelServer(RedisServer):
    """``redis-server --sentinel`` on loopback, watching ``primary`` as service ``svc`` (quorum 2), with a
    config file of its own in ``folder`` (Sentinel rewrites it); fast to judge a primary down and to fail over."""

    def __init__(self, port: int, folder: Path, primary: RedisServer, *, password: str | None = None,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 2000) -> None:
        super().__init__(port, password=password)
        self.config = folder / f"sentinel-{port}.conf"
        lines = [f"port {port}", "bind 127.0.0.1", f"dir {folder}",
                 f"sentinel monitor svc 127.0.0.1 {primary.port} 2",
                 f"sentinel down-after-milliseconds svc {down_after_ms}",
                 f"sentinel failover-timeout svc {failover_timeout_ms}"]
        if primary.password:
            lines.append(f"sentinel auth-pass svc {primary.password}")
        if password:  # clients and the other sentinels must give it
            lines += [f"requirepass {password}", f"sentinel sentinel-pass {password}"]
        self.config.write_text("\n".join(lines) + "\n")

    def command_line(self) -> list[str]:
        return [REDIS_SERVER, str(self.config), "--sentinel"]


def cluster_dropped(server: Server) -> float:
    """``ws_micro_cluster_dropped_total``, every reason together: the frames refused to their senders."""
    return sum(sample.value for family in text_string_to_metric_families(server.get("/metrics").text)
               for sample in family.samples if sample.name == "ws_micro_cluster_dropped_total")


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


class CuttingProxy:
    """A TCP proxy on a free loopback port in front of a server's ``port`` (a gateway for a browser, or a Redis for an
    instance), for a client to reach the server through. ``cut()`` ends every connection through it as a network
    failure does: each of its two sockets is reset (SO_LINGER 0), so neither end gets a close frame or even a FIN.
    With ``hold``, every connection that comes after is reset as soon as it is accepted, until ``release()``; with
    ``upgrades``, that many of the WebSocket connections that come after are reset as soon as the server accepts
    them, before the browser sees the server's answer. ``stall()`` loses what the server sends from then on, on the
    connections open then, as a network does that fails while frames are on their way. ``pause()`` is a partition
    that heals: what the clients send on the connections open then is held (neither lost nor refused: TCP
    retransmits it), and every connection that comes after is reset, until ``resume()`` passes on what was held, in
    order, and ``release()`` lets new connections in."""

    def __init__(self, port: int) -> None:
        require_marks("starts a proxy in a thread (CuttingProxy)", "process")
        self.target = port
        self._holding = False
        self._upgrades = 0
        self._links: set[asyncio.StreamWriter] = set()
        self._stalled: set[asyncio.StreamWriter] = set()
        self._flowing: asyncio.Event | None = None  # made in the proxy's loop; cleared while paused
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
            if self._flowing is not None:  # a paused pipe ends on its reset socket, not waiting
                self._flowing.set()
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

    def pause(self) -> None:
        async def pause() -> None:
            self._holding = True
            if self._flowing is None:
                self._flowing = asyncio.Event()
            self._flowing.clear()
        self._call(pause())

    def resume(self) -> None:
        async def resume() -> None:
            if self._flowing is not None:
                self._flowing.set()
        self._call(resume())

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
                if upstream is None and self._flowing is not None:  # towards the server: held while paused
                    await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.close()


# --------------------------------------------------------------------------
# Tokens, and backends the gateway calls
# --------------------------------------------------------------------------


JWT_SECRET = "test-secret-that-is-long-enough-for-hs256!"
BACKEND_SECRET = "backend-secret-for-signing-hook-requests"


def mint(claims: dict[str, Any] | None = None, key: Any = JWT_SECRET, algorithm: str = "HS256",
         lifetime: float = 60, **headers: Any) -> str:
    """A token as a backend mints one: ``sub`` alice, expiring in ``lifetime`` seconds, unless ``claims`` say
    (a claim set to None is left out)."""
    import jwt

    payload = {"sub": "alice", "exp": int(time.time() + lifetime), **(claims or {})}
    return jwt.encode({name: value for name, value in payload.items() if value is not None}, key,
                      algorithm=algorithm, headers=headers or None)


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
        require_marks(f"starts a backend server in a thread ({type(self).__name__})", "process")
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
    asks: grant, 401, 403, slowly (a grant after ``delay`` seconds, 1 by default), 500, garbage, a grant
    out of bounds or nested too deep."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        super().__init__("/hook", self.answer)

    async def answer(self, asked: dict[str, Any]) -> Any:
        self.requests.append(asked)
        mode = asked["query"].get("mode", "grant")
        if mode == "slow":  # by default longer than the gateway's connect_hook_timeout
            await anyio.sleep(float(asked["query"].get("delay", 1)))
        if mode in ("401", "403", "500"):
            return JSONResponse({"error": mode}, int(mode))
        if mode == "garbage":
            return PlainTextResponse("<html>oops</html>")
        if mode == "unbounded":
            return JSONResponse({"user": "alice", "meta": {"blob": "x" * 5000}})
        if mode == "empty":
            return Response(status_code=204)
        if mode == "nested":  # a grant whose meta nests deeper than any parser recurses
            return Response(b'{"user": "alice", "meta": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
                            media_type="application/json")
        user = asked["headers"].get("cookie", "session=nobody").partition("=")[2]
        return JSONResponse({"user": user, "rooms": ["team:42"], "publish": ["team:*"], "meta": {"plan": "pro"}})


class EventBackend(BackendServer):
    """Takes forwarded events and notices at ``/events``, keeping each body in arrival order.

    An event is answered as its ``data.mode`` says: ``reply`` (two frames, numbered), ``none`` (204),
    ``500``, ``garbage``, ``nested`` (too deep), ``slow`` (its reply after ``data.delay`` seconds, 1 by
    default). The first ``failing`` notices get 500. A batch (an array: forward_batch) is answered with
    the array of its events' answers (500 if one of them is), once the slowest is.
    """

    def __init__(self, failing: int = 0, notice_delay: float = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.failing = failing
        self.notice_delay = notice_delay  # seconds each notice takes to be answered (under forward_timeout)
        self.notices_at_once = self.most_notices_at_once = 0
        self.batches: list[int] = []  # the size of each batch taken
        super().__init__("/events", self.answer)

    async def answer(self, body: dict[str, Any] | list[dict[str, Any]]) -> Any:
        if isinstance(body, list):  # a batch (forward_batch): each event answered as alone, all at once
            self.batches.append(len(body))
            answers = await asyncio.gather(*(self.answer(event) for event in body))
            if any(answer.status_code != 200 and answer.status_code != 204 for answer in answers):
                return JSONResponse({"error": "boom"}, 500)
            return JSONResponse([json.loads(answer.body) if answer.status_code == 200 else None
                                 for answer in answers])
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
            await anyio.sleep(body["data"].get("delay", 1))
        if mode == "500":
            return JSONResponse({"error": "boom"}, 500)
        if mode == "garbage":
            return PlainTextResponse("<html>oops</html>")
        if mode == "nested":  # an answer nested deeper than any parser recurses
            return Response(b'{"events": [{"event": "x", "data": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}]}",
                            media_type="application/json")
        n = body["data"].get("n", 0)
        return JSONResponse({"events": [{"event": "ack", "data": {"n": n, "part": 1}},
                                        {"event": "ack", "data": {"n": n, "part": 2}}]})

    def notices(self, client_id: str) -> list[tuple[str, str | None]]:
        return [(body["type"], body.get("reason")) for body in self.received
                if body["client_id"] == client_id and body["type"] != "event"]


def forward_options(url: str, *more: str) -> tuple[str, ...]:
    return ("--forward-url", url, "--backend-secret", BACKEND_SECRET, "--forward-timeout", "0.5", *more)


# --------------------------------------------------------------------------
# Requests and replies: an app whose handlers reply, in every way a handler may
# --------------------------------------------------------------------------

REPLYING_APP = '''
import asyncio
import os

from ws_micro import Registry, Settings, create_app, options_from_env

registry = Registry()


@registry.on("add")
async def add(client_id, event):
    return {"sum": sum(event.data.data["numbers"]), "id": event.id}  # its reply: data.data of an "add" frame


@registry.on("rename")
async def rename(client_id, event):
    return "added", {"n": event.data.data.get("n")}


@registry.on("quiet")
async def quiet(client_id, event):
    return None  # no reply, as before handlers could reply


@registry.on("bad")
async def bad(client_id, event):
    return 42


@registry.on("forge")
async def forge(client_id, event):
    return "pong", {"forged": True}


@registry.on("boom")
async def boom(client_id, event):
    raise ZeroDivisionError("boom")


@registry.on("slow")
async def slow(client_id, event):
    await asyncio.sleep(0.05)  # an answer that must wait: the connection's frames after it wait too
    return {"slept": True}


app = create_app(registry=registry, **options_from_env(Settings, os.environ))  # the WS_MICRO_* variables env= sets
'''


@contextlib.contextmanager
def replying_server(folder: Path, *args: str, env: dict[str, str] | None = None,
                    log: Path | None = None) -> Iterator[Server]:
    """The gateway serving REPLYING_APP (written to ``folder``) under uvicorn."""
    (folder / "replying_app.py").write_text(REPLYING_APP)
    with run_server("--host", "127.0.0.1", *args, uvicorn_app="replying_app:app", log=log,
                    env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(folder)]), **(env or {})}) as server:
        yield server


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Wait, polling, for state another process (the backend's thread) changes; fail after TIMEOUT."""
    with anyio.move_on_after(TIMEOUT):
        while not predicate():  # noqa: ASYNC110 - the state lives in another thread, which has no event for us
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------
# A host app with lifecycle hooks
# --------------------------------------------------------------------------


# It writes each call of its hooks as a JSON line to the file HOOK_LOG names (read with hook_calls()), and
# its on_connect does what the token's meta says.  Its routes PUT and DELETE /members/{client_id}/{room}
# call registry.join() and leave() (then, with ?publish=<event>, registry.publish() to the room).
# Settings come from the WS_MICRO_* variables; HOOK_TIMEOUT and HOOK_MAX_RUNNING, if set, replace
# ws_micro's.  The on_disconnect of user "slowpoke" hangs.
HOOKS_APP = """
import contextlib
import json
import os

import anyio
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import ws_micro
from ws_micro import Refuse, Registry, Settings, create_app, options_from_env

ws_micro.HOOK_TIMEOUT = float(os.environ.get("HOOK_TIMEOUT", ws_micro.HOOK_TIMEOUT))
ws_micro.HOOK_MAX_RUNNING = int(os.environ.get("HOOK_MAX_RUNNING", ws_micro.HOOK_MAX_RUNNING))
registry = Registry()


def record(*call):
    with open(os.environ["HOOK_LOG"], "a") as log:
        log.write(json.dumps(call) + "\\n")


@registry.on_connect
async def connected(client_id, user, meta):
    record("connect", client_id, user)
    mode = (meta or {}).get("mode")
    if mode == "refuse":
        raise Refuse(f"not today, {user}")
    if mode == "long":
        raise Refuse("\u00e9" * 100)
    if mode == "false":
        return False
    if mode == "raise":
        raise RuntimeError("the database is down")
    if mode == "hang":
        await anyio.sleep(3600)
    if mode == "answer":
        return "yes"
    for room in (meta or {}).get("rooms", []):
        assert await registry.join(client_id, room)
    return None


@registry.on_disconnect
async def disconnected(client_id, user, reason):
    record("disconnect", client_id, user, reason)
    if user == "grumpy":
        raise KeyError(user)
    if user == "slowpoke":
        await anyio.sleep(3600)


async def member(request):
    client_id, room = request.path_params["client_id"], request.path_params["room"]
    try:
        found = await (registry.join if request.method == "PUT" else registry.leave)(client_id, room)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, 400)
    if "publish" not in request.query_params:
        return JSONResponse({"found": found})
    return JSONResponse({"found": found, "delivered": await registry.publish(room, request.query_params["publish"])})


gateway = create_app(registry=registry, **options_from_env(Settings, os.environ))


@contextlib.asynccontextmanager
async def lifespan(app):
    async with gateway.router.lifespan_context(gateway):
        yield


app = Starlette(routes=[Route("/members/{client_id}/{room:path}", member, methods=["PUT", "DELETE"]),
                       Mount("/", app=gateway)], lifespan=lifespan)
"""


def hooks_app(folder: Path, **env: str) -> dict[str, str]:
    """Write HOOKS_APP to ``folder`` as hooks.py; the environment of a server running it as ``hooks:app`` from
    there, with ``env`` and tokens signed with JWT_SECRET."""
    (folder / "hooks.py").write_text(HOOKS_APP)
    return {"PYTHONPATH": str(ROOT), "HOOK_LOG": str(folder / "hooks.jsonl"), "WS_MICRO_JWT_SECRET": JWT_SECRET,
            **env}


def hook_calls(folder: Path, client_id: str | None = None) -> list[list[Any]]:
    """The calls of the hooks so far (each ``[hook, client_id, user, reason]``), or those for one client."""
    log = folder / "hooks.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [call for call in calls if client_id is None or call[1] == client_id]


# --------------------------------------------------------------------------
# Connection recovery
# --------------------------------------------------------------------------


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
