"""Benchmark ws_micro against the tutorial's server, a bare-ASGI ceiling, and Node's servers.

Each server runs as its own process (uvicorn, or node for node_ws and uws) pinned to CPU 0;
this process, the load generator (picows on uvloop), is pinned to CPU 1.  Every scenario runs
``--runs`` times, the servers in a different order each round, and the table
shows medians and the ratio to the tutorial's server.  The machine is shared and
noisy: read the ratios, take the absolute numbers as context only.

    pip install '.[bench]'
    python bench_ws_micro.py                 # every scenario, 3 rounds
    python bench_ws_micro.py --runs 5 --only echo,relay --json results.json
    python bench_ws_micro.py --runs 5 --only handshakes --servers ws_micro,jwt,jwt_rs256,hook,backend
    python bench_ws_micro.py --runs 5 --only fanout_api,fanout_room --servers ws_micro,recovery --warmup-frames 1000
    python bench_ws_micro.py --runs 3 --only connections,away,away_empty --servers ws_micro,recovery
    python bench_ws_micro.py --runs 5 --only echo,relay,fanout_api,fanout_room,connections \
        --servers ws_micro,ceiling,node_ws,uws

Servers (the Python ones all on the same uvicorn, its default settings):
    ws_micro   uvicorn ws_micro:app                   (as shipped)
    tutorial   uvicorn bench.tutorial_server:app      (FastAPI + pydantic, send_json)
    ceiling    uvicorn bench.ceiling_server:app       (bare ASGI + msgspec, no framework)
    cluster    two ws_micro instances and a redis-server, all on the server's CPU; clients
               alternate between the instances, so every relay and half of every fan-out
               crosses Redis (compare it with ws_micro: --only relay,fanout_api,fanout_room
               --servers ws_micro,cluster)
    cluster_local  the same, with every client on the first instance: what cluster mode costs
               the relays and fan-outs that never leave their instance (the second instance and
               Redis idle, their CPU counted)
    jwt        ws_micro with WS_MICRO_JWT_SECRET; every handshake brings an HS256 token (minted
               once, up front) as Authorization: Bearer (jwt_query: as ?token= instead)
    jwt_fresh  jwt, with a token never seen before for each handshake (the gateway remembers the
               tokens it verified, so jwt measures a reconnect with the token a client has)
    jwt_rs256  the same with WS_MICRO_JWT_PUBLIC_KEY, a PEM file of an RSA-2048 key: RS256 tokens
    hook       ws_micro with WS_MICRO_CONNECT_HOOK_URL and WS_MICRO_BACKEND_SECRET, asking
               bench/hook_backend.py (its own uvicorn process, on the server's CPU too, so a
               hook's cost includes the backend's CPU); handshakes bring a session cookie
    backend    bench/hook_backend.py alone, for the handshakes scenario only: the same signed
               POSTs the gateway makes, sent by this process (aiohttp) one at a time and then
               --openers at a time: the backend's own answer time, to set against the hook's cost
    forward    ws_micro with WS_MICRO_FORWARD_URL to bench/hook_backend.py (on the generator's CPU),
               for the forward scenario; forward_before: the same with --before REF's modules;
               forward_batch: the same with WS_MICRO_FORWARD_BATCH=--forward-batch (events in batches);
               forward_batch_before: forward_batch with --before REF's modules
    recovery   ws_micro with connection recovery on (WS_MICRO_RECOVERY_WINDOW, --recovery-window
               seconds; --away-window in the away scenarios), its bounds at their defaults: every
               connection keeps the last frames sent to it (compare it with ws_micro, where it is off)
    node_ws    node bench/node_ws_server.js: Node's http server and the ws library (with bufferutil)
    uws        node bench/uws_server.js: uWebSockets.js, from the npm registry's build of it,
               @trufflesuite/uws-js-unofficial (the official package is on GitHub only)
               Both speak what the ceiling speaks (the connect frame, echo, `to` relays, room
               frames, POST /api/broadcast with each receiver's client_id in its frame) and parse
               every frame with JSON.parse.  A room frame goes to the room's members (the
               ceiling's, to every connection: in the fan-out all join, so the same receivers); uws
               sends it with its own pub/sub (one publish, the copies made in C++), node_ws in a
               loop.  Server CPU is the node process's, all its threads.  Their packages, pinned by
               bench/package-lock.json, are installed into bench/node_modules by `npm ci` on first
               use (node and npm must be on PATH).  The scenarios that read ws_micro's /metrics
               (away, away_empty) mean nothing for them, nor for the ceiling.
The tokens and the hook grant any room and `to` relays, so every scenario runs under them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import hashlib
import hmac
import itertools
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil  # type: ignore[import-untyped]
from picows import WSCloseCode, WSError, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

HERE = Path(__file__).parent
SERVERS = {
    "ws_micro": "ws_micro:app",
    "tutorial": "bench.tutorial_server:app",
    "ceiling": "bench.ceiling_server:app",
    "cluster": "ws_micro:app",  # twice, with WS_MICRO_REDIS_URL
    "cluster_local": "ws_micro:app",  # the same, every client on the first instance
    "cluster_before": "ws_micro:app",  # cluster, with the modules of --before REF
    "cluster_local_before": "ws_micro:app",  # cluster_local, with the modules of --before REF
    "before": "ws_micro:app",  # --before REF: the modules as of that commit, from BEFORE_DIR
    "granian": "ws_micro:app",  # ws_micro under granian (one worker) instead of uvicorn
    "hypercorn": "ws_micro:app",  # ws_micro under hypercorn (one worker)
    "jwt": "ws_micro:app",  # with WS_MICRO_JWT_SECRET, tokens in the Authorization header
    "jwt_query": "ws_micro:app",  # the same, tokens in ?token=
    "jwt_rs256": "ws_micro:app",  # with WS_MICRO_JWT_PUBLIC_KEY (RSA-2048)
    "jwt_fresh": "ws_micro:app",  # with WS_MICRO_JWT_SECRET, a token never seen before for each handshake
    "forward": "ws_micro:app",  # with WS_MICRO_FORWARD_URL to bench/hook_backend.py on the generator's CPU
    "forward_before": "ws_micro:app",  # forward, with the modules of --before REF
    "forward_batch": "ws_micro:app",  # forward, with WS_MICRO_FORWARD_BATCH (--forward-batch): events in batches
    "forward_batch_before": "ws_micro:app",  # forward_batch, with the modules of --before REF
    "hook": "ws_micro:app",  # with WS_MICRO_CONNECT_HOOK_URL, and the backend beside it
    "backend": "bench.hook_backend:app",  # the hook's backend alone (the handshakes scenario only)
    "recovery": "ws_micro:app",  # with WS_MICRO_RECOVERY_WINDOW: connection recovery on
    "node_ws": "bench/node_ws_server.js",  # Node's ws (JavaScript): the ceiling's protocol subset
    "uws": "bench/uws_server.js",  # uWebSockets.js (C++ under JavaScript handlers): the same subset
}
NODE_SERVERS = ("node_ws", "uws")  # node processes, their packages installed by node_packages()
BEFORE_DIR = Path(tempfile.gettempdir()) / f"ws_micro_before_{os.getpid()}"
AUTH_DIR = Path(tempfile.gettempdir()) / f"ws_micro_auth_{os.getpid()}"  # the RSA public key's PEM file
BACKEND_SECRET = "bench-backend-secret"
HOOK_PATH = "/ws-connect"
EVENTS_PATH = "/events"  # bench/hook_backend.py's forwarding route: it answers each event with an ack
COOKIE = "session=" + "3f" * 16  # what the hook's handshakes bring, and the hook passes on
SERVER_CPU, GENERATOR_CPU = 0, 1


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------


@dataclass
class Server:
    """One contender: one uvicorn process, or (cluster) several and the Redis between them."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    others: list[tuple[subprocess.Popen[bytes], int]] = field(default_factory=list)  # more instances
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)  # redis-server, the hook's backend
    headers: dict[str, str] = field(default_factory=dict)  # what every handshake sends (a token, a cookie)
    query: str = ""  # what every handshake's URL ends with ("?token=...")
    tokens: Iterator[str] | None = None  # a token for each handshake (jwt_fresh), sent as Authorization: Bearer
    spread: bool = True  # whether clients alternate between the instances (else all on the first)

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/py_client{self.query}"

    def ws_of(self, n: int) -> str:
        """The WebSocket URL of the instance the ``n``-th client connects to (they alternate)."""
        ports = [self.port, *(port for _, port in self.others)] if self.spread else [self.port]
        return f"ws://127.0.0.1:{ports[n % len(ports)]}/ws/py_client{self.query}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _processes(self) -> list[psutil.Process]:
        """Every process serving, workers included (granian and hypercorn serve from child processes)."""
        pids = [self.process.pid, *(p.pid for p, _ in self.others), *(p.pid for p in self.helpers)]
        processes = [psutil.Process(pid) for pid in pids]
        return processes + [child for process in processes for child in process.children(recursive=True)]

    def rss(self) -> int:
        return sum(int(p.memory_info().rss) for p in self._processes())

    def cpu_seconds(self) -> float:
        return sum(float(t.user + t.system) for t in (p.cpu_times() for p in self._processes()))

    def helper_cpu_seconds(self) -> float:
        """The helpers' share of :meth:`cpu_seconds` (Redis, the hook's backend)."""
        return sum(float(t.user + t.system) for t in (psutil.Process(p.pid).cpu_times() for p in self.helpers))


