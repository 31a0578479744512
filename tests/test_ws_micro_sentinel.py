"""Cluster mode through Redis Sentinel: a real primary, a replica and three sentinels on loopback, two gateway
instances following them, and a failover under traffic (docs/cluster.md, "Redis Sentinel")."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import (
    TIMEOUT,
    RedisServer,
    SentinelServer,
    Server,
    cluster_dropped,
    drop,
    error,
    free_port,
    greeted,
    join,
    new_session,
    nothing_more,
    push,
    recv_json,
    resume_url,
    run_server,
    text,
    without_message,
    ws_client,
)
from websockets.asyncio.client import ClientConnection, connect

import ws_micro_redis

pytestmark = pytest.mark.anyio

# The data nodes and the sentinels have passwords of their own: the URL gives each its own.
PASSWORD, SENTINEL_PASSWORD = "data-node-secret", "sentinel-secret"


def until(predicate: Any, what: str) -> None:
    """Poll a Redis process's state (setting up, before any gateway runs) until ``predicate()`` holds."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def sentinel_master(sentinel: SentinelServer) -> dict[str, str]:
    reply = sentinel.command("SENTINEL", "MASTER", "svc")
    return reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))


@contextlib.contextmanager
def sentinel_group(folder: Path) -> Iterator[tuple[RedisServer, RedisServer, list[SentinelServer]]]:
    """A primary, its replica, and three sentinels that know both and each other (quorum 2)."""
    auth = ("--requirepass", PASSWORD, "--masterauth", PASSWORD)
    primary = RedisServer(free_port(), *auth, password=PASSWORD)
    replica_port = free_port()
    replica = RedisServer(replica_port, "--replicaof", "127.0.0.1", str(primary.port), *auth, password=PASSWORD)
    sentinels = [SentinelServer(free_port(), folder, primary, password=SENTINEL_PASSWORD) for _ in range(3)]
    servers = [primary, replica, *sentinels]
    try:
        for server in servers[:2]:
            server.start()
        until(lambda: replica.command("INFO", "replication").get("master_link_status") == "up", "the replica to sync")
        for sentinel in sentinels:
            sentinel.start()
        # A failover needs a majority of the sentinels each knows, and the replica known to them.
        until(lambda: all(int(sentinel_master(s)["num-other-sentinels"]) == 2 and
                          int(sentinel_master(s)["num-slaves"]) == 1 for s in sentinels),
              "the sentinels to find each other and the replica")
        yield primary, replica, sentinels
    finally:
        for server in servers:
            server.stop()


def sentinel_url(sentinels: list[SentinelServer]) -> str:
    hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in sentinels)
    return f"redis+sentinel://:{PASSWORD}@{hosts}/svc?sentinel_password={SENTINEL_PASSWORD}"


