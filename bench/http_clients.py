"""Benchmark the async HTTP clients the gateway could POST to its backend with.

The connect hook and event forwarding make signed JSON POSTs to a backend over one
pooled keep-alive client.  Contenders: aiohttp's ClientSession (the baseline of the
ratios), httpx.AsyncClient, and httpx2.AsyncClient (the fork Starlette prefers).

The backend is a Starlette app on uvicorn (asyncio loop; httptools if installed,
else h11) in its own process pinned to CPU 0; this process, the client, is pinned
to CPU 1 and runs on the default asyncio loop (not uvloop, which the gateway only
gets when its server installs it).  Every round runs every scenario for every
contender, the contenders in a different order each round; the tables show
medians and the ratio to aiohttp.  The machine is shared and noisy: read the
ratios, take the absolute numbers as context only.

    pip install httpx aiohttp httpx2
    python bench/http_clients.py                      # 5 rounds of 1.5 s windows, about 3 minutes
    python bench/http_clients.py --rounds 3 --only seq,conc50 --json clients.json
    python bench/http_clients.py --contenders aiohttp,httpx,httpx+sniffio --no-imports

Scenarios (each request: ~400 bytes of JSON, Content-Type and a signature header,
a ~60-byte JSON answer, status checked, answer decoded with msgspec; a fresh client
for each run, created inside the running loop as the gateway would, warmed up first):
    seq          one request at a time over one pooled keep-alive connection, with a
                 per-request timeout the library's own way (the connect hook's path)
    seq_none     the same with every timeout off: seq - seq_none is the timeout's cost
    seq_anyio    no library timeout, the call wrapped in anyio.fail_after (a true
                 total deadline, which httpx's per-phase Timeout is not)
    concN        N requests in flight (--concurrency, 10 and 50) over a pool of up to
                 100 connections, per-request timeout on (event forwarding under load)
"client CPU µs/req" (this process's CPU time over the requests made) is the figure
least moved by the machine's other work.  Then, in fresh subprocesses: import time (bare
interpreter, and on top of the gateway's own imports), the time to create the client
and make its first request (connection set-up and lazy work), and the RSS these add.

httpx+sniffio (not run by default): httpx with a stand-in sniffio module, i.e. httpx as
it runs where sniffio happens to be installed (see environment()).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent
SERVER_CPU, CLIENT_CPU = 0, 1
CONTENDERS = ("aiohttp", "httpx", "httpx2")
BASELINE = "aiohttp"
GATEWAY_IMPORTS = "import asyncio, ssl, anyio, msgspec, starlette.applications, starlette.websockets, uvicorn"
REPLY = b'{"user":"alice","rooms":["team:42","lobby"],"ttl":300,"ok":1}'  # 60 bytes
SIGNATURE = "t=1767225600,v1=" + "5f" * 32  # what an HMAC-SHA256 signature header looks like
BODY = msgspec.json.encode({
    "event": "connect", "client_id": "c5d0f1e2-8a3b-4c6d-9e7f-0a1b2c3d4e5f", "path": "/ws/py_client",
    "query": "room=team%3A42&token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.sig",
    "remote": "203.0.113.7:51234", "origin": "https://app.example.com",
    "headers": {"user-agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0",
                "cookie": "session=3q2+7w==; theme=dark", "accept-language": "en-GB,en;q=0.9"},
    "subprotocols": ["ws_micro.v1"], "time": 1767225600.123,
})


PINNING = len(os.sched_getaffinity(0)) >= 2  # read before this process pins itself to one CPU


def http_impl() -> str:
    return "httptools" if importlib.util.find_spec("httptools") else "h11"


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


# --------------------------------------------------------------------------
# The backend (this file run with --serve PORT)
# --------------------------------------------------------------------------


def serve(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    decode = msgspec.json.decode

    async def hook(request: Request) -> Response:
        decode(await request.body())
        return Response(REPLY, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"]), Route("/healthz", healthz)])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="asyncio", http=http_impl(), lifespan="off",
                log_level="warning", access_log=False, backlog=1024)


@dataclass
class Backend:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def cpu_seconds(self) -> float:
        user, system = _proc_times(self.process.pid)
        return user + system


def _proc_times(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def run_backend() -> Iterator[Backend]:
    port = free_port()
    preexec = (lambda: os.sched_setaffinity(0, {SERVER_CPU})) if PINNING else None
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], stdout=subprocess.DEVNULL,
                               preexec_fn=preexec)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the backend did not start") from None
                time.sleep(0.05)
        yield Backend(process, port)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------
# The contenders: each as the gateway would use it
# --------------------------------------------------------------------------

Post = Callable[[], Awaitable[Any]]


@dataclass
class Client:
    post: Post  # one signed POST, status checked, answer decoded
    close: Callable[[], Awaitable[None]]


def headers() -> dict[str, str]:
    return {"Content-Type": "application/json", "X-WS-Micro-Signature": SIGNATURE}


class BadStatus(Exception):
    pass


def library(contender: str) -> str:
    return contender.split("+")[0]


@contextlib.contextmanager
def environment(contender: str) -> Iterator[None]:
    """``httpx+sniffio``: httpx as it runs where sniffio is installed.

    httpcore 1.0.9 looks for sniffio (``import sniffio``) each time it sets up a lock or
    an event, several times a request; anyio 4 no longer depends on sniffio, so in a
    fresh install each of those is a failed import.  This variant stands a one-line
    stand-in in ``sys.modules`` for the run (sniffio itself costs about as little).
    """
    if not contender.endswith("+sniffio") or "sniffio" in sys.modules:
        yield
        return
    stand_in = types.ModuleType("sniffio")
    stand_in.current_async_library = lambda: "asyncio"  # type: ignore[attr-defined]
    sys.modules["sniffio"] = stand_in
    try:
        yield
    finally:
        del sys.modules["sniffio"]


async def open_client(contender: str, url: str, request_timeout: float | None) -> Client:
    """A pooled client, created lazily inside the running loop; a timeout on each request, None: none at all."""
    decode = msgspec.json.decode
    name = library(contender)
    if name == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100),
            timeout=aiohttp.ClientTimeout(),  # the session default (total=300 s) off: the request sets its own
        )
        per_request = aiohttp.ClientTimeout(total=request_timeout)  # total=None: no timer at all

        async def post_aiohttp() -> Any:
            async with session.post(url, data=BODY, headers=headers(), timeout=per_request) as response:
                body = await response.read()
                if response.status != 200:
                    raise BadStatus(response.status)
                return decode(body)

        return Client(post_aiohttp, session.close)

    module: Any = importlib.import_module(name)  # httpx or httpx2: the same API
    client = module.AsyncClient(
        limits=module.Limits(max_connections=100, max_keepalive_connections=100),  # default keeps only 20
        timeout=None, trust_env=False,
    )
    per_request_httpx = module.Timeout(request_timeout)  # connect, write, read and pool each; None: off

    async def post_httpx() -> Any:
        response = await client.post(url, content=BODY, headers=headers(), timeout=per_request_httpx)
        if response.status_code != 200:
            raise BadStatus(response.status_code)
        return decode(response.content)

    return Client(post_httpx, client.aclose)


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


def percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Window:
    open: bool = False
    stop: bool = False
    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0


async def drive(backend: Backend, contender: str, workers: int, request_timeout: float | None, deadline: float | None,
                seconds: float, warmup: float) -> dict[str, float]:
    """``workers`` tasks, each posting one request after another: a fresh client, warmed up, then measured."""
    import anyio

    client = await open_client(contender, backend.url, request_timeout)
    window = Window()
    perf = time.perf_counter_ns

    async def worker() -> None:
        post = client.post
        while not window.stop:
            started = perf()
            try:
                if deadline is None:
                    await post()
                else:
                    with anyio.fail_after(deadline):
                        await post()
            except Exception:
                window.errors += window.open
                await asyncio.sleep(0.01)
                continue
            if window.open:
                window.latencies_ns.append(perf() - started)

    try:
        tasks = [asyncio.create_task(worker()) for _ in range(workers)]
        await asyncio.sleep(warmup)
        server_cpu, cpu, wall = backend.cpu_seconds(), time.process_time(), time.perf_counter()
        window.open = True
        await asyncio.sleep(seconds)
        window.open = False
        elapsed = time.perf_counter() - wall
        cpu, server_cpu = time.process_time() - cpu, backend.cpu_seconds() - server_cpu
        window.stop = True
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    count = len(window.latencies_ns)
    return {
        "req_per_s": count / elapsed,
        "p50_us": percentile(window.latencies_ns, 0.50) / 1e3,
        "p99_us": percentile(window.latencies_ns, 0.99) / 1e3,
        "cpu_us_per_req": cpu / count * 1e6 if count else float("nan"),
        "client_cpu": cpu / elapsed,
        "server_cpu": server_cpu / elapsed,
        "errors": float(window.errors),
    }


def concurrent(n: int, backend: Backend, contender: str, args: argparse.Namespace) -> Awaitable[dict[str, float]]:
    return drive(backend, contender, n, args.timeout, None, args.seconds, args.warmup)


Scenario = Callable[[Backend, str, argparse.Namespace], Awaitable[dict[str, float]]]


def scenarios(args: argparse.Namespace) -> dict[str, Scenario]:
    found: dict[str, Scenario] = {
        "seq": lambda b, c, a: drive(b, c, 1, a.timeout, None, a.seconds, a.warmup),
        "seq_none": lambda b, c, a: drive(b, c, 1, None, None, a.seconds, a.warmup),
        "seq_anyio": lambda b, c, a: drive(b, c, 1, None, a.timeout, a.seconds, a.warmup),
    }
    for n in (int(n) for n in args.concurrency.split(",")):
        found[f"conc{n}"] = functools.partial(concurrent, n)
    return found


# --------------------------------------------------------------------------
# Import time and memory, in fresh processes (this file run with --probe NAME)
# --------------------------------------------------------------------------


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def probe(name: str, port: int, timeout: float) -> None:
    """Prints, on top of the gateway's imports: the import's time, client creation's, the first request's, RSS."""
    exec(GATEWAY_IMPORTS)
    before = rss_kib()
    started = time.perf_counter()
    importlib.import_module(name)
    import_s = time.perf_counter() - started

    async def first() -> dict[str, float]:
        started = time.perf_counter()
        client = await open_client(name, f"http://127.0.0.1:{port}/hook", timeout)
        created = time.perf_counter()
        rss_client = rss_kib()
        await client.post()
        answered = time.perf_counter()
        rss_request = rss_kib()
        await client.close()
        return {"import_ms_in_gateway": import_s * 1e3, "create_ms": (created - started) * 1e3,
                "first_request_ms": (answered - created) * 1e3,
                "rss_mib_client": (rss_client - before) / 1024, "rss_mib_after_request": (rss_request - before) / 1024}

    print(json.dumps(asyncio.run(first())))


def measure_imports(name: str, backend: Backend, timeout: float) -> dict[str, float]:
    cold = subprocess.run(
        [sys.executable, "-c", f"import time; t = time.perf_counter(); import {name}; "
                               "print((time.perf_counter() - t) * 1e3)"],
        capture_output=True, text=True, check=True)
    warm = subprocess.run([sys.executable, __file__, "--probe", name, "--port", str(backend.port),
                           "--timeout", str(timeout)], capture_output=True, text=True, check=True)
    return {"import_ms_cold": float(cold.stdout), **json.loads(warm.stdout)}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base and base == base and value == value else "-"


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: median([r[k] for r in rows]) for k in rows[0]} if rows else {}


def report(runs: dict[str, dict[str, list[dict[str, float]]]], imports: dict[str, list[dict[str, float]]],
           contenders: list[str], args: argparse.Namespace) -> None:
    with contextlib.closing(asyncio.new_event_loop()) as new_loop:  # what asyncio.run() made for the runs
        loop = type(new_loop).__name__
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {platform.system()} {platform.release()}; "
          + (f"backend on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}" if PINNING else "not pinned (one CPU)")
          + f"; medians of {args.rounds} rounds, {args.seconds:g} s windows")
    print(f"client: the default asyncio loop ({loop}, not uvloop); backend: starlette {version('starlette')} "
          f"on uvicorn {version('uvicorn')}, loop=asyncio, http={http_impl()}")
    print("versions: " + ", ".join(f"{c} {version(c)}" for c in dict.fromkeys(map(library, contenders)))
          + f"; httpcore {version('httpcore')}, httpcore2 {version('httpcore2')}, anyio {version('anyio')}, "
          f"sniffio {version('sniffio')}")
    print(f"per-request timeout {args.timeout:g} s; concN: N requests in flight, pool limit 100\n")
    print(f"| scenario | client | p50 µs | p99 µs | req/s | client CPU µs/req | vs {BASELINE}: p50 | req/s "
          "| CPU/req | client CPU | backend CPU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for scenario, by_client in runs.items():
        table = {c: medians(rs) for c, rs in by_client.items() if rs}
        base = table.get(BASELINE, {})
        for c, m in table.items():
            errors = f" ({m['errors']:.0f} errors)" if m["errors"] else ""
            print(f"| {scenario} | {c}{errors} | {m['p50_us']:,.0f} | {m['p99_us']:,.0f} | {m['req_per_s']:,.0f} "
                  f"| {m['cpu_us_per_req']:,.0f} | {ratio(m['p50_us'], base.get('p50_us'))} "
                  f"| {ratio(m['req_per_s'], base.get('req_per_s'))} "
                  f"| {ratio(m['cpu_us_per_req'], base.get('cpu_us_per_req'))} "
                  f"| {m['client_cpu']:.0%} | {m['server_cpu']:.0%} |")
    if "seq" in runs and "seq_none" in runs:
        print("\nthe timeout's cost, sequential (medians' differences to seq_none: p50 µs / client CPU µs a request)")
        print("| client | library timeout | anyio.fail_after instead |\n|---|---:|---:|")
        for c in contenders:
            none, own = medians(runs["seq_none"][c]), medians(runs["seq"][c])
            fail_after = medians(runs["seq_anyio"][c]) if "seq_anyio" in runs else {}
            cells = [f"{m['p50_us'] - none['p50_us']:+,.0f} / {m['cpu_us_per_req'] - none['cpu_us_per_req']:+,.0f}"
                     if m else "-" for m in (own, fail_after)]
            print(f"| {c} | {cells[0]} | {cells[1]} |")
    if any(imports.values()):
        print("\nlazy start, in a fresh process that has already imported the gateway's stack "
              "(bare python: a fresh interpreter, nothing else imported)")
        print("| client | import ms, bare python | import ms | create client ms | first request ms "
              "| RSS MiB: import + client | + first request |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for c, rows in imports.items():
            if rows:
                m = medians(rows)
                print(f"| {c} | {m['import_ms_cold']:.0f} | {m['import_ms_in_gateway']:.0f} | {m['create_ms']:.1f} "
                      f"| {m['first_request_ms']:.1f} | {m['rss_mib_client']:.1f} | {m['rss_mib_after_request']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5, help="measuring window of each scenario run")
    parser.add_argument("--warmup", type=float, default=0.3, help="seconds each run goes before its window")
    parser.add_argument("--only", help="comma-separated scenarios (default: all): seq,seq_none,seq_anyio,concN")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated, of aiohttp, httpx, httpx2, httpx+sniffio")
    parser.add_argument("--concurrency", default="10,50", help="comma-separated requests in flight (concN)")
    parser.add_argument("--timeout", type=float, default=3.0, help="the per-request timeout, seconds")
    parser.add_argument("--no-imports", action="store_true", help="skip the import-time and memory probes")
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures as JSON")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--probe", metavar="CLIENT", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if args.probe:
        probe(args.probe, args.port, args.timeout)
        return 0

    contenders = [c for c in args.contenders.split(",") if importlib.util.find_spec(library(c))]
    missing = set(args.contenders.split(",")) - set(contenders)
    if missing:
        print(f"not installed, skipped: {', '.join(sorted(missing))}", file=sys.stderr)
    for contender in contenders:
        importlib.import_module(library(contender))  # not in the first run's figures (the probes time imports)
    known = scenarios(args)
    chosen = args.only.split(",") if args.only else list(known)
    if unknown := set(chosen) - set(known):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))} (--concurrency makes concN)")
    runs: dict[str, dict[str, list[dict[str, float]]]] = {s: {c: [] for c in contenders} for s in chosen}
    probed = list(dict.fromkeys(library(c) for c in contenders))
    imports: dict[str, list[dict[str, float]]] = {c: [] for c in probed} if not args.no_imports else {}
    with run_backend() as backend:
        if PINNING:
            os.sched_setaffinity(0, {CLIENT_CPU})  # after the backend's start; the probes inherit it

        async def one(scenario: str, contender: str) -> dict[str, float]:
            return await asyncio.wait_for(known[scenario](backend, contender, args), args.seconds * 5 + 30)

        for round_ in range(args.rounds):
            order = contenders[round_ % len(contenders):] + contenders[:round_ % len(contenders)]
            for scenario in chosen:
                for contender in order:
                    with environment(contender):
                        figures = asyncio.run(one(scenario, contender))  # the default loop, a fresh one each run
                    runs[scenario][contender].append(figures)
                    print(f"  round {round_ + 1} {scenario:<9} {contender:<13} "
                          + ", ".join(f"{k}={v:,.1f}" for k, v in figures.items()), file=sys.stderr, flush=True)
            for name in (c for c in order if c in imports):
                figures = measure_imports(name, backend, args.timeout)
                imports[name].append(figures)
                print(f"  round {round_ + 1} {'imports':<9} {name:<13} "
                      + ", ".join(f"{k}={v:,.1f}" for k, v in figures.items()), file=sys.stderr, flush=True)
    report(runs, imports, contenders, args)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "versions": {c: version(c) for c in (*probed, "httpcore", "httpcore2", "anyio")},
            "backend_http": http_impl(), "pinned": PINNING, "runs": runs, "imports": imports}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