@dataclass(frozen=True)
class AuthMaterial:
    """The keys the auth contenders' servers are started with, and the tokens their clients send."""

    secret: str
    public_key_file: Path
    hs256_token: str
    rs256_token: str


@functools.cache
def auth_material() -> AuthMaterial:
    """Minted once per benchmark: each handshake sends the same token, as a client reconnecting would."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    secret = os.urandom(32).hex()
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    AUTH_DIR.mkdir(exist_ok=True)
    public_key_file = AUTH_DIR / "jwt.pub.pem"
    public_key_file.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    # Valid for a day: a full run of every scenario for every contender fits.  The grants let every
    # scenario run (relay needs `to`, fan-out a room); the handshakes scenario uses none of them.
    claims = {"sub": "bench", "exp": int(time.time()) + 86_400, "join": ["*"], "publish": ["*"], "relay": True}
    return AuthMaterial(secret, public_key_file, jwt.encode(claims, secret, algorithm="HS256"),
                        jwt.encode(claims, private, algorithm="RS256"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@functools.cache
def node_packages() -> str:
    """The node executable, once bench/node_modules holds what bench/package-lock.json pins.

    ``npm ci`` runs on first use, and again whenever the lock file is newer than the install;
    ``--ignore-scripts``: no package runs code at install (bufferutil loads its prebuilt binary at
    run time), ``--omit=optional``: not the JavaScript fallback's add-ons of the uWS package.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise RuntimeError("the node_ws and uws contenders need node and npm (apt-get install nodejs npm)")
    bench, installed = HERE / "bench", HERE / "bench" / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < (bench / "package-lock.json").stat().st_mtime:
        print("  npm ci in bench/ (the node_ws and uws contenders' packages)", file=sys.stderr, flush=True)
        done = subprocess.run([npm, "ci", "--ignore-scripts", "--omit=optional", "--no-audit", "--no-fund"],
                              cwd=bench, stdout=sys.stderr, stderr=sys.stderr)
        if done.returncode:
            raise RuntimeError(f"npm ci in {bench} failed with exit code {done.returncode}")
    return node