def gateways(stack: contextlib.ExitStack, sentinels: list[SentinelServer], *, instance_ttl: float) -> list[Server]:
    """Two instances following the sentinels, with a fast heartbeat and recovery on."""
    return [stack.enter_context(run_server("--log-level", "warning", "--redis-url", sentinel_url(sentinels),
                                           "--heartbeat-interval", "0.2", "--instance-ttl", str(instance_ttl),
                                           "--recovery-window", "60")) for _ in range(2)]


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_follows_a_sentinel_failover_under_traffic_and_loses_no_frame_silently(
        tmp_path: Path) -> None:
    with sentinel_group(tmp_path) as (primary, replica, sentinels), contextlib.ExitStack() as stack:
        # instance_ttl is long: the test's instances never die, and a peer slower to come back than the other
        # must be waited for (its clients' frames refused), not counted dead.
        x, y = gateways(stack, sentinels, instance_ttl=10)
        for server in (x, y):
            await server.wait_until(lambda s=server: s.get("/healthz").json()["redis"] == "ok", "Sentinel")
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            await join(a, id_a, "r")
            await join(b, id_b, "r")
            # A session parked in Redis by Y, with a frame kept for it.
            away, me, token = await new_session(y.ws)
            assert await join(away, me, "r") == 3
            await drop(away, y, me)
            push(x, f"/api/clients/{me}", "while_away", 1)
            await x.wait_until(lambda: x.get("/healthz").json()["instances"] == 2, "X to see Y")
            assert primary.command("WAIT", "1", str(TIMEOUT * 1000)) == 1  # the replica has all of it

            sent: dict[ClientConnection, list[str]] = {a: [], b: []}
            received: dict[ClientConnection, list[str]] = {a: [], b: []}
            refused: dict[str, tuple[str, float]] = {}  # event -> (error code, when its refusal came)
            streaming = True
            progress = anyio.Event()

            async def stream(ws: ClientConnection, own: str, to: str, tag: str) -> None:
                n = 0
                while streaming:  # about 100 frames a second each way
                    event = f"{tag}{n}"
                    sent[ws].append(event)
                    await ws.send(text(event, own, to=to))
                    n += 1
                    await anyio.sleep(0.01)  # the pace of the stream, not a wait for anything

            async def read(ws: ClientConnection, peer: ClientConnection) -> None:
                nonlocal progress
                async for message in ws:
                    frame = json.loads(message)
                    if frame["event"] == "error":
                        refused[frame["data"]["data"]["event"]] = (frame["data"]["data"]["code"], time.monotonic())
                    else:
                        received[peer].append(frame["event"])  # what ``peer`` sent
                    progress.set()
                    progress = anyio.Event()

            async def until_progress(predicate: Any) -> None:
                with anyio.fail_after(TIMEOUT):
                    while not predicate():
                        await progress.wait()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(read, a, b)
                tasks.start_soon(read, b, a)
                tasks.start_soon(stream, a, id_a, id_b, "ab")
                tasks.start_soon(stream, b, id_b, id_a, "ba")
                await until_progress(lambda: min(map(len, received.values())) >= 20)
                primary.stop()  # SIGKILL
                killed = time.monotonic()
                for server in (x, y):
                    await server.wait_until(lambda s=server: s.metric("ws_micro_cluster_new_primaries_total") == 1,
                                            "the instance to find the new primary by itself")
                for server in (x, y):
                    await server.wait_until(lambda s=server: s.get("/healthz").json()["status"] == "ok",
                                            "the instance to be back, every peer resynchronised")
                back = time.monotonic()
                flowing_again = {ws: len(frames) + 20 for ws, frames in received.items()}
                await until_progress(lambda: all(len(received[ws]) >= flowing_again[ws] for ws in received))
                streaming = False
                # Every frame sent is received or refused; the last ones may still be on their way.
                await until_progress(lambda: not (set(sent[a]) | set(sent[b])) - set(received[a]) - set(received[b])
                                     - refused.keys())
                tasks.cancel_scope.cancel()

            assert replica.command("ROLE")[0] == "master"
            assert refused, "the failover refused nothing: it did not happen while frames flowed"
            assert {code for code, _ in refused.values()} == {"backend_unavailable"}
            for ws in (a, b):
                assert len(received[ws]) == len(set(received[ws])), "a frame arrived twice"
                assert received[ws] == [event for event in sent[ws] if event in set(received[ws])], "out of order"
            # Each refusal is counted where it was made, and shows in /metrics.
            assert cluster_dropped(x) == len([event for event in refused if event.startswith("ab")])
            assert cluster_dropped(y) == len([event for event in refused if event.startswith("ba")])
            times = sorted(when for _, when in refused.values())
            print(f"\nfailover: {len(refused)} frames refused over {times[-1] - times[0]:.2f} s, from "
                  f"{times[0] - killed:.2f} s to {times[-1] - killed:.2f} s after the primary was killed; both "
                  f"instances back and resynchronised {back - killed:.2f} s after")

            # The rooms, and the parked session, are on the new primary: a room publish reaches every member,
            # the one away included, and the session resumes through the other instance with what it missed.
            assert x.post("/api/rooms/r", {"event": "after", "data": {"data": {"n": 2}}}).json() == {"delivered": 3}
            assert (await recv_json(a))["event"] == (await recv_json(b))["event"] == "after"
            async with connect(resume_url(x, token, offset=1)) as resumed:
                info = await greeted(resumed)
                assert (info["client_id"], info["data"]["data"]["recovered"]) == (me, True)
                assert info["data"]["data"]["rooms"] == ["r"]
                assert [(await recv_json(resumed))["event"] for _ in range(2)] == ["while_away", "after"]
                await nothing_more(resumed, me)
            sent_after = text("chat", id_b, {"n": 3}, to=id_a)
            await b.send(sent_after)
            assert json.loads(await a.recv()) == json.loads(sent_after)


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_promoted_replica_that_lacks_the_newest_writes_is_resynchronised_as_after_a_restart(
        tmp_path: Path) -> None:
    with sentinel_group(tmp_path) as (primary, replica, sentinels), contextlib.ExitStack() as stack:
        x, y = gateways(stack, sentinels, instance_ttl=30)
        for server in (x, y):
            await server.wait_until(lambda s=server: s.get("/healthz").json()["redis"] == "ok", "Sentinel")
        await x.wait_until(lambda: x.get("/healthz").json()["instances"] == 2, "X to see Y")
        # The replica stops following (it cannot log in again), so what Y writes now never reaches it: a
        # client, its room, and a session parked.
        replica.command("CONFIG", "SET", "masterauth", "wrong")
        primary.command("CLIENT", "KILL", "TYPE", "replica")
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            await join(b, id_b, "late")
            away, me, token = await new_session(y.ws)
            await drop(away, y, me)
            await y.wait_until(lambda: y.metric("ws_micro_sessions_parked") == 1, "Y to park the session")
            assert primary.command("HGET", "ws_micro:directory", id_b) == y.get("/healthz").json()["instance"]
            y.process.send_signal(signal.SIGSTOP)  # so X is back first, for as long as the test needs
            try:
                primary.stop()
                replica.command("CONFIG", "SET", "masterauth", PASSWORD)
                await x.wait_until(lambda: x.metric("ws_micro_cluster_new_primaries_total") == 1, "X to fail over")
                assert replica.command("ROLE")[0] == "master"
                assert replica.command("HGET", "ws_micro:directory", id_b) is None  # lost with the old primary
                # X cannot know what the new primary lacks until Y has written its state again: B's frames and
                # the room's publishes are refused, not answered unknown_client or delivered to nobody.
                await a.send(text("to_b", id_a, to=id_b))
                assert without_message(await recv_json(a)) == error(id_a, "backend_unavailable", "to_b")
                response = x.post("/api/rooms/late", {"event": "x", "data": {"data": {}}})
                assert response.status_code == 503, response.text
                assert x.get("/healthz").json()["redis"] == "resyncing"
            finally:
                y.process.send_signal(signal.SIGCONT)
            await x.wait_until(lambda: x.get("/healthz").json()["status"] == "ok", "X to see Y back")
            assert x.post("/api/rooms/late", {"event": "news", "data": {"data": {}}}).json() == {"delivered": 1}
            assert (await recv_json(b))["event"] == "news"
            sent = text("to_b", id_a, {"again": True}, to=id_b)
            await a.send(sent)
            assert json.loads(await b.recv()) == json.loads(sent)
            assert x.metric("ws_micro_errors_total", code="unknown_client") == 0
            # The session the new primary never had is over, said so, and no longer held by Y.
            assert y.metric("ws_micro_sessions_parked") == 0
            async with connect(resume_url(x, token, offset=1)) as resumed:
                info = await greeted(resumed)
                assert info["client_id"] != me and info["data"]["data"]["recovered"] is False


def test_a_sentinel_url_names_the_sentinels_the_service_and_a_password_and_tls_for_each_side() -> None:
    sentinels, service, primary, to_sentinels = ws_micro_redis._sentinel_url(
        "rediss+sentinel://app:p%40ss@s1,[::1]:26380/mymaster/2?sentinel_password=s%26p&ssl_cert_reqs=required"
        "&ssl_ca_certs=/etc/ca.pem")
    assert (sentinels, service) == ([("s1", 26379), ("::1", 26380)], "mymaster")
    # The data nodes get the URL's user, password and db; the sentinels their own password; TLS for both.
    assert primary == {"username": "app", "password": "p@ss", "db": 2, "ssl": True, "ssl_cert_reqs": "required",
                       "ssl_ca_certs": "/etc/ca.pem"}
    assert to_sentinels == {"password": "s&p", "ssl": True, "ssl_cert_reqs": "required", "ssl_ca_certs": "/etc/ca.pem"}
    # Without TLS, without passwords: db 0, and the sentinels with nothing of the data nodes'.
    assert ws_micro_redis._sentinel_url("redis+sentinel://:pw@s1:5000/svc") == (
        [("s1", 5000)], "svc", {"password": "pw", "db": 0}, {})
