"""A fault run of cluster mode: does any frame get lost without its sender being told?

A real redis-server and three ws_micro instances, X, Y and Z, on loopback (bench_ws_micro.py's
run_redis and run_server: uvicorn, pinned to the server's CPU), with a short heartbeat, as the
cluster tests' FAST_HEARTBEAT: heartbeat_interval 0.2 s and instance_ttl 1 s, so that a dead
instance is reaped in about a second instead of ten.  Seven clients:

    X: dx sends numbered `to` frames, in turn to ty and tz;  rx sends numbered frames to room "r";
       mx, a member of "r"
    Y: ty, receives dx's frames;  my, a member of "r"
    Z: tz, receives dx's frames;  mz, a member of "r"

Each kind goes at --rate frames a second (100) for the whole run, each frame with an "id" ("d12",
"r34"), so that an error event (backend_unavailable, unknown_client, ...) names the frame it refuses.
After a quiet start, one fault at a time, each followed by a quiet gap (--gap seconds):

    1. redis restart   Redis killed (SIGKILL), down --redis-down seconds, started empty on its port
    2. redis freeze    Redis stopped (SIGSTOP) for --freeze seconds, then continued (SIGCONT)
    3. instance kill   Z killed (SIGKILL): its clients tz and mz are gone with it
    4. instance freeze Y stopped for --instance-freeze seconds, then continued (0: not done); longer
                       than instance_ttl, so the others take Y for dead meanwhile, as in a partition

What waits for an event waits for it (an instance noticing, coming back, a dead one reaped); the
faults' lengths and the gaps between them are timed by design.  After the last gap the senders
stop, and the run waits (up to --settle seconds) until every frame has arrived or been refused.

Each frame has its intended receivers: ty or tz for a `to` frame, the other members of "r" for a
room frame.  For each frame and receiver, the outcome is one of:

    delivered        the receiver got it
    refused          its sender got an error event with the frame's id (the sender was told; the
                     frame may have arrived at some receivers anyway: backend_unavailable means
                     "may not have arrived")
    ended            the receiver's connection ended before it got it: tz or mz, killed with Z, or ty or
                     my, whose instance Y closed their connections (1012) on coming back after the
                     others had taken it for dead (docs/cluster.md, Faults); it was sent before that
                     end, after the last frame the receiver did get.  The receiver knows: its
                     connection ended, and a resume would answer `recovered: false`.  This is
                     how Centrifugo reports it too: a publication is not refused to its publisher
                     because a subscriber's node died; the subscriber sees the disconnect, and on
                     reconnecting, its recovery says whether it missed anything.  A room frame sent
                     after the end is not for that member at all (a room frame is for the members
                     whose connections are open); a `to` frame sent to tz or ty after it still is,
                     and must be refused.
    lost silently    anything else: not delivered, not refused, to a receiver that was alive, or
                     missing before a frame the receiver did get (a gap)

The tables count frames per fault window (a window runs from its fault's start to the next's) and
overall: a frame counts as refused if its sender was told, else under its worst receiver's outcome.
Then each receiver's outcomes, duplicates and reorderings, and each instance's
ws_micro_cluster_dropped_total by reason.  The exit status is 1 if any frame was lost silently,
duplicated or reordered.  Takes about 80 seconds (50 without the instance freeze):

    pip install '.[bench]'
    python bench/cluster_faults.py
    python bench/cluster_faults.py --rate 100 --gap 5 --freeze 5 --instance-freeze 0
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_ws_micro import Server, run_redis, run_server, start_redis
from ws_micro_redis import TAKEN_FOR_DEAD

FAST_HEARTBEAT = {"WS_MICRO_HEARTBEAT_INTERVAL": "0.2", "WS_MICRO_INSTANCE_TTL": "1.0"}  # tests/conftest.py's
WAIT = 30.0  # seconds: the longest an event the run waits for may take (an instance back, a dead one reaped)
OUTCOMES = ("delivered", "refused", "ended", "lost silently")


@dataclass
class Client:
    """One WebSocket client: what it received (frame ids, in order), and the errors it got, by frame id."""

    name: str
    instance: str
    ws: ClientConnection
    client_id: str
    received: list[str] = field(default_factory=list)
    errors: dict[str, list[str]] = field(default_factory=dict)  # frame id -> error codes, in order
    unmatched: list[dict[str, Any]] = field(default_factory=list)  # anything else it was sent
    closed_at: float | None = None  # when its connection ended (monotonic)
    ended_at: float | None = None  # when the server ended it, as an instance taken for dead does (1012)


@dataclass
class Frame:
    """A frame sent: the ``n``-th of its sender's stream ``tag`` (its id is both), when it was sent
    (monotonic), and whom it was for."""

    tag: str
    n: int
    sender: Client
    at: float
    receivers: tuple[Client, ...]

    @property
    def id(self) -> str:
        return f"{self.tag}{self.n}"


def numbered(frame_id: str) -> tuple[str, int]:
    """A frame id's stream and number: "d12" -> ("d", 12)."""
    return frame_id[0], int(frame_id[1:])