@contextlib.contextmanager
def run_server(name: str, env: dict[str, str] | None = None, cpu: int = SERVER_CPU,
               recovery_window: float = 120.0, forward_batch: int = 32) -> Iterator[Server]:
    if name == "recovery":  # recovery_max_frames, _bytes and _sessions at their defaults
        with run_server("ws_micro", {"WS_MICRO_RECOVERY_WINDOW": f"{recovery_window:g}"}) as server:
            server.name = name
            yield server
        return
    if name in ("forward", "forward_before", "forward_batch", "forward_batch_before"):
        # The backend on the generator's CPU: one core each.
        # Every client comes from 127.0.0.1, one address: without its share off, forward_max_pending_per_user
        # (10) would refuse 40 of the 50 clients' events at once (docs/backend.md: a load test from one machine).
        gateway = "before" if name.endswith("_before") else "ws_micro"
        with run_server("backend", cpu=GENERATOR_CPU) as backend, run_server(gateway, {
                "WS_MICRO_FORWARD_URL": backend.http + EVENTS_PATH, "WS_MICRO_BACKEND_SECRET": BACKEND_SECRET,
                "WS_MICRO_LIFECYCLE_URL": "", "WS_MICRO_FORWARD_MAX_PENDING_PER_USER": "0",
                **({"WS_MICRO_FORWARD_BATCH": str(forward_batch)} if "batch" in name else {})}) as server:
            server.name, server.helpers = name, [backend.process]
            yield server
        return
    if name in ("cluster", "cluster_local", "cluster_before", "cluster_local_before"):
        gateway = "before" if name.endswith("_before") else "ws_micro"
        with run_redis() as (redis, url), run_server(gateway, {"WS_MICRO_REDIS_URL": url}) as first, \
                run_server(gateway, {"WS_MICRO_REDIS_URL": url}) as second:
            yield Server(name, first.process, first.port, [(second.process, second.port)], [redis],
                         spread="local" not in name)
        return
    if name == "jwt_fresh":
        import jwt

        auth = auth_material()
        # More tokens than the gateway remembers (TOKEN_CACHE_SIZE), taken in turn: each is verified anew.
        claims = {"sub": "bench", "exp": int(time.time()) + 86_400}
        fresh = [jwt.encode({**claims, "jti": str(n)}, auth.secret, algorithm="HS256") for n in range(20_000)]
        with run_server("ws_micro", {"WS_MICRO_JWT_SECRET": auth.secret}) as server:
            server.name, server.tokens = name, itertools.cycle(fresh)
            yield server
        return
    if name in ("jwt", "jwt_query", "jwt_rs256"):
        auth = auth_material()
        if name == "jwt_rs256":
            env, token = {"WS_MICRO_JWT_PUBLIC_KEY": str(auth.public_key_file)}, auth.rs256_token
        else:
            env, token = {"WS_MICRO_JWT_SECRET": auth.secret}, auth.hs256_token
        with run_server("ws_micro", env) as server:
            server.name = name
            if name == "jwt_query":
                server.query = f"?token={token}"
            else:
                server.headers = {"Authorization": f"Bearer {token}"}
            yield server
        return
    if name == "hook":  # the backend first, on the server's CPU too
        with run_server("backend") as backend, run_server("ws_micro", {
                "WS_MICRO_CONNECT_HOOK_URL": backend.http + HOOK_PATH,
                "WS_MICRO_BACKEND_SECRET": BACKEND_SECRET}) as server:
            server.name, server.helpers, server.headers = name, [backend.process], {"Cookie": COOKIE}
            yield server
        return
    if name == "backend":
        env = {"BENCH_BACKEND_SECRET": BACKEND_SECRET, **(env or {})}
    port = free_port()
    if name in NODE_SERVERS:
        command = [node_packages(), SERVERS[name], str(port)]
    elif name == "granian":
        command = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port",
                   str(port), "--log-level", "warning", SERVERS[name]]
    elif name == "hypercorn":
        command = [sys.executable, "-m", "hypercorn", SERVERS[name], "--bind", f"127.0.0.1:{port}",
                   "--log-level", "warning"]
    else:
        command = [sys.executable, "-m", "uvicorn", SERVERS[name], "--host", "127.0.0.1", "--port", str(port),
                   "--log-level", "warning", *(("--app-dir", str(BEFORE_DIR)) if name == "before" else ())]
    process = subprocess.Popen(command, cwd=HERE, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                               preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    server = Server(name, process, port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(server.http + "/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"{name} did not start") from None
                time.sleep(0.05)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_redis(port: int) -> subprocess.Popen[bytes]:
    """An empty, unpersisted redis-server on ``port`` (loopback, the server's CPU), once it accepts connections.

    bench/cluster_faults.py calls it again on the same port to restart Redis empty.
    """
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL,
                               preexec_fn=lambda: os.sched_setaffinity(0, {SERVER_CPU}))
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 1):
                return process
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                process.wait()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.02)


@contextlib.contextmanager
def run_redis() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    process = start_redis(port)
    try:
        yield process, f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


# --------------------------------------------------------------------------
# Load generator
# --------------------------------------------------------------------------


class _T(msgspec.Struct):
    t: int = 0
    seq: int = -1


class _Inner(msgspec.Struct):
    data: _T


class _Frame(msgspec.Struct):
    event: str
    client_id: str
    data: _Inner


decode_frame = msgspec.json.Decoder(_Frame).decode
TEXT, CLOSE = WSMsgType.TEXT, WSMsgType.CLOSE
PAD = "x" * 40  # with the envelope, about 130 bytes a frame


class Peer(WSListener):
    """One client connection; ``on_frame`` sees each text frame after the connect frame."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.client_id = ""
        self.connected = asyncio.get_running_loop().create_future()
        self.disconnected = asyncio.get_running_loop().create_future()
        self.on_frame: Callable[[Peer, WSFrame], None] = lambda peer, frame: None
        self.tally: Iterator[int] | None = None  # set: the peer only counts its frames (fan-out receivers)
        self.close_code: int | None = None
        self.closing = False  # this side sent a close frame: the server's is its answer

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # The fast path first: 1,000 counting receivers must cost the generator as little as can be.
        if self.tally is not None and frame.msg_type == TEXT:
            next(self.tally)
        elif frame.msg_type == TEXT:
            if not self.connected.done():
                self.client_id = decode_frame(frame.get_payload_as_bytes()).client_id
                self.connected.set_result(None)
            else:
                self.on_frame(self, frame)
        elif frame.msg_type == CLOSE:
            self.close_code = int(frame.get_close_code().value)
            if not self.closing:
                transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(time.monotonic())

    def send(self, text: str) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, text.encode())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.disconnect(graceful=False)

    def close_cleanly(self) -> None:
        """Start the closing handshake (1000); ``disconnected`` is done once the server has answered."""
        assert self.transport is not None
        self.closing = True
        self.transport.send_close(WSCloseCode.OK)


async def open_peers(server: Server, n: int, concurrency: int = 100, **options: Any) -> list[Peer]:
    """Open ``n`` connections, ``concurrency`` handshakes at a time, each past its connect frame.

    The list is in connection order, so with several instances peers alternate between them.
    """
    peers: list[Peer | None] = [None] * n
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with limit:
            _, peer = await ws_connect(Peer, server.ws_of(i), websocket_handshake_timeout=30,
                                       extra_headers=server.headers, **options)
            assert isinstance(peer, Peer)
            await asyncio.wait_for(peer.connected, 30)
            peers[i] = peer

    await asyncio.gather(*(one(i) for i in range(n)))
    return [peer for peer in peers if peer is not None]


async def small_buffer_socket(url: Any) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (url.host, url.port))
    return sock


def close_all(peers: list[Peer]) -> None:
    for peer in peers:
        peer.close()


def frame(event: str, client_id: str, t: int, seq: int = -1, to: str | None = None,
          room: str | None = None, pad: str = PAD) -> str:
    routing = (f',"to":"{to}"' if to else "") + (f',"room":"{room}"' if room else "")
    return (f'{{"event":"{event}","client_id":"{client_id}","data":{{"data":{{"t":{t},"seq":{seq},'
            f'"pad":"{pad}"}}}}{routing}}}')


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Window:
    """Counts deliveries (``next(tally)`` for each) while open, and latencies; measures CPU shares."""

    open: bool = False
    tally: Iterator[int] = field(default_factory=itertools.count)
    count: int = 0  # deliveries while open, once closed
    latencies_ns: list[int] = field(default_factory=list)
    started: float = 0.0
    started_ns: int = 0
    ended_ns: int = 2**63  # until it closes
    cpu_started: float = 0.0
    elapsed: float = 0.0
    cpu_share: float = 0.0
    server_cpu_share: float = 0.0
    helper_cpu_share: float = 0.0  # of server_cpu_share: the helpers' (Redis, the hook's backend)

    def record(self, sent_ns: int) -> None:
        next(self.tally)
        if self.open:
            self.latencies_ns.append(time.perf_counter_ns() - sent_ns)

    def sent_inside(self, sent_ns: int) -> bool:
        return self.started_ns <= sent_ns < self.ended_ns

    async def measure(self, server: Server, seconds: float, warmup: float = 0.5) -> None:
        await asyncio.sleep(warmup)
        server_cpu, helper_cpu = server.cpu_seconds(), server.helper_cpu_seconds()
        tally_at_open = next(self.tally)
        self.started, self.cpu_started, self.open = time.perf_counter(), time.process_time(), True
        self.started_ns = time.perf_counter_ns()
        await asyncio.sleep(seconds)
        self.open = False
        self.ended_ns = time.perf_counter_ns()
        self.count = next(self.tally) - tally_at_open - 1
        self.elapsed = time.perf_counter() - self.started
        self.cpu_share = (time.process_time() - self.cpu_started) / self.elapsed
        self.server_cpu_share = (server.cpu_seconds() - server_cpu) / self.elapsed
        self.helper_cpu_share = (server.helper_cpu_seconds() - helper_cpu) / self.elapsed

    def result(self, unit: str) -> dict[str, float]:
        return {
            unit: self.count / self.elapsed,
            "p50_ms": percentile(self.latencies_ns, 0.50) / 1e6,  # type: ignore[arg-type]
            "p99_ms": percentile(self.latencies_ns, 0.99) / 1e6,  # type: ignore[arg-type]
            "generator_cpu": self.cpu_share,
            "server_cpu": self.server_cpu_share,
        }


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


async def echo(server: Server, args: argparse.Namespace) -> dict[str, float]:
    """50 connections, several echo round trips in flight each."""
    peers = await open_peers(server, args.echo_connections)
    window = Window()

    def on_frame(peer: Peer, received: WSFrame) -> None:
        window.record(decode_frame(received.get_payload_as_bytes()).data.data.t)
        peer.send(frame("echo", peer.client_id, time.perf_counter_ns()))

    for peer in peers:
        peer.on_frame = on_frame
        for _ in range(args.in_flight):
            peer.send(frame("echo", peer.client_id, time.perf_counter_ns()))
    await window.measure(server, args.seconds)
    close_all(peers)
    return per_message(window)


async def relay(server: Server, args: argparse.Namespace) -> dict[str, float]:
    """Pairs bouncing frames to each other with ``to``: every hop is one relay."""
    peers = await open_peers(server, args.echo_connections)
    routes: dict[str, tuple[str | None, str | None]] = {}
    for a, b in zip(peers[::2], peers[1::2], strict=True):
        routes[a.client_id], routes[b.client_id] = (b.client_id, None), (a.client_id, None)
    return await bounce(server, args, peers, routes)


async def bounce(server: Server, args: argparse.Namespace, peers: list[Peer],
                 routes: dict[str, tuple[str | None, str | None]]) -> dict[str, float]:
    """Pairs of ``peers`` bouncing frames: each peer answers every frame it receives with one routed as
    ``routes`` says for it, (to, room): to its partner, or to their room; the first of each pair starting
    ``in_flight * 2`` of them; per_message's figures."""
    window = Window()

    def on_frame(peer: Peer, received: WSFrame) -> None:
        window.record(decode_frame(received.get_payload_as_bytes()).data.data.t)
        to, room = routes[peer.client_id]
        peer.send(frame("chat", peer.client_id, time.perf_counter_ns(), to=to, room=room))

    for peer in peers:
        peer.on_frame = on_frame
    for peer in peers[::2]:
        to, room = routes[peer.client_id]
        for _ in range(args.in_flight * 2):
            peer.send(frame("chat", peer.client_id, time.perf_counter_ns(), to=to, room=room))
    await window.measure(server, args.seconds)
    close_all(peers)
    return per_message(window)


def per_message(window: Window) -> dict[str, float]:
    """Echo's and relay's figures, with the server's CPU per message: the measure that compares servers
    whatever their rate (the generator, or a shared machine, may hold a rate down)."""
    result = window.result("msgs_per_s")
    result["server_cpu_us"] = window.server_cpu_share / result["msgs_per_s"] * 1e6
    return result


async def relay_room(server: Server, args: argparse.Namespace) -> dict[str, float]:
    """relay through rooms: each pair alone in a room of its own, every hop a room frame to the other member
    (in cluster_local, a room whose members are all on one instance)."""
    peers = await open_peers(server, args.echo_connections)
    room = {}
    for n, (a, b) in enumerate(zip(peers[::2], peers[1::2], strict=True)):
        room[a.client_id] = room[b.client_id] = f"pair{n}"
    joined = asyncio.get_running_loop().create_future()
    answers = itertools.count(1)

    def on_joined(peer: Peer, received: WSFrame) -> None:
        if next(answers) == len(peers):
            joined.set_result(None)

    for peer in peers:
        peer.on_frame = on_joined
        peer.send(frame("join", peer.client_id, 0).replace('"t":0,', f'"room":"{room[peer.client_id]}","t":0,'))
    await asyncio.wait_for(joined, 30)
    return await bounce(server, args, peers, {client_id: (None, name) for client_id, name in room.items()})


class HttpPoster:
    """A minimal keep-alive HTTP/1.1 client: the generator's cost per POST must stay small."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.draining: asyncio.Future[None] | None = None

    async def post(self, path: str, body: bytes) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        return await self.reader.readexactly(length)

    async def fire(self, path: str, body: bytes) -> None:
        """Send a request without waiting for its answer (HTTP/1.1 pipelining): an open-loop load,
        so a server that stalls on one slow reader delays every later broadcast, as it would."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.draining = asyncio.ensure_future(self._drain_answers())
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    async def _drain_answers(self) -> None:
        assert self.reader is not None
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await self.reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.draining is not None:
            self.draining.cancel()