@dataclass
class Run:
    clients: dict[str, Client]
    sent: list[Frame] = field(default_factory=list)
    windows: list[tuple[str, float]] = field(default_factory=list)  # (fault, when it started)
    killed: dict[str, float] = field(default_factory=dict)  # client name -> when its instance was killed
    streaming: bool = True
    progress: asyncio.Event = field(default_factory=asyncio.Event)  # set at each frame any client receives

    def note(self, window: str) -> None:
        self.windows.append((window, time.monotonic()))
        print(f"  {time.strftime('%H:%M:%S')} {window}", file=sys.stderr, flush=True)

    async def until(self, predicate: Callable[[], bool], within: float) -> bool:
        """Wait for ``predicate`` to hold, looking again at each frame received; False after ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not predicate():
                    self.progress.clear()
                    await self.progress.wait()
                return True
        return predicate()


# --------------------------------------------------------------------------
# Clients and traffic
# --------------------------------------------------------------------------


async def open_client(name: str, server: Server, instance: str) -> Client:
    # No permessage-deflate: as uvicorn is run in production (docs/embedding.md), on the read fast path.
    ws = await connect(f"ws://127.0.0.1:{server.port}/ws/py_client", max_queue=None, compression=None)
    hello = json.loads(await ws.recv())
    assert hello["event"] == "connect", hello
    return Client(name, instance, ws, hello["client_id"])


async def join(client: Client, room: str) -> None:
    await client.ws.send(json.dumps({"event": "join", "client_id": client.client_id, "data": {"data": {"room": room}},
                                     "id": "join"}))
    reply = json.loads(await client.ws.recv())
    assert reply["event"] == "joined", reply


async def read(run: Run, client: Client) -> None:
    """Note each frame ``client`` receives until its connection ends."""
    try:
        async for message in client.ws:
            frame = json.loads(message)
            if frame["event"] == "error" and isinstance(frame.get("id"), str):
                client.errors.setdefault(frame["id"], []).append(frame["data"]["data"]["code"])
            elif frame["event"] == "fault" and isinstance(frame.get("id"), str):
                client.received.append(frame["id"])
            else:
                client.unmatched.append(frame)
            run.progress.set()
    except ConnectionClosed:
        pass
    client.closed_at = time.monotonic()
    if client.ws.close_code == 1012 and client.ws.close_reason == TAKEN_FOR_DEAD:
        client.ended_at = client.closed_at
    run.progress.set()


async def stream(run: Run, sender: Client, tag: str, rate: float,
                 addressed: Callable[[int], tuple[dict[str, str], tuple[Client, ...]]]) -> None:
    """Send numbered frames at ``rate`` a second while the run streams; ``addressed(n)``: the n-th frame's
    routing (``to`` or ``room``) and its intended receivers."""
    period, n = 1 / rate, 0
    tick = time.monotonic()
    while run.streaming:
        routing, receivers = addressed(n)
        frame = Frame(tag, n, sender, time.monotonic(), receivers)
        run.sent.append(frame)
        await sender.ws.send(json.dumps({"event": "fault", "client_id": sender.client_id, "data": {"data": {}},
                                         **routing, "id": frame.id}))
        n += 1
        tick = max(tick + period, time.monotonic() - period)  # the pace; no burst to catch up after a stall
        await asyncio.sleep(tick - time.monotonic())


# --------------------------------------------------------------------------
# Faults, and the instances' state (read over HTTP: it lives in other processes)
# --------------------------------------------------------------------------


def healthz(server: Server) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(server.http + "/healthz", timeout=1) as response:
            answer: dict[str, Any] = json.load(response)
            return answer
    except OSError as exc:  # a 503, or an instance not answering
        return {"status": f"unreachable ({exc})"}


async def until_healthz(servers: list[Server], predicate: Callable[[dict[str, Any]], bool], what: str) -> None:
    """Poll each server's /healthz (in a thread: the clients' loop runs on) until ``predicate`` holds for all."""
    async with asyncio.timeout(WAIT):
        for server in servers:
            while not predicate(await asyncio.to_thread(healthz, server)):  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.05)
    print(f"           {what}", file=sys.stderr, flush=True)


def dropped(server: Server) -> dict[str, float]:
    """``ws_micro_cluster_dropped_total`` by reason: what this instance refused to its senders."""
    with urllib.request.urlopen(server.http + "/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    counts: dict[str, float] = {}
    for line in lines:
        if line.startswith("ws_micro_cluster_dropped_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('reason="', 1)[1].split('"', 1)[0]] = float(value)
    return counts


@contextlib.contextmanager
def stopped(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """SIGSTOP ``process`` for the block (no reset, no answer: only timeouts tell), SIGCONT after."""
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)


# --------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------


def outcomes(run: Run, receiver: Client) -> dict[str, str]:
    """Each frame meant for ``receiver``, by id: one of OUTCOMES."""
    got = set(receiver.received)
    last: dict[str, int] = {}  # stream -> the highest number the receiver got of it
    for tag, n in map(numbered, receiver.received):
        last[tag] = max(n, last.get(tag, -1))
    ended = run.killed.get(receiver.name, receiver.ended_at)
    result = {}
    for frame in run.sent:
        if receiver not in frame.receivers:
            continue
        if frame.id in got:
            result[frame.id] = "delivered"
        elif frame.id in frame.sender.errors:
            result[frame.id] = "refused"
        elif ended is not None and frame.at < ended and frame.n > last.get(frame.tag, -1):
            result[frame.id] = "ended"
        else:
            result[frame.id] = "lost silently"
    return result


def disorder(received: list[str]) -> tuple[int, int]:
    """How many frames ``received`` holds twice, and how many came after a later one of their stream."""
    seen: set[str] = set()
    duplicated = reordered = 0
    highest: dict[str, int] = {}
    for frame_id in received:
        duplicated += frame_id in seen
        seen.add(frame_id)
        tag, n = numbered(frame_id)
        reordered += n < highest.get(tag, -1)
        highest[tag] = max(n, highest.get(tag, -1))
    return duplicated, reordered


def table(title: str, columns: list[str], rows: dict[str, dict[str, Any]]) -> str:
    """Rows of counts (or words) under their columns, right-aligned."""

    def cell(value: Any) -> str:
        return f"{value:,}" if isinstance(value, int) else str(value)

    widths = [max(len(title), *map(len, rows)), *(max(len(c), 6) for c in columns)]
    lines = [[title, *columns], *([name, *(cell(row.get(c, 0)) for c in columns)] for name, row in rows.items())]
    return "\n".join("  ".join([line[0].ljust(widths[0]), *(v.rjust(w) for v, w in zip(line[1:], widths[1:],
                                                                                      strict=True))])
                     for line in lines)


def report(run: Run, dropped_by: dict[str, dict[str, float] | None]) -> bool:
    """Print the tables; True if nothing was lost silently, duplicated or reordered."""
    per_frame: dict[str, list[str]] = collections.defaultdict(list)  # frame id -> its receivers' outcomes
    receivers: dict[str, dict[str, Any]] = {}
    for client in run.clients.values():
        mine = outcomes(run, client)
        if not mine:
            continue
        for frame_id, result in mine.items():
            per_frame[frame_id].append(result)
        duplicated, reordered = disorder(client.received)
        receivers[f"{client.name} (on {client.instance})"] = {
            "frames": len(mine), **collections.Counter(mine.values()), "duplicated": duplicated,
            "reordered": reordered}
    windows: dict[str, collections.Counter[str]] = {name: collections.Counter() for name, _ in run.windows}
    codes: collections.Counter[str] = collections.Counter()
    for frame in run.sent:
        window = windows[[name for name, start in run.windows if start <= frame.at][-1]]
        if frame.id in frame.sender.errors:  # told, whatever reached whom
            window["refused"] += 1
            window["arrived anyway"] += all(result == "delivered" for result in per_frame[frame.id])
            codes.update(frame.sender.errors[frame.id])
        else:  # as its worst receiver's
            window[max(per_frame[frame.id] or ["delivered"], key=OUTCOMES.index)] += 1
        window["sent"] += 1
        window[f"{frame.tag} sent"] += 1
    windows["all"] = sum(windows.values(), collections.Counter())
    print()
    print(table("fault window", ["sent", "d sent", "r sent", "delivered", "refused", "arrived anyway",
                                 "ended", "lost silently"], dict(windows)))
    print("(d: `to` frames, r: room frames; refused: its sender got an error naming it, of which arrived anyway:\n"
          " at every receiver all the same; else a frame counts under its worst receiver's outcome)")
    twice = sum(1 for frame in run.sent if len(frame.sender.errors.get(frame.id, ())) > 1)
    print("refusals by code: " + ", ".join(f"{code} {n:,}" for code, n in sorted(codes.items()))
          + f"; frames refused more than once: {twice:,}")
    print()
    print(table("receiver", ["frames", *OUTCOMES, "duplicated", "reordered"], receivers))
    print()
    reasons = sorted({reason for counts in dropped_by.values() if counts for reason in counts})
    print(table("instance", [*reasons, "total"], {
        name: {**{r: int(n) for r, n in counts.items()}, "total": int(sum(counts.values()))} if counts
        else {reason: "killed" for reason in [*reasons, "total"]} for name, counts in dropped_by.items()}))
    print(f"(ws_micro_cluster_dropped_total by reason; the senders are on X, which refused "
          f"{codes['backend_unavailable']:,} frames with backend_unavailable: a drop each, and "
          f"{codes['unknown_client']:,} with unknown_client: not a drop)")
    for client in run.clients.values():
        if client.unmatched:
            print(f"{client.name} was sent {len(client.unmatched)} other frames, the first: {client.unmatched[0]}")
    bad = windows["all"]["lost silently"] + sum(r["duplicated"] + r["reordered"] for r in receivers.values())
    print(f"\n{'FAIL' if bad else 'ok'}: {windows['all']['lost silently']:,} frames lost silently, "
          f"{sum(r['duplicated'] for r in receivers.values()):,} duplicated, "
          f"{sum(r['reordered'] for r in receivers.values()):,} reordered")
    return not bad


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@dataclass
class Redis:
    """The redis-server of the run: the first, then the one started again on its port."""

    process: subprocess.Popen[bytes]
    port: int


async def fault_run(args: argparse.Namespace, redis: Redis, x: Server, y: Server, z: Server) -> Run:
    """Stream, inject the faults, and wait for the last frames."""
    servers = {"X": x, "Y": y, "Z": z}
    placement = {"dx": "X", "rx": "X", "mx": "X", "ty": "Y", "my": "Y", "tz": "Z", "mz": "Z"}
    clients = {name: await open_client(name, servers[at], at) for name, at in placement.items()}
    run, c = Run(clients), clients
    for name in ("rx", "mx", "my", "mz"):
        await join(c[name], "r")
    readers = [asyncio.create_task(read(run, client)) for client in clients.values()]
    await until_healthz([x, y, z], lambda h: h.get("instances") == 3, "every instance sees the other two")

    def direct(n: int) -> tuple[dict[str, str], tuple[Client, ...]]:
        to = c["ty"] if n % 2 == 0 else c["tz"]
        return {"to": to.client_id}, (to,)

    def room(n: int) -> tuple[dict[str, str], tuple[Client, ...]]:  # the members whose connections are open
        return {"room": "r"}, tuple(c[m] for m in ("mx", "my", "mz") if m not in run.killed and c[m].ended_at is None)

    run.note("quiet start")
    senders = [asyncio.create_task(stream(run, c["dx"], "d", args.rate, direct)),
               asyncio.create_task(stream(run, c["rx"], "r", args.rate, room))]
    live = [x, y, z]
    ok = {"redis": "ok", "status": "ok"}.items()
    try:
        if not await run.until(lambda: all(len(c[m].received) >= args.rate for m in ("ty", "tz", "mx", "my")),
                                WAIT):
            raise RuntimeError("the frames did not start flowing")
        await asyncio.sleep(args.gap)  # the quiet start: timed by design

        run.note("1 redis restart")
        redis.process.kill()
        redis.process.wait()
        await until_healthz(live, lambda h: h.get("redis") != "ok", "every instance noticed")
        await asyncio.sleep(args.redis_down)  # down for a while: timed by design
        redis.process = start_redis(redis.port)
        await until_healthz(live, lambda h: ok <= h.items(), "every instance back and resynchronised")
        await asyncio.sleep(args.gap)

        run.note("2 redis freeze")
        with stopped(redis.process):
            await asyncio.sleep(args.freeze)  # timed by design
        await until_healthz(live, lambda h: ok <= h.items(), "every instance back")
        await asyncio.sleep(args.gap)

        run.note("3 instance kill")
        z.process.kill()
        run.killed.update(dict.fromkeys(("tz", "mz"), time.monotonic()))
        z.process.wait()
        live = [x, y]
        await until_healthz(live, lambda h: h.get("instances") == 2, "Z reaped")
        await asyncio.sleep(args.gap)

        if args.instance_freeze:
            run.note("4 instance freeze")
            with stopped(y.process):
                await asyncio.sleep(args.instance_freeze)  # timed by design
            await until_healthz(live, lambda h: ok <= h.items() and h.get("instances") == 2, "Y back")
            await asyncio.sleep(args.gap)
    finally:
        run.streaming = False
        await asyncio.gather(*senders)

    def settled() -> bool:
        """Whether every frame has arrived at each receiver alive, or been refused."""
        got = {client.name: set(client.received) for client in clients.values()}
        return all(frame.id in frame.sender.errors or all(frame.id in got[r.name] or r.name in run.killed
                                                          or r.ended_at is not None
                                                          for r in frame.receivers) for frame in run.sent)

    # The last frames may still be on their way, and a refusal takes up to redis_timeout.
    await run.until(settled, args.settle)
    for client in clients.values():
        await client.ws.close()
    await asyncio.gather(*readers)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=100, help="frames a second of each kind (100)")
    parser.add_argument("--gap", type=float, default=5, help="seconds of quiet before and after each fault (5)")
    parser.add_argument("--redis-down", type=float, default=1, help="seconds Redis stays down when restarted (1)")
    parser.add_argument("--freeze", type=float, default=5, help="seconds Redis is frozen (5)")
    parser.add_argument("--instance-freeze", type=float, default=3,
                        help="seconds Y is frozen, past instance_ttl (3; 0: not done)")
    parser.add_argument("--settle", type=float, default=10, help="seconds to wait for the last frames (10)")
    args = parser.parse_args()
    env = {**FAST_HEARTBEAT}
    with run_redis() as (first, url), run_server("ws_micro", {**env, "WS_MICRO_REDIS_URL": url}) as x, \
            run_server("ws_micro", {**env, "WS_MICRO_REDIS_URL": url}) as y, \
            run_server("ws_micro", {**env, "WS_MICRO_REDIS_URL": url}) as z:
        redis = Redis(first, int(url.rsplit(":", 1)[1].split("/")[0]))
        try:
            run = asyncio.run(fault_run(args, redis, x, y, z))
            dropped_by = {"X": dropped(x), "Y": dropped(y), "Z": None}
        finally:
            for process in (y.process, redis.process):  # a stopped process ends only once continued
                if process.poll() is None:
                    process.send_signal(signal.SIGCONT)
            if redis.process is not first:  # run_redis ends the first
                redis.process.terminate()
                redis.process.wait(10)
    return 0 if report(run, dropped_by) else 1


if __name__ == "__main__":
    sys.exit(main())