async def fan_out(server: Server, args: argparse.Namespace, via: str, slow: int = 0) -> dict[str, float]:
    """One sender, ``args.receivers`` receivers; ``via`` is "api" or "room".

    The sender keeps ``args.broadcasts_in_flight`` broadcasts outstanding (a
    broadcast is done when every healthy receiver has it), or, with ``rate``,
    sends at a fixed rate (the slow-consumer stream).  Without a rate, the window
    opens once every receiver has had ``args.warmup_frames`` frames.
    """
    # Slow readers are clients on a slow link: a 64 KiB receive buffer (Linux would otherwise grow
    # a loopback buffer to many MiB before the server notices anything).
    receivers = [*await open_peers(server, slow, socket_factory=small_buffer_socket),
                 *await open_peers(server, args.receivers - slow)]
    [sender] = await open_peers(server, 1)
    room_capable = server.name != "tutorial"
    if via == "room" and room_capable:
        for peer in [*receivers, sender]:
            peer.send(frame("join", peer.client_id, 0).replace('"t":0,', '"room":"fan","t":0,'))
        await asyncio.sleep(1.0)  # joined replies arrive first; they carry seq -1 and are ignored
    window = Window()
    remaining: dict[int, int] = {}  # broadcast -> sampled healthy receivers still waiting for it
    sent_at: dict[int, int] = {}
    done = asyncio.Event()
    warmed_up = asyncio.Event()  # the first args.warmup_frames broadcasts reached every sampled receiver
    healthy = receivers[slow:]

    sampled = healthy[::args.sample_every]

    def on_frame(peer: Peer, received: WSFrame) -> None:
        # Every receiver counts; one in sample_every decodes, for latency and completion:
        # decoding all 1,000 would make this process, not the server, the bottleneck.
        next(window.tally)
        data = decode_frame(received.get_payload_as_bytes()).data.data
        if data.seq < 0:
            return
        if window.sent_inside(data.t):  # even when it arrives after the window: its latency counts
            window.latencies_ns.append(time.perf_counter_ns() - data.t)
        left = remaining.get(data.seq)
        if left is not None:
            if left <= 1:
                del remaining[data.seq]
                done.set()
                if data.seq + 1 >= args.warmup_frames:
                    warmed_up.set()
            else:
                remaining[data.seq] = left - 1

    for peer in receivers:
        peer.tally = window.tally
    for peer in sampled:
        peer.on_frame, peer.tally = on_frame, None
    for peer in receivers[:slow]:  # stop reading: the kernel buffers fill, then the server's queue
        assert peer.transport is not None
        peer.transport.underlying_transport.pause_reading()

    poster = HttpPoster(server.port)
    pad = "y" * (args.stream_payload if slow or args.rate_always else args.fan_out_payload)
    stop = False
    cut_off: dict[str, float] = {}
    peak_rss = server.rss()

    async def send_loop() -> None:
        seq = 0
        interval = 1 / args.rate if slow or args.rate_always else 0.0
        next_at = time.perf_counter()
        while not stop:
            if interval:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            else:
                while len(remaining) >= args.broadcasts_in_flight and not stop:
                    done.clear()
                    await done.wait()
            remaining[seq] = len(sampled)
            sent_at[seq] = time.perf_counter_ns()
            text = frame("news", sender.client_id, time.perf_counter_ns(), seq, pad=pad)
            if via == "api":
                body = ('{"event":"news",' + text[text.index('"data"'):]).encode()  # no client_id
                if interval:
                    await poster.fire("/api/broadcast", body)
                else:
                    await poster.post("/api/broadcast", body)
            elif room_capable:
                sender.send(text.replace('"data":', '"room":"fan","data":', 1))
            else:
                sender.send(text.replace('"event":"news"', '"event":"broadcast"', 1))
            seq += 1

    async def watch() -> None:
        nonlocal peak_rss
        while not stop:
            peak_rss = max(peak_rss, server.rss())
            if slow and server.name in ("ws_micro", "before"):
                for peer in receivers[:slow]:
                    if peer.client_id not in cut_off:
                        status = await asyncio.to_thread(_status, f"{server.http}/api/clients/{peer.client_id}")
                        if status == 404:
                            cut_off[peer.client_id] = time.perf_counter() - window.started
            await asyncio.sleep(0.1)

    sending = asyncio.ensure_future(send_loop())
    watching = asyncio.ensure_future(watch())
    if args.warmup_frames and not (slow or args.rate_always):
        await asyncio.wait_for(warmed_up.wait(), args.timeout)
    await window.measure(server, args.stream_seconds if slow or args.rate_always else args.seconds)
    stop = True
    done.set()
    for task in (sending, watching):
        await asyncio.wait_for(task, 30)  # and raise what went wrong in it
    # Broadcasts sent inside the window get up to --drain seconds more to arrive.
    drain_until = time.perf_counter() + args.drain
    while any(window.sent_inside(sent_at[seq]) for seq in remaining) and time.perf_counter() < drain_until:
        done.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), drain_until - time.perf_counter())
    drained_ns = time.perf_counter_ns()
    poster.close()
    close_all([*receivers, sender])
    # A broadcast a server never delivered is the worst latency of all, not a missing sample:
    # count each one as delivered at the end of the drain (a lower bound).
    undelivered = 0
    for seq, waiting in remaining.items():
        if window.sent_inside(sent_at[seq]):
            window.latencies_ns.extend([drained_ns - sent_at[seq]] * waiting)
            undelivered += waiting
    result = window.result("deliveries_per_s")
    result["server_cpu_us"] = window.server_cpu_share / result["deliveries_per_s"] * 1e6  # a busy core's measure
    result["undelivered_samples"] = undelivered
    result["peak_rss_mib"] = peak_rss / 2**20
    if slow:
        result["slow_cut_off"] = len(cut_off)
        result["cut_off_s_max"] = max(cut_off.values()) if cut_off else float("nan")
    return result


def _status(url: str) -> int:
    try:
        return int(urllib.request.urlopen(url, timeout=5).status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def connections(server: Server, args: argparse.Namespace, deflate: bool) -> dict[str, float]:
    """Open ``args.connections`` idle connections; handshakes/s and server RSS per connection.

    picows cannot negotiate permessage-deflate, so the compressed run uses
    websockets clients, which offer it by default (as browsers do).
    """
    before = server.rss()
    started = time.perf_counter()
    if deflate:
        from websockets.asyncio.client import connect

        limit = asyncio.Semaphore(200)

        async def one() -> Any:
            async with limit:
                client = await connect(server.ws, compression="deflate", ping_interval=None, open_timeout=60)
                await client.recv()
                return client

        clients = await asyncio.gather(*(one() for _ in range(args.connections)))
        compressed = sum("permessage-deflate" in (c.response.headers.get("Sec-WebSocket-Extensions") or "")
                         for c in clients)
        count = len(clients)
    else:
        peers = await open_peers(server, args.connections, concurrency=200)
        count, compressed = len(peers), 0
    elapsed = time.perf_counter() - started
    await asyncio.sleep(1.0)  # let the server settle before reading its memory
    after = server.rss()
    if deflate:
        for client in clients:
            client.transport.abort()
    else:
        close_all(peers)
    return {"handshakes_per_s": count / elapsed, "kib_per_connection": (after - before) / count / 1024,
            "connections": count, "compressed": compressed}


def vanish(peer: Peer) -> None:
    """Drop a connection as a dead network link looks to the server: a TCP reset, no close frame."""
    assert peer.transport is not None
    sock = peer.transport.underlying_transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


def server_metrics(server: Server) -> dict[str, float]:
    """The server's /metrics samples without labels, by name without ``ws_micro_`` (none: no /metrics)."""
    try:
        text = urllib.request.urlopen(server.http + "/metrics", timeout=10).read().decode()
    except urllib.error.HTTPError:  # the tutorial's server and the ceiling have none
        return {}
    return {name.removeprefix("ws_micro_"): float(value)
            for name, value in (line.split() for line in text.splitlines() if line.startswith("ws_micro_"))
            if "{" not in name}


async def metrics_when(server: Server, ready: Callable[[dict[str, float]], bool],
                       seconds: float) -> dict[str, float]:
    """Poll /metrics until ``ready`` says so (or ``seconds`` pass); the last samples."""
    deadline = time.monotonic() + seconds
    while True:
        samples = await asyncio.to_thread(server_metrics, server)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.2)


async def away(server: Server, args: argparse.Namespace, frames: int) -> dict[str, float]:
    """Sessions waiting for clients that vanished, and the memory they hold.

    In a wave, ``args.away_sessions`` clients connect, each gets ``frames`` frames (each its own
    string: the client before it in a ring relays them with ``to``), and all vanish at once (a TCP
    reset, no close frame).  With recovery on (the ``recovery`` contender) their sessions then wait.
    The headline is the second wave's RSS growth per waiting session: its connections reuse the
    memory the first wave's left to the allocator, so what grows is what the sessions hold (the
    first wave's growth is reported too).  Beside it, the characters /metrics says are kept.  Then,
    once ``--away-window`` has passed and every session expired, the RSS left, and a third wave's
    growth (its sessions wait too): less than the second's if the expired sessions' memory went back
    to the allocator and was reused.  With recovery off (ws_micro) the same clients come and go and
    nothing waits: the baseline for each figure.
    """
    n = args.away_sessions
    received, all_received = 0, asyncio.Event()
    result = {"before_mib": server.rss() / 2**20}

    def on_frame(peer: Peer, received_frame: WSFrame) -> None:
        nonlocal received
        received += 1
        if received == frames * n:
            all_received.set()

    async def wave(k: int) -> None:
        nonlocal received
        peers = await open_peers(server, n, concurrency=200)
        received = 0
        all_received.clear()
        for i, peer in enumerate(peers):
            peer.on_frame = on_frame
            to = peers[(i + 1) % len(peers)].client_id
            for seq in range(frames):
                peer.send(frame("m", peer.client_id, 0, seq, to=to, pad=""))
        if frames:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_received.wait(), 60)
        await asyncio.sleep(1.0)  # let the server settle before reading its memory
        result[f"connected{k}_mib"] = server.rss() / 2**20
        result[f"received{k}"] = received
        for peer in peers:
            vanish(peer)
        await metrics_when(server, lambda samples: not samples.get("open_connections"), 30)
        await asyncio.sleep(1.0)
        result[f"away{k}_mib"] = server.rss() / 2**20
        samples = await asyncio.to_thread(server_metrics, server)
        result[f"sessions_away{k}"] = samples.get("sessions_away", 0.0)
        result[f"kept_chars{k}"] = samples.get("sessions_kept_bytes", 0.0)

    await wave(1)
    await wave(2)
    await metrics_when(server, lambda samples: not samples.get("sessions_away"), args.away_window + 30)
    await asyncio.sleep(1.0)
    result["expired_mib"] = server.rss() / 2**20
    await wave(3)
    result["kib_per_session"] = (result["away2_mib"] - result["away1_mib"]) * 1024 / n
    result["kib_first_wave"] = (result["away1_mib"] - result["before_mib"]) * 1024 / n
    result["kib_third_wave"] = (result["away3_mib"] - result["expired_mib"]) * 1024 / n
    result["kept_chars_per_session"] = result["kept_chars2"] / max(1.0, result["sessions_away2"])
    return result


async def handshakes(server: Server, args: argparse.Namespace) -> dict[str, float]:
    """``args.openers`` clients, each opening a connection, waiting for its connect frame and closing it
    cleanly (1000, and the server's answer), over and over: handshakes/s, and the latency from the TCP
    connect to the connect frame.  The ``backend`` contender answers POSTs instead (:func:`backend_answers`)."""
    if server.name == "backend":
        return await backend_answers(server, args)
    window = Window()
    stop = False
    failures: collections.Counter[str] = collections.Counter()

    async def opener(n: int) -> None:
        while not stop:
            started = time.perf_counter_ns()
            try:
                headers = server.headers if server.tokens is None else {
                    "Authorization": f"Bearer {next(server.tokens)}"}
                _, peer = await ws_connect(Peer, server.ws_of(n), websocket_handshake_timeout=30,
                                           extra_headers=headers)
                assert isinstance(peer, Peer)
                await asyncio.wait_for(peer.connected, 30)
            except (OSError, TimeoutError, WSError) as exc:  # a refusal (401, 503) is a WSError
                failures[str(exc)[:120]] += 1
                await asyncio.sleep(0.01)
                continue
            window.record(started)
            peer.close_cleanly()
            try:
                await asyncio.wait_for(peer.disconnected, 30)
            except TimeoutError:
                failures["no answer to the close frame"] += 1
                peer.close()
            if peer.close_code not in (None, 1000):
                failures[f"closed with {peer.close_code}"] += 1

    openers = [asyncio.ensure_future(opener(n)) for n in range(args.openers)]
    await window.measure(server, args.seconds)
    stop = True
    await asyncio.wait_for(asyncio.gather(*openers), 60)
    for failure, count in failures.most_common(5):
        print(f"    {server.name}: {count} x {failure}", file=sys.stderr)
    result = window.result("handshakes_per_s")
    result["failed"] = sum(failures.values())
    result["server_cpu_us"] = window.server_cpu_share / result["handshakes_per_s"] * 1e6
    if server.helpers:  # the hook's backend: its part of server_cpu_us
        result["backend_cpu_us"] = window.helper_cpu_share / result["handshakes_per_s"] * 1e6
    return result


def hook_request() -> bytes:
    """A body like the one the gateway POSTs to the connect hook for the ``hook`` contender's handshakes."""
    return msgspec.json.encode({
        "client_id": "c5d0f1e2-8a3b-4c6d-9e7f-0a1b2c3d4e5f", "remote": "127.0.0.1:51234", "path": "/ws/py_client",
        "query": {}, "headers": {"cookie": COOKIE, "user-agent": "picows/2"}, "websocket": True})


async def backend_answers(server: Server, args: argparse.Namespace, path: str = HOOK_PATH,
                          body: bytes | None = None, concurrency: int | None = None) -> dict[str, float]:
    """The hook's backend alone: the gateway's signed POST, made from here with aiohttp (as the gateway
    makes it: one pooled session), one at a time and then ``args.openers`` at a time."""
    import aiohttp

    url, secret = server.http + path, BACKEND_SECRET.encode()
    body = body if body is not None else hook_request()
    failures = 0

    async def post(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        now = int(time.time())
        signature = f"t={now},v1={hmac.new(secret, b'%d.' % now + body, hashlib.sha256).hexdigest()}"
        started = time.perf_counter_ns()
        async with session.post(url, data=body, headers={"Content-Type": "application/json",
                                                         "X-WS-Micro-Signature": signature}) as response:
            await response.read()
            if response.status != 200:
                failures += 1
        window.record(started)

    async def posting(session: aiohttp.ClientSession) -> None:
        while not stop:
            await post(session)

    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",)) as session:
        result: dict[str, float] = {}
        for posters_at_once, prefix in ((1, "seq_"), (concurrency or args.openers, "")):
            window, stop = Window(), False
            posters = [asyncio.ensure_future(posting(session)) for _ in range(posters_at_once)]
            await window.measure(server, args.seconds)
            stop = True
            await asyncio.wait_for(asyncio.gather(*posters), 60)
            figures = window.result("answers_per_s")
            figures["server_cpu_us"] = window.server_cpu_share / figures["answers_per_s"] * 1e6
            result.update({prefix + key: value for key, value in figures.items()})
    result["failed"] = failures
    return result


async def forward(server: Server, args: argparse.Namespace) -> dict[str, float]:
    """``args.echo_connections`` clients sending events the gateway forwards to the backend, whose answer
    (an ``ack`` with the event's data) comes back as a frame: forwarded events/s with their replies, and
    the time from sending an event to its reply.  A connection forwards one event at a time, so each keeps
    ``args.in_flight`` queued behind it.  The ``backend`` contender answers the same POSTs sent from here
    (:func:`backend_answers`), at as many at once as there are clients: the backend's own rate."""
    if server.name == "backend":
        body = msgspec.json.encode({"type": "event", "client_id": "c5d0f1e2-8a3b-4c6d-9e7f-0a1b2c3d4e5f",
                                    "user": None, "meta": None, "event": "chat",
                                    "data": {"t": 0, "seq": -1, "pad": PAD}, "rooms": []})
        return await backend_answers(server, args, EVENTS_PATH, body, args.echo_connections)
    peers = await open_peers(server, args.echo_connections)
    window = Window()
    failures = 0

    def on_frame(peer: Peer, received: WSFrame) -> None:
        nonlocal failures
        reply = decode_frame(received.get_payload_as_bytes())
        if reply.event != "ack":  # an error: counted apart, neither a forwarded event nor a latency
            failures += 1
        else:
            window.record(reply.data.data.t)
        peer.send(frame("chat", peer.client_id, time.perf_counter_ns()))

    for peer in peers:
        peer.on_frame = on_frame
        for _ in range(args.in_flight):
            peer.send(frame("chat", peer.client_id, time.perf_counter_ns()))
    await window.measure(server, args.seconds)
    close_all(peers)
    result = window.result("events_per_s")
    result["failed"] = failures
    result["server_cpu_us"] = window.server_cpu_share / result["events_per_s"] * 1e6
    if server.helpers:
        result["backend_cpu_us"] = window.helper_cpu_share / result["events_per_s"] * 1e6
    return result


SCENARIOS: dict[str, Callable[[Server, argparse.Namespace], Awaitable[dict[str, float]]]] = {
    "echo": echo,
    "relay": relay,
    "relay_room": relay_room,
    "fanout_api": lambda server, args: fan_out(server, args, "api"),
    "fanout_room": lambda server, args: fan_out(server, args, "room"),
    "connections": lambda server, args: connections(server, args, deflate=False),
    "connections_deflate": lambda server, args: connections(server, args, deflate=True),
    "stream_healthy": lambda server, args: fan_out(server, args, "api", slow=0),
    "stream_1pct_slow": lambda server, args: fan_out(server, args, "api", slow=args.receivers // 100),
    "handshakes": handshakes,
    "forward": forward,
    "away": lambda server, args: away(server, args, args.away_frames),
    "away_empty": lambda server, args: away(server, args, 0),
}
HEADLINE = {"echo": "msgs_per_s", "relay": "msgs_per_s", "relay_room": "msgs_per_s", "fanout_api": "deliveries_per_s",
            "fanout_room": "deliveries_per_s", "connections": "kib_per_connection",
            "connections_deflate": "kib_per_connection", "stream_healthy": "p99_ms", "stream_1pct_slow": "p99_ms",
            "handshakes": "handshakes_per_s", "forward": "events_per_s",
            "away": "kib_per_session", "away_empty": "kib_per_session"}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def run_scenario(name: str, server_name: str, args: argparse.Namespace) -> dict[str, float]:
    scenario = SCENARIOS[name]
    window = args.away_window if name.startswith("away") else args.recovery_window
    with run_server(server_name, recovery_window=window, forward_batch=args.forward_batch) as server:
        async def main() -> dict[str, float]:
            if name.startswith("stream"):
                args.rate_always = True
            try:
                return await asyncio.wait_for(scenario(server, args), args.timeout)
            finally:
                args.rate_always = False
        try:
            import uvloop
            return uvloop.run(main())
        except ImportError:
            return asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(s for s in SCENARIOS if not s.startswith("away")),
                        help="comma-separated scenarios; all but away and away_empty unless given (those "
                             "measure recovery: --servers ws_micro,recovery)")
    parser.add_argument("--servers", default="ws_micro,tutorial,ceiling",
                        help=f"comma-separated, of {', '.join(SERVERS)}")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring window of throughput scenarios")
    parser.add_argument("--stream-seconds", type=float, default=40.0, help="length of the broadcast streams")
    parser.add_argument("--echo-connections", type=int, default=50)
    parser.add_argument("--in-flight", type=int, default=8, help="echo round trips in flight per connection")
    parser.add_argument("--receivers", type=int, default=1000)
    parser.add_argument("--broadcasts-in-flight", type=int, default=4)
    parser.add_argument("--sample-every", type=int, default=10, help="fan-out receivers per latency sample")
    parser.add_argument("--fan-out-payload", type=int, default=40, help="padding characters of fan-out frames")
    parser.add_argument("--warmup-frames", type=int, default=0,
                        help="frames every fan-out receiver gets before the window opens (1000 fills the "
                             "recovery contender's sessions to recovery_max_frames: its steady state)")
    parser.add_argument("--rate", type=float, default=25.0, help="broadcasts per second of the streams")
    parser.add_argument("--stream-payload", type=int, default=8000, help="padding characters of stream frames")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--openers", type=int, default=50,
                        help="clients opening and closing connections at once (handshakes)")
    parser.add_argument("--drain", type=float, default=5.0,
                        help="seconds a fan-out's broadcasts may take to arrive after its window closes")
    parser.add_argument("--recovery-window", type=float, default=120.0,
                        help="the recovery contender's recovery_window, seconds")
    parser.add_argument("--away-window", type=float, default=20.0,
                        help="the recovery contender's recovery_window in the away scenarios, seconds")
    parser.add_argument("--away-sessions", type=int, default=5000,
                        help="clients that vanish in each wave of the away scenarios (three waves)")
    parser.add_argument("--away-frames", type=int, default=10,
                        help="frames each of them gets first (the away scenario; away_empty: none)")
    parser.add_argument("--forward-batch", type=int, default=32,
                        help="the forward_batch contender's WS_MICRO_FORWARD_BATCH: events a request may carry")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds one scenario run may take")
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures as JSON")
    parser.add_argument("--before", metavar="REF",
                        help="also run the gateway as of this git commit (ws_micro.py and its sibling modules), "
                             "as the server 'before' (a change's A/B)")
    args = parser.parse_args()
    args.rate_always = False

    os.sched_setaffinity(0, {GENERATOR_CPU})
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    scenarios = args.only.split(",")
    servers = args.servers.split(",")
    if args.before:
        BEFORE_DIR.mkdir()
        listed = subprocess.run(["git", "ls-tree", "--name-only", args.before], cwd=HERE, check=True,
                                capture_output=True, text=True).stdout.split()
        for module in (name for name in listed if name.startswith("ws_micro") and name.endswith(".py")):
            source = subprocess.run(["git", "show", f"{args.before}:{module}"], cwd=HERE, check=True,
                                    capture_output=True).stdout
            (BEFORE_DIR / module).write_bytes(source)
        servers += [] if any(name == "before" or name.endswith("_before") for name in servers) else ["before"]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {s: {srv: [] for srv in servers} for s in scenarios}
    for scenario in scenarios:
        for round_ in range(args.runs):
            order = servers[round_ % len(servers):] + servers[:round_ % len(servers)]  # alternate who goes first
            for server_name in order:
                try:
                    figures = run_scenario(scenario, server_name, args)
                except (TimeoutError, RuntimeError, OSError) as exc:
                    figures = {"error": 1.0}
                    print(f"  {scenario} {server_name}: failed: {exc!r}", file=sys.stderr)
                runs[scenario][server_name].append(figures)
                print(f"  {scenario:<20} {server_name:<9} round {round_ + 1}: "
                      + ", ".join(f"{k}={v:,.2f}" for k, v in figures.items()), file=sys.stderr, flush=True)

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {platform.system()} {platform.release()}; "
          f"server on CPU {SERVER_CPU}, generator on CPU {GENERATOR_CPU}; medians of {args.runs} runs\n")
    print(f"| scenario | server | figure | median | vs {'tutorial' if 'tutorial' in servers else servers[0]} "
          "| p99 ms | generator CPU | server CPU |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for scenario in scenarios:
        headline = HEADLINE[scenario]
        medians = {srv: {k: statistics.median(r[k] for r in rs if k in r) for k in rs[0]}
                   for srv, rs in runs[scenario].items() if rs and "error" not in rs[0]}
        base = medians.get("tutorial" if "tutorial" in medians else servers[0], {}).get(headline)
        for srv, m in medians.items():
            key = headline if headline in m else "answers_per_s"  # the backend's row (handshakes)
            ratio = f"{m[key] / base:.2f}x" if base and key == headline and not scenario.startswith("away") else "-"
            notes = []
            if "slow_cut_off" in m:
                cut = f"{m['slow_cut_off']:.0f} slow readers cut off"
                notes.append(cut + (f", the last after {m['cut_off_s_max']:.1f} s" if m["slow_cut_off"] else ""))
            if m.get("undelivered_samples"):
                notes.append(f"{m['undelivered_samples']:.0f} sampled deliveries never made")
            if "peak_rss_mib" in m:
                notes.append(f"peak RSS {m['peak_rss_mib']:.0f} MiB")
            if "seq_p50_ms" in m:
                notes.append(f"one at a time: {m['seq_answers_per_s']:,.0f}/s, p50 {m['seq_p50_ms']:.2f} ms, "
                             f"p99 {m['seq_p99_ms']:.2f} ms; {args.openers} at a time: p50 {m['p50_ms']:.2f} ms")
            elif scenario == "handshakes":
                notes.append(f"p50 {m['p50_ms']:.2f} ms")
            if "server_cpu_us" in m:
                backend = f", {m['backend_cpu_us']:,.0f} of them the backend's" if "backend_cpu_us" in m else ""
                notes.append(f"server CPU {m['server_cpu_us']:,.0f} µs each{backend}")
            if m.get("failed"):
                notes.append(f"{m['failed']:.0f} failed")
            if scenario.startswith("away"):
                notes.append(f"{m['sessions_away2']:,.0f} sessions waiting, {m['kept_chars_per_session']:,.0f} "
                             f"characters kept each; first wave {m['kib_first_wave']:.1f} KiB each, third "
                             f"(after expiry) {m['kib_third_wave']:.1f}; RSS {m['before_mib']:.0f} MiB before, "
                             f"{m['away1_mib']:.0f}, {m['away2_mib']:.0f} after two waves, "
                             f"{m['expired_mib']:.0f} once expired, {m['away3_mib']:.0f} after a third")
            if "connections" in m:
                notes.append(f"{m['handshakes_per_s']:,.0f} handshakes/s, {m['connections']:,.0f} connections")
            extra = f" ({'; '.join(notes)})" if notes else ""
            print(f"| {scenario} | {srv} | {key}{extra} | {m[key]:,.1f} | {ratio} | "
                  f"{m.get('p99_ms', float('nan')):.1f} | {m.get('generator_cpu', float('nan')):.0%} | "
                  f"{m.get('server_cpu', float('nan')):.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    shutil.rmtree(BEFORE_DIR, ignore_errors=True)
    shutil.rmtree(AUTH_DIR, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
