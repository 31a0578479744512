"""Tests of cluster mode: a real redis-server and several real gateway processes.

Every ``test_cluster_*`` is here, whatever feature it is about: clients on
different instances behave as if on one server, through Redis going away,
hanging and coming back empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import msgspec
import pytest
import redis
from conftest import (
    FAST_HEARTBEAT,
    JWT_SECRET,
    ROOT,
    TIMEOUT,
    CuttingProxy,
    EventBackend,
    RedisServer,
    Server,
    client_frame,
    closed_with,
    cluster,
    cluster_dropped,
    cut,
    drop,
    error,
    eventually,
    forward_options,
    frame,
    free_port,
    greeted,
    join,
    mint,
    new_session,
    nothing_more,
    push,
    raw_websocket,
    recv_json,
    recv_text,
    resume_url,
    run_server,
    segments_in,
    text,
    until_away,
    without_message,
    ws_client,
)
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import ws_micro
import ws_micro_redis
from ws_micro import create_app

pytestmark = pytest.mark.anyio


# --------------------------------------------------------------------------
# Cluster mode: real redis-server, several real uvicorn instances
# --------------------------------------------------------------------------


def instance_of(server: Server) -> str:
    return str(server.get("/healthz").json()["instance"])


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_two_instances_behave_as_one_server(redis_server: RedisServer) -> None:
    with cluster(redis_server, 2) as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            # `to` reaches a client on the other instance, byte for byte, both ways.
            sent = text("chat", id_a, {"text": "hi B"}, to=id_b)
            await a.send(sent)
            assert await recv_text(b) == sent
            await b.send(text("chat", id_b, {"text": "hi A"}, to=id_a))
            assert json.loads(await recv_text(a))["data"]["data"] == {"text": "hi A"}

            # Rooms span instances: counts are cluster-wide, a member's frame reaches the others.
            assert await join(a, id_a, "lobby") == 1
            assert await join(b, id_b, "lobby") == 2
            sent = text("chat", id_b, {"text": "hi room"}, room="lobby")
            await b.send(sent)
            assert await recv_text(a) == sent

            # The API works on whichever instance the backend calls.
            assert y.post(f"/api/clients/{id_a}", {"event": "notice", "data": {"data": {"n": 1}}}).json() == {
                "delivered": 1}
            assert await recv_json(a) == {"event": "notice", "client_id": id_a, "data": {"data": {"n": 1}}}
            listed = x.get("/api/clients").json()
            assert listed["count"] == 2
            assert {c["client_id"]: c["instance"] for c in listed["clients"]} == {
                id_a: instance_of(x), id_b: instance_of(y)}
            entry = x.get(f"/api/clients/{id_b}").json()
            assert entry["instance"] == instance_of(y) and entry["rooms"] == ["lobby"]
            assert y.post("/api/rooms/lobby", {"event": "news", "data": {"data": {}}}).json() == {"delivered": 2}
            assert x.post("/api/broadcast", {"event": "all", "data": {"data": {}}}).json() == {"delivered": 2}
            for ws, own in ((a, id_a), (b, id_b)):
                assert await recv_json(ws) == {"event": "news", "client_id": own, "data": {"data": {}}}
                assert await recv_json(ws) == {"event": "all", "client_id": own, "data": {"data": {}}}

            # Ids that exist nowhere are still unknown.
            assert x.post("/api/clients/nobody", {"event": "x", "data": {"data": {}}}).status_code == 404
            assert x.get("/api/clients/nobody").status_code == 404
            await a.send(text("chat", id_a, to="nobody"))
            assert (await recv_json(a))["data"]["data"]["code"] == "unknown_client"

            # DELETE on the other instance closes the client, and it leaves the directory and its room.
            assert httpx.delete(f"{y.http}/api/clients/{id_a}", timeout=TIMEOUT).json() == {"disconnected": 1}
            with pytest.raises(ConnectionClosed):
                await recv_json(a)
            assert a.close_code == 1000 and a.close_reason == "disconnected by the server"
            await y.wait_until(lambda: y.get("/api/clients").json()["count"] == 1, "A to leave the directory")
            await b.send(text("chat", id_b, to=id_a))
            assert (await recv_json(b))["data"]["data"]["code"] == "unknown_client"
            await b.send(text("leave", id_b, {"room": "lobby"}))
            assert (await recv_json(b))["data"]["data"] == {"room": "lobby", "members": 0}


def redis_calls(redis_server: RedisServer, command: str) -> int:
    """How many times redis-server ran ``command`` since its statistics were reset (scripts' calls included)."""
    with redis.Redis.from_url(redis_server.url) as client:
        return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_frames_sent_to_an_instance_at_one_moment_travel_together_and_arrive_in_order(
        redis_server: RedisServer) -> None:
    frames = 300
    with cluster(redis_server, 2) as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b), ws_client(y.ws) as (c, id_c):
            for ws, own in ((a, id_a), (b, id_b), (c, id_c)):
                await join(ws, own, "r")
            with redis.Redis.from_url(redis_server.url) as client:
                client.config_resetstat()
            # A burst, to B and to the room by turns: more frames for Y at a moment than one msgpack fixarray holds.
            sent = [text("chat", id_a, {"n": n}, **({"to": id_b} if n % 2 else {"room": "r"})) for n in range(frames)]
            for one in sent:
                await a.send(one)
            assert [await recv_text(b) for _ in range(frames)] == sent
            assert [await recv_text(c) for _ in range(frames // 2)] == sent[::2]
            await nothing_more(a, id_a)
            # One pub/sub message per flush, not per frame (the heartbeats publish nothing).
            assert redis_calls(redis_server, "publish") <= frames // 10
            assert y.metric("ws_micro_cluster_received_total") == frames


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_backlog_of_large_frames_for_an_instance_reaches_it_whole(redis_server: RedisServer) -> None:
    assert redis_server.process is not None
    frames, pad = 600, "x" * 60_000  # 36 MB: past Redis's output buffer limit for a subscriber, were it one message
    with cluster(redis_server, 2, "--redis-timeout", "10") as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            sent = [text("chat", id_a, {"n": n, "pad": pad}, to=id_b) for n in range(frames)]
            redis_server.process.send_signal(signal.SIGSTOP)  # X's outbox fills behind a flush that waits
            try:
                for one in sent:
                    await a.send(one)
                await nothing_more(a, id_a)
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
            for n, one in enumerate(sent):
                assert await recv_text(b) == one, n
            await nothing_more(a, id_a)
            assert x.metric("ws_micro_cluster_dropped_total", reason="no_subscriber") == 0


async def relayed(ws: ClientConnection) -> str:
    """The next frame that is not a presence event."""
    while True:
        received = await recv_text(ws)
        assert isinstance(received, str)
        if json.loads(received)["event"] != "presence":
            return received


async def nothing_but_presence(ws: ClientConnection, client_id: str) -> None:
    """The frames received so far, presence events aside, were all there was."""
    await ws.send(json.dumps(frame("ping", client_id, {"last": True})))
    assert json.loads(await relayed(ws)) == frame("pong", client_id, {"last": True})


@pytest.mark.process
@pytest.mark.redis
@pytest.mark.internals
async def test_cluster_the_frames_one_message_from_another_instance_brings_a_client_go_out_in_one_write(
        redis_server: RedisServer) -> None:
    # Frames relayed across instances at one moment travel as one pub/sub message; the receiving instance writes a
    # client's share of it in a write or two (a round, as for a read: docs/performance.md), not one a frame.
    with cluster(redis_server, 2) as (first, second):
        async with ws_client(second.ws) as (b, id_b):
            sock, me = await anyio.to_thread.run_sync(raw_websocket, first, 65536)
            with sock:
                receiving = b.transport.get_extra_info("socket")
                segments = segments_in(receiving)
                sock.sendall(b"".join(client_frame(0x1, text("chat", me, {"n": n}, to=id_b).encode())
                                      for n in range(40)))
                for n in range(40):
                    assert await recv_json(b) == frame("chat", me, {"n": n}, to=id_b)
                assert segments_in(receiving) - segments <= 8  # about 40 without the round


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_room_all_on_one_instance_is_relayed_there_until_the_directory_says_it_moved(
        redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--recovery-window", "60", "--presence-events") as (x, y):
        async with ws_client(x.ws) as (a, id_a):
            ws, me, token = await new_session(x.ws)
            await join(a, id_a, "r")
            await join(ws, me, "r")
            # Every member here: once a frame's answer from Redis has said so, Redis is not asked.
            first = text("chat", id_a, {"n": -1}, room="r")
            await a.send(first)
            assert await relayed(ws) == first
            await x.wait_until(lambda: x.metric("ws_micro_cluster_rooms_alone") == 1, "the answer to say so")
            with redis.Redis.from_url(redis_server.url) as client:
                client.config_resetstat()
            sent = [text("chat", id_a, {"n": n}, room="r") for n in range(50)]
            for one in sent:
                await a.send(one)
            assert [await relayed(ws) for _ in sent] == sent
            await nothing_but_presence(a, id_a)
            assert redis_calls(redis_server, "evalsha") <= 2  # the heartbeats', if any: no relay script

            # Another instance gains a member: its join tells this one, and the next frame reaches it; as it
            # leaves, the room is all here again.  Again and again, with no wait between the join and the frame.
            async with ws_client(y.ws) as (b, id_b):
                for n in range(10):
                    assert await join(b, id_b, "r") == 3
                    one = text("chat", id_a, {"joined": n}, room="r")
                    await a.send(one)
                    assert await relayed(b) == one
                    assert await relayed(ws) == one
                    await b.send(text("leave", id_b, {"room": "r"}))
                    assert json.loads(await relayed(b))["event"] == "left"
                    for _ in range(3):
                        one = text("chat", id_a, {"alone": n}, room="r")
                        await a.send(one)
                        assert await relayed(ws) == one
                    # (Their answer has come: before it, they might still reach b's next join through Redis.)
                    await x.wait_until(lambda: x.metric("ws_micro_cluster_rooms_alone") == 1, "the room to be here")
                await nothing_but_presence(b, id_b)

            # A member goes away: its session waits in Redis, which keeps the room's frames for it, and it gets them
            # as it resumes through the other instance; then the room's frames reach it there.
            await drop(ws, x, me)
            kept = [text("chat", id_a, {"kept": n}, room="r") for n in range(3)]
            for one in kept:
                await a.send(one)
            await nothing_but_presence(a, id_a)
            async with connect(resume_url(y, token)) as back:
                assert (await greeted(back))["data"]["data"]["recovered"] is True
                assert [await relayed(back) for _ in kept] == kept
                for n in range(3):
                    one = text("chat", id_a, {"back": n}, room="r")
                    await a.send(one)
                    assert await relayed(back) == one

                # It leaves, and the room is all here again.  Redis restarts empty, and the room's watchers with
                # it, so that its join after is told to nobody: this instance forgot what it had found as it lost
                # Redis (the sender hears that), and asks again.
                await back.send(text("leave", me, {"room": "r"}))
                assert json.loads(await relayed(back))["event"] == "left"
                for n in range(3):
                    await a.send(text("chat", id_a, {"alone": n}, room="r"))
                await x.wait_until(lambda: x.metric("ws_micro_cluster_rooms_alone") == 1, "the room to be here")
                redis_server.stop()
                await x.wait_until(lambda: x.get("/healthz").json()["redis"] == "unavailable", "X to notice")
                await a.send(text("chat", id_a, {"away": True}, room="r"))
                assert json.loads(await relayed(a))["data"]["data"]["code"] == "backend_unavailable"
                redis_server.start()
                for server in (x, y):
                    await server.wait_until(lambda s=server: s.get("/healthz").json()["status"] == "ok",
                                            "the instance to reconnect")
                assert await join(back, me, "r") == 2
                one = text("chat", id_a, {"after": True}, room="r")
                await a.send(one)
                assert await relayed(back) == one
                await nothing_but_presence(a, id_a)


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_an_error_that_comes_back_from_redis_carries_the_frames_id(redis_server: RedisServer) -> None:
    with cluster(redis_server, 2) as (x, y):
        async with ws_client(x.ws) as (a, id_a):
            async with ws_client(y.ws) as (b, id_b):
                # A relay to the other instance reaches its client unchanged, and its sender gets no answer.
                sent = json.dumps({**frame("chat", id_a, {"n": 1}, to=id_b), "id": "to-b"})
                await a.send(sent)
                assert await recv_text(b) == sent
                await a.send(text("ping", id_a))
                assert await recv_json(a) == frame("pong", id_a)
            await x.wait_until(lambda: x.get(f"/api/clients/{id_b}").status_code == 404, "B to leave the cluster")
            # B is gone from the other instance: the answer comes back through Redis, after the frame was
            # handled here, and still names the frame it answers.
            for request_id in ("to-b", 7, "é🙂"):
                await a.send(json.dumps({**frame("chat", id_a, {"n": 2}, to=id_b), "id": request_id}))
                refused = await recv_json(a)
                assert refused["data"]["data"].pop("message") == f"no client with id {id_b!r}"
                assert refused == {**error(id_a, "unknown_client", "chat"), "id": request_id}
            # Redis away: the frame may not have arrived, and the error says which frame it was.
            redis_server.stop()
            await a.send(json.dumps({**frame("chat", id_a, {"n": 3}, to=id_b), "id": 8}))
            refused = await recv_json(a)
            assert (refused["id"], refused["data"]["data"]["code"]) == (8, "backend_unavailable")
        assert x.metric("ws_micro_errors_total", code="unknown_client") == 3


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_three_instances_share_rooms_and_broadcasts(redis_server: RedisServer) -> None:
    with cluster(redis_server, 3) as servers:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(ws_client(s.ws)) for s in servers]
            for count, (ws, own) in enumerate(clients, start=1):
                assert await join(ws, own, "r") == count
            (a, id_a), (b, _), (c, id_c) = clients
            sent = text("chat", id_c, {"from": "C"}, room="r")
            await c.send(sent)
            assert [await recv_text(a), await recv_text(b)] == [sent, sent]
            await a.send(text("chat", id_a, {"from": "A"}, to=id_c))
            assert (await recv_json(c))["data"]["data"] == {"from": "A"}
            assert servers[1].post("/api/broadcast", {"event": "all", "data": {"data": {}}}).json() == {
                "delivered": 3}
            for ws, own in clients:
                assert await recv_json(ws) == {"event": "all", "client_id": own, "data": {"data": {}}}
            assert servers[0].get("/api/clients").json()["count"] == 3


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_two_workers_on_one_port(redis_server: RedisServer) -> None:
    env = {"WS_MICRO_REDIS_URL": redis_server.url, "WS_MICRO_HEARTBEAT_INTERVAL": "0.2",
           "WS_MICRO_INSTANCE_TTL": "1.0"}
    with run_server("--workers", "2", "--log-level", "warning", env=env, uvicorn_app=True) as server:
        # Until a worker has joined the cluster its clients are in no directory: wait for both to say "ok".
        joined: set[str] = set()

        def both_joined() -> bool:
            health = server.get("/healthz").json()
            if health["status"] == "ok":
                joined.add(health["instance"])
            return len(joined) == 2

        await server.wait_until(both_joined, "both workers to join the cluster")
        async with contextlib.AsyncExitStack() as stack:
            # The kernel spreads connections over the workers; connect until both hold some.
            clients: dict[str, tuple[ClientConnection, str]] = {}
            for _ in range(60):
                ws, own = await stack.enter_async_context(ws_client(server.ws))
                where = (await anyio.to_thread.run_sync(server.get, f"/api/clients/{own}")).json()
                clients.setdefault(where["instance"], (ws, own))
                if len(clients) == 2:
                    break
            assert len(clients) == 2, "every connection landed on one worker"
            (a, id_a), (b, id_b) = clients.values()
            sent = text("chat", id_a, {"text": "across workers"}, to=id_b)
            await a.send(sent)
            assert await recv_text(b) == sent
            total = server.get("/api/clients").json()["count"]
            assert server.post("/api/broadcast", {"event": "all", "data": {"data": {}}}).json() == {
                "delivered": total}
            assert (await recv_json(a))["event"] == (await recv_json(b))["event"] == "all"


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_instance_killed_with_sigkill_drops_out(redis_server: RedisServer) -> None:
    ttl = 3.0
    with cluster(redis_server, 1, "--heartbeat-interval", "0.2", "--instance-ttl", str(ttl)) as (x,), \
            run_server("--log-level", "warning", "--redis-url", redis_server.url,
                       "--heartbeat-interval", "0.2", "--instance-ttl", str(ttl)) as doomed:
        async with ws_client(x.ws) as (a, id_a), ws_client(doomed.ws) as (c, id_c):
            await join(a, id_a, "r")
            assert await join(c, id_c, "r") == 2
            doomed.process.kill()
            killed_at = time.monotonic()
            doomed.process.wait(TIMEOUT)
            # Until its deadline passes the directory still names it: a frame for it is published to
            # nobody, so its sender is told it may not have arrived (C may only be reconnecting), and
            # it is counted as dropped (pub/sub is at most once).  So is a room frame.
            await a.send(text("chat", id_a, to=id_c))
            assert without_message(await recv_json(a)) == error(id_a, "backend_unavailable", "chat")
            await a.send(text("news", id_a, room="r"))
            assert without_message(await recv_json(a)) == error(id_a, "backend_unavailable", "news")
            assert x.metric("ws_micro_cluster_dropped_total", reason="no_subscriber") == 2
            await x.wait_until(lambda: x.get("/api/clients").json()["count"] == 1, "the killed instance to drop out")
            # Once it has dropped out, its client is gone.
            await a.send(text("chat", id_a, to=id_c))
            assert without_message(await recv_json(a)) == error(id_a, "unknown_client", "chat")
            assert time.monotonic() - killed_at < ttl + 1.0
            # No ghost clients or room members are left behind.
            assert x.get(f"/api/clients/{id_c}").status_code == 404
            await a.send(text("leave", id_a, {"room": "r"}))
            assert (await recv_json(a))["data"]["data"] == {"room": "r", "members": 0}
            # Its keys go at the next heartbeat of a live instance.
            await x.wait_until(lambda: redis_server.command("HKEYS", "ws_micro:directory") == [id_a],
                               "the killed instance's directory entries to be reaped")
            assert redis_server.command("ZRANGE", "ws_micro:instances", "0", "-1") == [instance_of(x)]
            assert redis_server.command("EXISTS", "ws_micro:room:r") == 0  # A left, C was reaped


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_survives_redis_going_away_and_coming_back(redis_server: RedisServer) -> None:
    with cluster(redis_server, 2) as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(x.ws) as (a2, id_a2), ws_client(y.ws) as (b, id_b):
            await join(a, id_a, "r")
            await join(b, id_b, "r")
            redis_server.stop()
            await x.wait_until(lambda: x.get("/healthz").json()["status"] == "degraded", "X to notice")
            assert x.get("/healthz").json()["redis"] == "unavailable"
            assert x.metric("ws_micro_cluster_up") == 0

            # Local delivery keeps working.
            sent = text("chat", id_a, {"local": True}, to=id_a2)
            await a.send(sent)
            assert await recv_text(a2) == sent
            # Cross-instance sends fail with a clear error, event or HTTP 503.
            await a.send(text("chat", id_a, to=id_b))
            error = (await recv_json(a))["data"]["data"]
            assert error["code"] == "backend_unavailable" and "Redis is unavailable" in error["message"]
            await a.send(text("chat", id_a, {"n": 1}, room="r"))
            assert (await recv_json(a))["data"]["data"]["code"] == "backend_unavailable"
            for response in (x.post(f"/api/clients/{id_b}", {"event": "x", "data": {"data": {}}}),
                             x.post("/api/broadcast", {"event": "x", "data": {"data": {}}}),
                             x.get("/api/clients")):
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "backend_unavailable"
            assert x.metric("ws_micro_cluster_dropped_total", reason="backend_unavailable") >= 3

            # Redis comes back empty: both instances reconnect and write their clients and rooms again.
            redis_server.start()
            for server in (x, y):
                await server.wait_until(lambda s=server: s.get("/healthz").json()["status"] == "ok",
                                        "the instance to reconnect")
            await y.wait_until(lambda: y.get("/api/clients").json()["count"] == 3, "every client re-registered")
            sent = text("chat", id_b, {"again": True}, to=id_a)
            await b.send(sent)
            assert await recv_text(a) == sent
            assert x.post("/api/rooms/r", {"event": "news", "data": {"data": {}}}).json() == {"delivered": 2}
            assert (await recv_json(a))["event"] == (await recv_json(b))["event"] == "news"


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_notices_a_redis_that_hangs_and_recovers(redis_server: RedisServer) -> None:
    assert redis_server.process is not None
    with cluster(redis_server, 2, "--redis-timeout", "0.5") as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            redis_server.process.send_signal(signal.SIGSTOP)  # no reset, no answer: only timeouts tell
            try:
                await x.wait_until(lambda: x.get("/healthz").json()["status"] == "degraded", "X to time out")
                await a.send(text("chat", id_a, to=id_b))
                assert (await recv_json(a))["data"]["data"]["code"] == "backend_unavailable"
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
            # Each instance reconnects on its own time; until Y has, its clients are in no directory.
            for server, name in ((x, "X"), (y, "Y")):
                await server.wait_until(lambda s=server: s.get("/healthz").json()["status"] == "ok",
                                        f"{name} to recover")
            sent = text("chat", id_a, {"n": 2}, to=id_b)
            await a.send(sent)
            assert await recv_text(b) == sent


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_an_instance_that_cannot_reach_redis_at_startup_says_so_once(tmp_path: Path) -> None:
    # It said nothing until Redis came: an operator saw a degraded /healthz and an empty log.
    redis_server = RedisServer(free_port())
    log = tmp_path / "server.log"
    with run_server("--redis-url", redis_server.url, *FAST_HEARTBEAT, log=log) as server:
        await server.wait_until(lambda: "cannot reach Redis" in log.read_text(), "the warning")
        assert server.get("/healthz").json()["redis"] == "unavailable"
        redis_server.start()
        try:
            await server.wait_until(lambda: server.get("/healthz").json()["redis"] == "ok", "Redis to be reached")
        finally:
            redis_server.stop()
    lines = log.read_text().splitlines()
    said = [line for line in lines if "cannot reach Redis" in line]
    # The reason, as redis-py words it: "Error 111 connecting to ..." (the rest differs between event loops).
    assert len(said) == 1 and "WARNING" in said[0], lines
    assert f"Error 111 connecting to 127.0.0.1:{redis_server.port}" in said[0]
    assert "Traceback" not in log.read_text()


async def in_room_on_both(x: Server, a: ClientConnection, id_a: str, b: ClientConnection, id_b: str) -> None:
    """A on X and B on Y join room "r", and X sees Y."""
    await join(a, id_a, "r")
    await join(b, id_b, "r")
    await x.wait_until(lambda: x.get("/healthz").json()["instances"] == 2, "X to see Y")


@contextlib.contextmanager
def proxied_pair(redis_server: RedisServer) -> Iterator[tuple[Server, CuttingProxy, Server]]:
    """Instances X and Y, Y reaching Redis through a CuttingProxy, for the test to cut it off (or pause it)."""
    with cluster(redis_server, 1) as (x,), CuttingProxy(redis_server.port) as proxy, \
            run_server("--log-level", "warning", "--redis-url", f"redis://127.0.0.1:{proxy.port}/0",
                       *FAST_HEARTBEAT) as y:
        yield x, proxy, y


async def ended_as_taken_for_dead(ws: ClientConnection) -> None:
    """Read until the connection ends: ended by its instance, back after the others had taken it for dead (1012),
    and without the room frame "news" they relayed meanwhile."""
    with pytest.raises(ConnectionClosed):
        while True:
            assert (await recv_json(ws))["event"] != "news"
    assert (ws.close_code, ws.close_reason) == (1012, ws_micro_redis.TAKEN_FOR_DEAD)


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_room_frame_relayed_while_a_frozen_instance_is_taken_for_dead_is_not_lost_without_a_word(
        redis_server: RedisServer) -> None:
    # Y stops for longer than instance_ttl (a long pause, a migrated VM, a partition from Redis), so X reaps it,
    # while Y's clients stay connected.  A room frame X relays meanwhile missed Y's member, and nobody was told
    # (bench/cluster_faults.py's "instance freeze" lost 207 so).  Now Y, back, finds it was taken for dead and ends
    # its connections as a dead instance's would have ended: its member is told, with 1012 to connect again.
    with cluster(redis_server, 2) as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            await in_room_on_both(x, a, id_a, b, id_b)
            y.process.send_signal(signal.SIGSTOP)
            try:
                await x.wait_until(lambda: x.get("/healthz").json()["instances"] == 1, "X to take Y for dead")
                await a.send(json.dumps({**frame("news", id_a, room="r"), "id": "while_reaped"}))
                # A relay to nobody: its refusal comes back through Redis after the room frame's answer.
                await a.send(json.dumps({**frame("probe", id_a, to="nobody"), "id": "probe"}))
                answers = [await recv_json(a)]
                while answers[-1].get("id") != "probe":
                    answers.append(await recv_json(a))
            finally:
                y.process.send_signal(signal.SIGCONT)
            assert [answer.get("id") for answer in answers] == ["probe"]  # the room frame: no word to its sender
            await ended_as_taken_for_dead(b)
            await y.wait_until(lambda: y.get("/healthz").json()["status"] == "ok", "Y to be back")
            assert y.metric("ws_micro_cluster_taken_for_dead_total") == 1
            assert y.metric("ws_micro_disconnects_total", reason="taken_for_dead") == 1
            # Y is back in the cluster: a client that connects to it again gets the room's frames.
            async with ws_client(y.ws) as (b2, id_b2):
                await join(b2, id_b2, "r")
                await x.wait_until(lambda: x.get("/healthz").json()["instances"] == 2, "X to see Y again")
                await a.send(text("after", id_a, room="r"))
                while (await recv_json(b2))["event"] != "after":  # presence events may come first
                    pass


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_an_instance_cut_off_from_redis_past_its_deadline_ends_its_connections_when_back(
        redis_server: RedisServer) -> None:
    # A partition between Y and Redis, not between Y and its clients: X, which still reaches Redis, takes Y for
    # dead and drops the room's frames for Y's member unseen.  Y, reconnecting, finds the mark X left, and ends
    # its connections (the frozen-instance test above checks the same through a heartbeat).
    with proxied_pair(redis_server) as (x, proxy, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            await in_room_on_both(x, a, id_a, b, id_b)
            taken = f"ws_micro:taken:{instance_of(y)}"
            proxy.cut(hold=True)  # Y's connections to Redis reset, and each it opens again, until released
            await x.wait_until(lambda: redis_server.command("EXISTS", taken) == 1, "X to take Y for dead")
            await a.send(text("news", id_a, room="r"))  # reaches no member on Y, and nobody is told
            await y.wait_until(lambda: y.get("/healthz").json()["redis"] == "unavailable", "Y to notice")
            proxy.release()
            await ended_as_taken_for_dead(b)
            await y.wait_until(lambda: y.get("/healthz").json()["status"] == "ok", "Y to be back")
            assert y.metric("ws_micro_cluster_taken_for_dead_total") == 1
            assert redis_server.command("EXISTS", taken) == 0  # read, and taken away


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_publishing_to_rooms_with_no_member_here_leaves_no_watcher_key_in_redis(
        redis_server: RedisServer) -> None:
    # The relay script made the publishing instance a watcher of any room whose instances were all live, even one
    # with no member anywhere: each publish to a new name left a ws_micro:room-watch:<room> in Redis for good
    # (nothing deletes it but a change of the room's instances), 50 publishes, 50 keys.  A watcher is now an
    # instance with members in the room, which its last member's leaving takes out.
    with cluster(redis_server, 2) as (x, y):
        async with ws_client(y.ws) as (b, id_b):
            await join(b, id_b, "elsewhere")  # a room with members on Y only
            for n in range(50):
                assert x.post(f"/api/rooms/empty-{n}", {"event": "news", "data": {"data": {}}}).status_code == 202
            assert x.post("/api/rooms/elsewhere", {"event": "news", "data": {"data": {}}}).json() == {"delivered": 1}
            assert redis_server.command("KEYS", "ws_micro:room-watch:*") == []
            # A room with members here is still watched (its frames cost no lookup), and its key goes with them.
            async with ws_client(x.ws) as (a, id_a):
                await join(a, id_a, "elsewhere")
                for n in range(3):
                    await a.send(text("chat", id_a, {"n": n}, room="elsewhere"))
                    while (await recv_json(b))["event"] != "chat":  # presence events may come first
                        pass
                assert redis_server.command("SMEMBERS", "ws_micro:room-watch:elsewhere") == {instance_of(x)}
            await x.wait_until(lambda: redis_server.command("KEYS", "ws_micro:room-watch:*") == [],
                               "X's last member of the room to take X out of its watchers")


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_late_heartbeat_from_a_partitioned_instance_does_not_take_its_taken_for_dead_mark(
        redis_server: RedisServer) -> None:
    # A partition that heals, as a network's does: the heartbeat Y sent into it (and gave up on) is retransmitted
    # by TCP and reaches Redis once the partition heals, before Y reconnects.  That heartbeat must not take away
    # the mark X left (ws_micro:taken:<Y>): it did, its answer went nowhere, and Y, back, kept its connections
    # while the room's frames X relayed meanwhile had missed Y's member without a word.
    with proxied_pair(redis_server) as (x, proxy, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            await in_room_on_both(x, a, id_a, b, id_b)
            y_id = instance_of(y)
            taken = f"ws_micro:taken:{y_id}"
            proxy.pause()  # what Y sends to Redis is held; its new connections are reset
            await x.wait_until(lambda: redis_server.command("EXISTS", taken) == 1, "X to take Y for dead")
            await a.send(text("news", id_a, room="r"))  # reaches no member on Y, and nobody is told
            await y.wait_until(lambda: y.get("/healthz").json()["redis"] == "unavailable", "Y to give up")
            proxy.resume()  # the partition heals: Y's heartbeat, held until now, reaches Redis
            await x.wait_until(lambda: redis_server.command("ZSCORE", "ws_micro:instances", y_id) is not None,
                               "Y's late heartbeat to run")
            proxy.release()  # Y connects again
            await y.wait_until(lambda: y.metric("ws_micro_cluster_taken_for_dead_total") == 1,
                               "Y to find it was taken for dead")
            await ended_as_taken_for_dead(b)


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_an_instance_not_back_within_instance_ttl_after_redis_restarts_ends_its_connections_when_back(
        redis_server: RedisServer) -> None:
    # X, back first after Redis restarted empty, refuses Y's frames while it waits for Y (the resynchronising
    # window), then counts Y as dead, and from then on its room frames miss Y's member unseen: it marks Y so.
    with cluster(redis_server, 2) as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            await in_room_on_both(x, a, id_a, b, id_b)
            taken = f"ws_micro:taken:{instance_of(y)}"
            y.process.send_signal(signal.SIGSTOP)
            try:
                redis_server.stop()
                await x.wait_until(lambda: x.get("/healthz").json()["redis"] == "unavailable", "X to notice")
                redis_server.start()
                await x.wait_until(lambda: x.get("/healthz").json()["redis"] == "resyncing", "X to wait for Y")
                await x.wait_until(lambda: x.get("/healthz").json()["status"] == "ok", "X to give up on Y")
                await x.wait_until(lambda: redis_server.command("EXISTS", taken) == 1, "X to mark Y")  # just after
                await a.send(text("news", id_a, room="r"))  # to X's members only: Y is dead for X
            finally:
                y.process.send_signal(signal.SIGCONT)
            await ended_as_taken_for_dead(b)
            await y.wait_until(lambda: redis_server.command("EXISTS", taken) == 0, "Y to take its mark away")


@pytest.mark.process
@pytest.mark.redis
def test_cluster_mode_embedded_runs_through_the_host_apps_lifespan(redis_server: RedisServer) -> None:
    gateway = create_app(redis_url=redis_server.url, heartbeat_interval=0.2, instance_ttl=1.0, api_token="t")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with gateway.router.lifespan_context(gateway):  # a Mount does not run it
            yield

    host = Starlette(routes=[Mount("/gateway", app=gateway)], lifespan=lifespan)
    with TestClient(host, headers={"Authorization": "Bearer t"}) as client:
        deadline = time.monotonic() + TIMEOUT
        while (health := client.get("/gateway/healthz").json())["redis"] != "ok":
            assert time.monotonic() < deadline, health
            time.sleep(0.02)
        with client.websocket_connect("/gateway/ws/py_client") as ws:
            own = ws.receive_json()["client_id"]
            listed = client.get("/gateway/api/clients").json()
            assert listed["clients"] == [{**client.get(f"/gateway/api/clients/{own}").json(),
                                          "instance": health["instance"]}]
    # Shutting down took the instance out of Redis at once.
    assert redis_server.command("ZCARD", "ws_micro:instances") == 0
    assert redis_server.command("HLEN", "ws_micro:directory") == 0


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_frames_for_an_instance_not_back_after_redis_restarts_are_refused_not_lost(
        redis_server: RedisServer) -> None:
    # Y is frozen while Redis restarts empty, so X is back first for as long as the test needs; a long
    # instance_ttl keeps X from giving up on Y meanwhile.
    with cluster(redis_server, 2, "--instance-ttl", "30") as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            await join(a, id_a, "r")
            assert await join(b, id_b, "r") == 2
            # X remembers Y from its heartbeats: what Redis forgets, X does not.
            await x.wait_until(lambda: x.get("/healthz").json()["instances"] == 2, "X to see Y")
            y.process.send_signal(signal.SIGSTOP)
            try:
                redis_server.stop()
                await x.wait_until(lambda: x.get("/healthz").json()["redis"] == "unavailable", "X to notice")
                redis_server.start()
                await x.wait_until(lambda: x.get("/healthz").json()["redis"] != "unavailable", "X to reconnect")
                before = cluster_dropped(x)
                # B is still connected: its frames are refused as undeliverable, never as unknown, never dropped
                # without a word.  The error echoes each frame's event, so each frame is matched to its answer.
                events = [f"{kind}{n}" for n in range(5) for kind in ("to", "room")]
                for event in events:
                    await a.send(text(event, id_a, to=id_b) if event.startswith("to") else
                                 text(event, id_a, room="r"))
                    assert without_message(await recv_json(a)) == error(id_a, "backend_unavailable", event)
                assert cluster_dropped(x) == before + len(events)
                # The API answers 503 as when Redis is away, and says nothing was delivered elsewhere.
                for response in (x.post(f"/api/clients/{id_b}", {"event": "x", "data": {"data": {}}}),
                                 x.post("/api/rooms/r", {"event": "x", "data": {"data": {}}}),
                                 x.post("/api/broadcast", {"event": "x", "data": {"data": {}}})):
                    assert response.status_code == 503
                    assert response.json()["error"]["code"] == "backend_unavailable"
                assert cluster_dropped(x) == before + len(events) + 3
                health = x.get("/healthz").json()
                assert (health["status"], health["redis"]) == ("degraded", "resyncing")
            finally:
                y.process.send_signal(signal.SIGCONT)
            await x.wait_until(lambda: x.get("/healthz").json()["status"] == "ok", "X to see Y back")
            # Nothing refused reached B; what is sent now does, both ways, by id and by room.
            for sender, own, receiver, routing in ((a, id_a, b, {"to": id_b}), (a, id_a, b, {"room": "r"}),
                                                   (b, id_b, a, {"to": id_a}), (b, id_b, a, {"room": "r"})):
                sent = text("after", own, None, **routing)
                await sender.send(sent)
                assert await recv_text(receiver) == sent
            assert x.metric("ws_micro_errors_total", code="unknown_client") == 0


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_stream_across_a_redis_restart_is_received_or_refused(redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--instance-ttl", "30") as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            await in_room_on_both(x, a, id_a, b, id_b)
            sent: list[str] = []
            received: list[str] = []
            refused: dict[str, str] = {}  # event -> error code
            streaming = True
            progress = anyio.Event()

            async def stream() -> None:  # about 100 frames a second, alternately by id and by room
                n = 0
                while streaming:
                    event = f"to{n}" if n % 2 == 0 else f"room{n}"
                    sent.append(event)
                    await a.send(text(event, id_a, to=id_b) if n % 2 == 0 else text(event, id_a, room="r"))
                    n += 1
                    await anyio.sleep(0.01)  # the pace of the stream, not a wait for anything

            async def read(ws: ClientConnection, note: Callable[[dict[str, Any]], None]) -> None:
                nonlocal progress
                async for message in ws:
                    note(json.loads(message))
                    progress.set()
                    progress = anyio.Event()

            async def until(predicate: Callable[[], bool]) -> None:
                with anyio.fail_after(TIMEOUT):
                    while not predicate():
                        await progress.wait()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(read, a, lambda answer: refused.update(
                    {answer["data"]["data"]["event"]: answer["data"]["data"]["code"]}))
                tasks.start_soon(read, b, lambda frame: received.append(frame["event"]))
                tasks.start_soon(stream)
                await until(lambda: len(received) >= 20)
                redis_server.stop()
                for server in (x, y):
                    await server.wait_until(lambda s=server: s.get("/healthz").json()["redis"] == "unavailable",
                                            "the instance to notice")
                # Each instance comes back on its own time: hold Y back while X streams to it for a while.
                y.process.send_signal(signal.SIGSTOP)
                try:
                    redis_server.start()
                    await x.wait_until(lambda: x.get("/healthz").json()["redis"] != "unavailable",
                                       "X to reconnect")
                    refused_before = len(refused)
                    await until(lambda: len(refused) >= refused_before + 20)
                finally:
                    y.process.send_signal(signal.SIGCONT)
                for server in (x, y):
                    await server.wait_until(lambda s=server: s.get("/healthz").json()["status"] == "ok",
                                            "the instance to be back")
                flowing_again = len(received) + 20
                await until(lambda: len(received) >= flowing_again)
                streaming = False
                # Every frame sent is received or refused; the last ones may still be on their way.
                await until(lambda: not set(sent) - set(received) - refused.keys())
                tasks.cancel_scope.cancel()
            assert refused, "the restart refused nothing: it did not happen while frames flowed"
            assert set(refused.values()) == {"backend_unavailable"}
            assert len(received) == len(set(received)), "a frame arrived twice"
            assert received == [event for event in sent if event in set(received)], "frames arrived out of order"
            assert cluster_dropped(x) == len(refused)
            assert cluster_dropped(y) == 0


# --------------------------------------------------------------------------
# Users and presence across instances (docs/auth.md)
# --------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_users_and_presence_span_instances(redis_server: RedisServer) -> None:
    auth = ("--jwt-secret", JWT_SECRET, "--default-join", "*", "--presence-events")

    def signed(server: Server, sub: str) -> Any:
        return ws_client(server.ws, additional_headers={"Authorization": f"Bearer {mint({'sub': sub})}"})

    async def presence(ws: ClientConnection) -> dict[str, Any]:
        received = await recv_json(ws)
        assert received["event"] == "presence", received
        return dict(received["data"]["data"])

    # Presence from another instance is sent without waiting: alice's join, published by X before bob
    # joined on Y, may reach Y after bob's join began, and then bob hears of it too (docs/auth.md).
    stale: dict[str, Any] = {}

    async def hears(ws: ClientConnection, expected: dict[str, Any]) -> None:
        while (received := await recv_json(ws))["data"]["data"] == stale:
            pass
        assert received["event"] == "presence" and received["data"]["data"] == expected, received

    async def joins(ws: ClientConnection, me: str, room: str) -> int:
        await ws.send(text("join", me, {"room": room}))
        while (received := await recv_json(ws))["event"] != "joined":
            assert received["data"]["data"] == stale, received
        return int(received["data"]["data"]["members"])

    with cluster(redis_server, 2, *auth) as (x, y):
        async with signed(x, "alice") as (tab1, id1), signed(y, "alice") as (tab2, id2), \
                signed(y, "bob") as (bob, id_bob):
            for server in (x, y):
                listed = server.get("/api/users/alice").json()
                assert {entry["client_id"]: entry["instance"] for entry in listed["clients"]} == {
                    id1: instance_of(x), id2: instance_of(y)}
            # Presence: counts and members over both instances, and events from one to the other.
            assert await joins(tab1, id1, "lobby") == 1
            stale.update(room="lobby", action="joined", client_id=id1, user="alice")
            assert await presence(tab1) == stale
            assert await joins(bob, id_bob, "lobby") == 2
            joined = {"room": "lobby", "action": "joined", "client_id": id_bob, "user": "bob"}
            await hears(bob, joined)
            assert await presence(tab1) == joined  # from the other instance
            for server in (x, y):
                assert server.get("/api/rooms").json() == {"count": 1, "rooms": [{"room": "lobby", "members": 2}]}
                members = server.get("/api/rooms/lobby").json()["members"]
                assert sorted(members, key=lambda m: m["user"]) == [{"client_id": id1, "user": "alice"},
                                                                    {"client_id": id_bob, "user": "bob"}]
            # A push to a user reaches each of their tabs, wherever it is, and no one else.
            reply = y.post("/api/users/alice", {"event": "notice", "data": {"data": {"n": 1}}})
            assert (reply.status_code, reply.json()) == (202, {"delivered": 2})
            for tab, me in ((tab1, id1), (tab2, id2)):
                assert await recv_json(tab) == frame("notice", me, {"n": 1})
            # A logout from either instance closes every tab; bob's instance tells the room.
            reply = httpx.delete(x.http + "/api/users/alice", timeout=TIMEOUT)
            assert (reply.status_code, reply.json()) == (202, {"disconnected": 2})
            for tab in (tab1, tab2):
                assert await closed_with(tab) == (1000, "disconnected by the server")
            await hears(bob, {"room": "lobby", "action": "left", "client_id": id1, "user": "alice"})
            for server in (x, y):
                await server.wait_until(lambda s=server: s.get("/api/users/alice").json()["count"] == 0,
                                        "alice's connections to leave the cluster")
                assert server.get("/api/rooms/lobby").json()["members"] == [{"client_id": id_bob, "user": "bob"}]


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_dead_instances_users_and_room_members_are_reaped(redis_server: RedisServer) -> None:
    auth = ("--jwt-secret", JWT_SECRET, "--default-join", "*")
    with cluster(redis_server, 2, *auth) as (x, y):
        async with ws_client(x.ws, additional_headers={"Authorization": f"Bearer {mint()}"}) as (a, id_a), \
                ws_client(y.ws, additional_headers={"Authorization": f"Bearer {mint({'sub': 'bob'})}"}) as (b, id_b):
            assert await join(a, id_a, "lobby") == 1
            assert await join(b, id_b, "lobby") == 2
            assert x.get("/api/users/bob").json()["count"] == 1
            y.process.kill()
            await x.wait_until(lambda: x.get("/api/users/bob").json()["count"] == 0, "bob's instance to be reaped")
            assert x.get("/api/rooms").json() == {"count": 1, "rooms": [{"room": "lobby", "members": 1}]}
            assert x.get("/api/rooms/lobby").json()["members"] == [{"client_id": id_a, "user": "alice"}]
            await x.wait_until(lambda: redis_server.command("EXISTS", "ws_micro:user-ids:bob", "ws_micro:user:bob",
                                                            "ws_micro:room-ids:lobby") == 1,
                               "the dead instance's keys to be reaped (alice's membership stays)")
            assert redis_server.command("ZRANGE", "ws_micro:room-ids:lobby", "0", "-1") == [id_a]
            # The listings' indexes lose bob's connection, and keep the room alice is still in.
            assert redis_server.command("ZRANGE", "ws_micro:clients", "0", "-1") == [id_a]
            assert redis_server.command("ZRANGE", "ws_micro:rooms", "0", "-1") == ["lobby"]


# --------------------------------------------------------------------------
# Forwarding to the backend across instances (docs/backend.md)
# --------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_each_instance_forwards_its_clients_and_reports_them_once(redis_server: RedisServer) -> None:
    with EventBackend() as backend, cluster(redis_server, 2, *forward_options(backend.url)) as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            for ws, me in ((a, id_a), (b, id_b)):
                await ws.send(text("chat", me, {"n": 7}))
                assert await recv_json(ws) == frame("ack", me, {"n": 7, "part": 1})
                assert await recv_json(ws) == frame("ack", me, {"n": 7, "part": 2})
            assert httpx.delete(f"{x.http}/api/clients/{id_b}", timeout=TIMEOUT).status_code == 202  # b is on y
            await closed_with(b)
        await eventually(lambda: len(backend.notices(id_a)) == 2 and len(backend.notices(id_b)) == 2, "both notices")
    assert backend.notices(id_a) == [("connect", None), ("disconnect", "closed")]
    assert backend.notices(id_b) == [("connect", None), ("disconnect", "kicked")]
    assert sorted(body["client_id"] for body in backend.received if body["type"] == "event") == sorted([id_a, id_b])


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_client_kicked_while_its_join_waits_for_redis_is_in_no_room_after(
        redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--presence-events") as (x, y):
        async with ws_client(x.ws) as (watcher, watcher_id):
            assert await join(watcher, watcher_id, "r2") == 1
            assert (await recv_json(watcher))["event"] == "presence"  # its own
            async with ws_client(x.ws) as (kicked, kicked_id):
                assert redis_server.process is not None
                redis_server.process.send_signal(signal.SIGSTOP)  # the join's write waits for Redis
                try:
                    await kicked.send(text("join", kicked_id, {"room": "r2"}))
                    assert httpx.delete(f"{x.http}/api/clients/{kicked_id}", timeout=TIMEOUT).status_code == 202
                    assert await closed_with(kicked) == (1000, "disconnected by the server")
                finally:
                    redis_server.process.send_signal(signal.SIGCONT)
            members = [{"client_id": watcher_id, "user": None}]
            for server in (x, y):
                await server.wait_until(lambda s=server: s.get("/api/rooms/r2").json()["members"] == members,
                                        "the kicked client to be in no room")
            await x.wait_until(
                lambda: redis_server.command("ZRANGE", "ws_micro:room-ids:r2", "0", "-1") == [watcher_id],
                "Redis to hold only the watcher in the room")
            assert kicked_id not in redis_server.command("HKEYS", f"ws_micro:instance:{instance_of(x)}:clients")
            # The watcher never heard that the kicked client joined.
            await watcher.send(text("ping", watcher_id))
            while (received := await recv_json(watcher))["event"] != "pong":
                assert received["data"]["data"].get("action") != "joined", received


# --------------------------------------------------------------------------
# Connection recovery across instances (docs/recovery.md)
# --------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_client_resumes_through_another_instance_with_every_missed_frame(
        redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--recovery-window", "60") as (x, y):
        async with ws_client(y.ws) as (peer, peer_id):
            await join(peer, peer_id, "lobby")
            ws, me, token = await new_session(x.ws)
            assert await join(ws, me, "lobby") == 2  # frame 1
            push(y, f"/api/clients/{me}", "in_flight", 0)  # never read: the socket dies with it
            assert (await recv_json(ws))["event"] == "in_flight"  # (it did arrive; the client lost it)
            await drop(ws, y, me)
            assert y.get("/api/rooms/lobby").json()["count"] == 2  # still a member while away
            push(y, f"/api/clients/{me}", "direct", 1)
            assert x.post("/api/rooms/lobby", {"event": "room", "data": {"data": {"n": 2}}}).json() == {"delivered": 2}
            assert (await recv_json(peer))["event"] == "room"
            relayed = text("relay", peer_id, {"n": 3}, to=me)
            await peer.send(relayed)
            await peer.send(text("chat", peer_id, {"n": 4}, room="lobby"))
            await nothing_more(peer, peer_id)
            assert y.post("/api/broadcast", {"event": "all", "data": {"data": {"n": 5}}}).json() == {"delivered": 2}
            assert (await recv_json(peer))["event"] == "all"

            async with connect(resume_url(y, token, offset=1)) as back:  # through the other instance
                info = await greeted(back)
                assert info["client_id"] == me
                assert (info["data"]["data"]["recovered"], info["data"]["data"]["rooms"]) == (True, ["lobby"])
                received = [await recv_json(back) for _ in range(6)]
                assert [(f["event"], f["data"]["data"]["n"]) for f in received] == [
                    ("in_flight", 0), ("direct", 1), ("room", 2), ("relay", 3), ("chat", 4), ("all", 5)]
                assert received[3] == json.loads(relayed)
                assert x.post("/api/rooms/lobby", {"event": "after", "data": {"data": {"n": 6}}}).json() == {
                    "delivered": 2}
                assert (await recv_json(back))["event"] == "after"
                await nothing_more(back, me)
                entry = x.get(f"/api/clients/{me}").json()
                assert entry["instance"] == instance_of(y) and "away_since" not in entry
                assert x.get("/api/rooms/lobby").json()["count"] == 2
                with pytest.raises(InvalidStatus) as refused:  # spent, across the cluster too
                    await connect(resume_url(x, token, offset=0))
                assert refused.value.response.status_code == 409

            # A client whose old connection the other instance still holds open takes it over.
            old, other, token = await new_session(x.ws)
            push(x, f"/api/clients/{other}", "unread", 1)
            async with connect(resume_url(y, token, offset=0)) as back:
                assert (await greeted(back))["data"]["data"]["recovered"] is True
                assert (await recv_json(back))["event"] == "unread"
                push(x, f"/api/clients/{other}", "new", 2)
                assert (await recv_json(back))["event"] == "new"
                await nothing_more(back, other)
            with anyio.fail_after(TIMEOUT), contextlib.suppress(ConnectionClosed):
                while json.loads(await old.recv())["event"] == "unread":
                    pass
                raise AssertionError("the old connection got a frame after its session moved")
        assert redis_server.command("KEYS", "ws_micro:kept:*") == []


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_waiting_session_ends_when_kicked_or_expired_and_its_room_hears_it(
        redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--recovery-window", "1", "--presence-events") as (x, y):
        async with ws_client(y.ws) as (peer, peer_id):
            await join(peer, peer_id, "lobby")
            assert (await recv_json(peer))["data"]["data"]["client_id"] == peer_id  # it hears its own join
            sessions = []
            for _ in range(2):
                ws = await connect(x.ws)
                hello = await greeted(ws)
                me = hello["client_id"]
                await join(ws, me, "lobby")
                joined = await recv_json(peer)
                assert (joined["event"], joined["data"]["data"]["client_id"]) == ("presence", me)
                sessions.append((me, hello["data"]["data"]["resume_token"]))
                await drop(ws, y, me)
            kicked, expired = sessions
            assert httpx.delete(f"{y.http}/api/clients/{kicked[0]}", timeout=TIMEOUT).status_code == 202
            for _ in range(2):  # the kick at once, the expiry within a heartbeat of the window's end
                left = (await recv_json(peer))["data"]["data"]
                assert left["action"] == "left" and left["client_id"] in (kicked[0], expired[0])
            assert x.metric("ws_micro_sessions_total", outcome="kicked") == 1
            await x.wait_until(lambda: x.metric("ws_micro_sessions_total", outcome="expired") == 1, "expiry")
            for me, token in sessions:
                assert y.get(f"/api/clients/{me}").status_code == 404
                async with connect(resume_url(y, token, offset=1)) as back:
                    info = await greeted(back)
                    assert info["client_id"] != me and info["data"]["data"]["recovered"] is False
            assert y.get("/api/rooms/lobby").json()["count"] == 1
        assert redis_server.command("KEYS", "ws_micro:session:*") == []


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_sessions_outlive_a_rolling_restart_of_their_instance(redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--recovery-window", "60") as (x, y):
        ws, me, token = await new_session(x.ws)
        await join(ws, me, "lobby")
        x.process.send_signal(signal.SIGTERM)
        assert (await closed_with(ws))[0] == 1012
        assert x.process.wait(TIMEOUT) == 0
        await until_away(y, me)
        assert y.post("/api/rooms/lobby", {"event": "while_restarting", "data": {"data": {}}}).json() == {
            "delivered": 1}
        push(y, f"/api/clients/{me}", "direct", 1)
        async with connect(resume_url(y, token, offset=1)) as back:
            info = (await greeted(back))["data"]["data"]
            assert (info["recovered"], info["rooms"]) == (True, ["lobby"])
            assert [(await recv_json(back))["event"] for _ in range(2)] == ["while_restarting", "direct"]
            await nothing_more(back, me)


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_concurrent_resumes_with_one_token_have_one_winner_that_stays_reachable(
        redis_server: RedisServer) -> None:
    with cluster(redis_server, 2, "--recovery-window", "60") as (x, y):
        ws, me, token = await new_session(x.ws)
        await drop(ws, y, me)
        outcomes: list[Any] = []

        async def resume() -> None:
            try:
                connection = await connect(resume_url(y, token, offset=0))
            except InvalidStatus as exc:
                outcomes.append(exc.response.status_code)
                return
            outcomes.append(((await greeted(connection))["data"]["data"]["recovered"], connection))

        async with anyio.create_task_group() as tasks:
            for _ in range(3):
                tasks.start_soon(resume)
        winners = [outcome[1] for outcome in outcomes if isinstance(outcome, tuple) and outcome[0] is True]
        assert len(winners) == 1, outcomes
        assert all(outcome == 409 or outcome[0] is False for outcome in outcomes if not (
            isinstance(outcome, tuple) and outcome[1] is winners[0])), outcomes
        push(x, f"/api/clients/{me}", "reachable", 1)
        assert (await recv_json(winners[0]))["event"] == "reachable"
        await nothing_more(winners[0], me)
        for outcome in outcomes:
            if isinstance(outcome, tuple):
                await outcome[1].close()
        await y.wait_until(lambda: y.get(f"/api/clients/{me}").status_code == 404, "the winner to leave when closed")


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_stream_of_frames_reaches_a_client_dropping_and_resuming_once_each_in_order(
        redis_server: RedisServer) -> None:
    # Frames published through the instance the client drops from, resumed through the other: the
    # moments a frame can fall between the two, or reach the client both ways, are all crossed.
    with cluster(redis_server, 2, "--recovery-window", "60") as (x, y):
        ws, me, token = await new_session(x.ws)
        await join(ws, me, "stream")
        received = 1  # joined
        numbers: list[int] = []
        total, publishers = 600, 4

        async def publish(first: int) -> None:  # each its own sequence: first, first + publishers, ...
            async with httpx.AsyncClient(base_url=(x if first % 2 else y).http, timeout=TIMEOUT) as api:
                for n in range(first, total, publishers):
                    body = {"event": "n", "data": {"data": {"n": n}}}
                    response = await api.post("/api/rooms/stream" if n % 3 else "/api/broadcast", json=body)
                    assert response.json() == {"delivered": 1}, (n, response.text)

        async with anyio.create_task_group() as tasks:
            for first in range(publishers):
                tasks.start_soon(publish, first)
            while len(numbers) < total // 4:
                numbers.append((await recv_json(ws))["data"]["data"]["n"])
                received += 1
            cut(ws)
            async with connect(resume_url(y, token, offset=received)) as back:
                assert (await greeted(back))["data"]["data"]["recovered"] is True
                while len(numbers) < total:
                    numbers.append((await recv_json(back))["data"]["data"]["n"])
                await nothing_more(back, me)
        assert sorted(numbers) == list(range(total))  # each once
        for first in range(publishers):  # and each publisher's in the order it sent them
            assert [n for n in numbers if n % publishers == first] == list(range(first, total, publishers))


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_revocation_holds_on_every_instance_and_on_those_that_join_later(
        redis_server: RedisServer) -> None:
    token = mint({"iat": int(time.time()) - 5})

    def refused(server: Server) -> bool:
        return bool(server.get(f"/ws/py_client?token={token}").status_code == 401)

    with cluster(redis_server, 2, "--jwt-secret", JWT_SECRET) as (x, y):
        async with ws_client(y.ws, additional_headers={"Authorization": f"Bearer {token}"}) as (ws, _):
            answer = httpx.delete(f"{x.http}/api/users/alice?revoke=true", timeout=TIMEOUT)
            assert answer.status_code == 202 and answer.json()["disconnected"] == 1  # closed on y
            assert await closed_with(ws) == (1000, "disconnected by the server")
        assert refused(x)
        await y.wait_until(lambda: refused(y), "the revocation to reach the other instance")
        with cluster(redis_server, 1, "--jwt-secret", JWT_SECRET) as (z,):  # started after it
            assert refused(z)
        assert redis_server.command("PTTL", "ws_micro:revoked:alice") > 23 * 3600 * 1000  # revocation_ttl


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_the_sessions_an_instance_parked_share_one_memory_budget(redis_server: RedisServer) -> None:
    # As in one process (test_waiting_sessions_share_one_memory_budget...): broadcasts from another instance
    # fill the sessions parked in Redis, and recovery_max_memory bounds them all.
    budget, padding = 400_000, "x" * 8000
    with cluster(redis_server, 2, "--recovery-window", "60", "--recovery-max-memory", str(budget)) as (x, y):
        sessions = []
        for _ in range(20):  # parked by x in this order
            ws, me, token = await new_session(x.ws)
            await drop(ws, y, me)  # y sees it waiting: it is in Redis
            sessions.append((me, token))
        for n in range(10):  # 20 x 10 x 8 KB = 1.6 MB if each kept them all
            assert y.post("/api/broadcast", {"event": "news", "data": {"data": {"n": n, "pad": padding}}}
                          ).status_code == 202
        kept = int(redis_server.command("GET", f"ws_micro:instance:{instance_of(x)}:kept") or 0)
        assert budget - 10 * 8100 < kept <= budget, kept
        await x.wait_until(lambda: x.metric("ws_micro_sessions_total", outcome="evicted") >= 10,
                           "x to hear of the sessions it parked that made room")
        newest, oldest = sessions[-1], sessions[0]
        async with connect(resume_url(y, newest[1], offset=0)) as back:  # through the other instance
            info = await greeted(back)
            assert (info["client_id"], info["data"]["data"]["missed"]) == (newest[0], 10)
            assert [(await recv_json(back))["data"]["data"]["n"] for _ in range(10)] == list(range(10))
        async with connect(resume_url(y, oldest[1], offset=0)) as back:
            info = await greeted(back)
            assert info["client_id"] != oldest[0] and info["data"]["data"]["recovered"] is False


# --------------------------------------------------------------------------
# The module beside the core
# --------------------------------------------------------------------------


def test_the_scripts_find_every_field_where_msgspec_puts_it() -> None:
    # The Lua reads and writes the messages by field name, through a table generated from the Structs:
    # check that table against the arrays msgspec really encodes, field by field.
    table = ws_micro_redis._LUA_PRELUDE.partition("\n")[0].removeprefix("local F = {")
    layout = {tag: {name: int(position) for name, position in re.findall(r"(\w+) = (\d+)", fields)}
              for tag, fields in re.findall(r"(\w+) = \{([^}]*)\}", table)}
    structs = (ws_micro._ToClient, ws_micro._ToRoom, ws_micro._ToUser, ws_micro._ToEveryone, ws_micro._Kick,
               ws_micro._KickUser, ws_micro_redis._RoomShared, ws_micro_redis._Moved, ws_micro_redis._WasParked,
               ws_micro_redis._Sealed, ws_micro_redis._WasResumed, ws_micro_redis._SessionEnded,
               ws_micro_redis._TakeOver, ws_micro_redis._Revoked)
    assert set(layout) == {struct.__struct_config__.tag for struct in structs}
    for struct in structs:
        values: dict[str, Any] = {name: 1000 + i if name in ("code", "before", "expires") else f"{name}-value"
                                  for i, name in enumerate(struct.__struct_fields__)}
        encoded = msgspec.msgpack.decode(msgspec.msgpack.encode(struct(**values)))
        fields = layout[struct.__struct_config__.tag]
        assert encoded[0] == struct.__struct_config__.tag
        assert {name: encoded[position - 1] for name, position in fields.items()} == values


@pytest.mark.process
def test_without_its_module_beside_the_core_cluster_mode_says_what_to_copy_and_install(tmp_path: Path) -> None:
    (tmp_path / "ws_micro.py").write_text((ROOT / "ws_micro.py").read_text())
    result = subprocess.run([sys.executable, "ws_micro.py", "--redis-url", "redis://127.0.0.1:1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2, result
    assert "--redis-url needs ws_micro_redis.py beside ws_micro.py" in result.stderr
    # redis-py is installed here: the line does not ask for it, or installing it would seem to be the fix.
    assert "redis-py" not in result.stderr and "Traceback" not in result.stderr
    # Where it is not (hidden from imports, as if never installed), the line asks for both.
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules['redis'] = None\n")
    result = subprocess.run([sys.executable, "ws_micro.py", "--redis-url", "redis://127.0.0.1:1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=TIMEOUT,
                            env={**os.environ, "PYTHONPATH": str(hidden)})
    assert result.returncode == 2, result
    assert result.stderr.endswith("copy ws_micro_redis.py beside it) and redis-py: pip install 'redis[hiredis]'\n"), (
        result.stderr)


@pytest.mark.process
def test_a_redis_module_of_another_version_refuses_to_run_beside_the_core(tmp_path: Path) -> None:
    (tmp_path / "ws_micro.py").write_text((ROOT / "ws_micro.py").read_text())
    source = (ROOT / "ws_micro_redis.py").read_text()
    (tmp_path / "ws_micro_redis.py").write_text(re.sub(r'__version__ = "[^"]+"', '__version__ = "0.0.1"', source))
    result = subprocess.run([sys.executable, "ws_micro.py", "--redis-url", "redis://127.0.0.1:1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2, result
    assert f"ws_micro_redis.py 0.0.1 cannot run beside ws_micro.py {ws_micro.__version__}" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------
# Listings across instances, a page at a time (docs/api.md)
# --------------------------------------------------------------------------


def walk_cluster(servers: list[Server], path: str, name: str, limit: int) -> tuple[list[Any], set[int], set[int]]:
    """Every entry of a listing, asking each instance in turn for the next page with the last one's cursor;
    the counts the pages gave, and how many entries the pages but the last held."""
    entries: list[Any] = []
    counts: set[int] = set()
    sizes: set[int] = set()
    cursor: str | None = None
    for page in range(1000):
        params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        answer = servers[page % len(servers)].get(path, params=params)
        assert answer.status_code == 200, answer.text
        entries += answer.json()[name]
        counts.add(answer.json()["count"])
        cursor = answer.json().get("next")
        if cursor is None:
            return entries, counts, sizes
        sizes.add(len(answer.json()[name]))
    raise AssertionError(f"{path} did not end")


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_listings_come_a_page_at_a_time_and_a_cursor_goes_on_at_any_instance(
        redis_server: RedisServer) -> None:
    # Client entries of 200 to 250 bytes against pages of 1,000: the Lua scripts end pages early too.
    options = ("--jwt-secret", JWT_SECRET, "--default-join", "*", "--api-max-page-bytes", "1000")
    with cluster(redis_server, 2, *options) as servers:
        x, y = servers
        users = {n: f"org/u{n % 10}" for n in range(120)}
        rooms = {n: [f"r{(n + k) % 30:02d}" for k in (0, 7, 19)] for n in range(120)}
        async with contextlib.AsyncExitStack() as stack:
            clients = {}
            for n in range(120):  # half on each instance
                token = mint({"sub": users[n]})
                ws, client_id = await stack.enter_async_context(
                    ws_client(servers[n % 2].ws, additional_headers={"Authorization": f"Bearer {token}"}))
                for room in rooms[n]:
                    await join(ws, client_id, room)
                clients[client_id] = (n, ws)
            everyone = sorted(clients)
            for server in servers:
                assert server.get("/api/clients", params={"limit": 0}).json() == {"count": 120, "clients": []}
            entries, counts, sizes = walk_cluster(servers, "/api/clients", "clients", 7)
            assert [entry["client_id"] for entry in entries] == everyone and counts == {120}
            assert sizes == {5}, sizes  # 5 entries reach 1,000 bytes, before the limit of 7
            assert {entry["instance"] for entry in entries} == {instance_of(x), instance_of(y)}
            assert all(entry["rooms"] == sorted(rooms[clients[entry["client_id"]][0]]) for entry in entries)
            entries, counts, sizes = walk_cluster(servers, "/api/rooms", "rooms", 4)
            assert entries == [{"room": f"r{k:02d}", "members": 12} for k in range(30)] and counts == {30}
            assert sizes == {4}
            members = sorted(client_id for client_id, (n, _) in clients.items() if "r00" in rooms[n])
            entries, counts, _ = walk_cluster(servers, "/api/rooms/r00", "members", 2)
            assert entries == [{"client_id": client_id, "user": users[clients[client_id][0]]} for client_id in members]
            assert counts == {12}
            logged_out = sorted(client_id for client_id, (n, _) in clients.items() if users[n] == "org/u3")
            entries, counts, _ = walk_cluster(servers, "/api/users/org%2Fu3", "clients", 5)
            assert [entry["client_id"] for entry in entries] == logged_out and counts == {12}
            answer = x.get("/api/clients", params={"cursor": "not a cursor"})
            assert (answer.status_code, answer.json()["error"]["code"]) == (400, "invalid_parameter")
            # A user with a "/" in its name is logged out everywhere, through either instance.
            answer = httpx.delete(f"{y.http}/api/users/org%2Fu3", timeout=TIMEOUT)
            assert (answer.status_code, answer.json()) == (202, {"disconnected": 12})
            for client_id in logged_out:
                assert await closed_with(clients[client_id][1]) == (1000, "disconnected by the server")
            await x.wait_until(lambda: x.get("/api/clients", params={"limit": 0}).json()["count"] == 108,
                               "the logged-out clients to leave the cluster")
            entries, counts, _ = walk_cluster([y, x], "/api/clients", "clients", 50)
            assert [entry["client_id"] for entry in entries] == sorted(set(everyone) - set(logged_out))
            assert redis_server.command("ZCARD", "ws_micro:clients") == 108


# --------------------------------------------------------------------------
# Mounted in a host app that does not run the gateway's lifespan (docs/embedding.md)
# --------------------------------------------------------------------------

# A host app as docs/embedding.md's "Mounting the gateway" shows, in cluster mode; with LIFESPAN set, it also runs
# the gateway's lifespan as its section "The gateway's lifespan" says.
CLUSTER_HOST = """
import contextlib
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from ws_micro import create_app

gateway = create_app(redis_url=os.environ["REDIS_URL"], static_dir="")


@contextlib.asynccontextmanager
async def lifespan(app):
    async with gateway.router.lifespan_context(gateway):
        yield


async def healthz(request):
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/healthz", healthz), Mount("/gateway", app=gateway)],
                lifespan=lifespan if os.environ.get("LIFESPAN") else None)
"""


@pytest.mark.process
@pytest.mark.redis
@pytest.mark.parametrize("lifespan", [False, True], ids=["without-its-lifespan", "with-its-lifespan"])
async def test_e2e_a_host_that_does_not_run_the_gateways_lifespan_is_told_so(
        lifespan: bool, redis_server: RedisServer, tmp_path: Path) -> None:
    # Without its lifespan the gateway never connects to Redis: it said "Redis is unavailable" while Redis was up.
    (tmp_path / "host.py").write_text(CLUSTER_HOST)
    log = tmp_path / "host.log"
    env = {"PYTHONPATH": str(ROOT), "REDIS_URL": redis_server.url, **({"LIFESPAN": "1"} if lifespan else {})}
    with run_server(uvicorn_app="host:app", cwd=tmp_path, env=env, log=log) as server:
        health = server.get("/gateway/healthz").json()
        async with ws_client(f"ws://127.0.0.1:{server.port}/gateway/ws/py_client") as (ws, me):
            await join(ws, me, "lobby")
            await ws.send(text("chat", me, {"text": "hi"}, room="lobby"))
            await ws.send(text("ping", me))
            answer = await recv_json(ws)
        pushed = server.post("/gateway/api/rooms/lobby", {"event": "notice", "data": {"data": {}}})
        again = server.get("/gateway/healthz").json()
    said = [line for line in log.read_text().splitlines() if "lifespan did not run" in line]
    if lifespan:
        assert health == again and (health["status"], health["redis"]) == ("ok", "ok"), health
        assert answer["event"] == "pong" and pushed.status_code == 202 and said == []
        return
    assert health == again and (health["status"], health["redis"]) == ("degraded", "unavailable"), health
    assert health["reason"] == ws_micro._NO_LIFESPAN, health
    # The sender is told why, not that Redis is down.
    assert answer["event"] == "error" and answer["data"]["data"]["code"] == "backend_unavailable", answer
    message = answer["data"]["data"]["message"]
    assert "lifespan did not run" in message and "Redis is unavailable" not in message, message
    assert pushed.status_code == 503 and "lifespan did not run" in pushed.json()["error"]["message"], pushed.text
    # The operator, once, with where to read what to do.
    assert len(said) == 1 and "docs/embedding.md, \"The gateway's lifespan\"" in said[0], said
    assert "cluster mode has no Redis connection" in said[0] and "Traceback" not in log.read_text()


# --------------------------------------------------------------------------
# The client-to-instance lookup cached on the sender (docs/cluster.md, "Design")
# --------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_room_frames_go_to_the_rooms_instances_without_a_lookup_until_the_room_changes(
        redis_server: RedisServer) -> None:
    with cluster(redis_server, 3) as (x, y, z):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            await join(a, id_a, "r")
            await join(b, id_b, "r")
            first = text("chat", id_a, {"n": -1}, room="r")
            await a.send(first)
            assert await recv_text(b) == first
            await x.wait_until(lambda: x.metric("ws_micro_cluster_rooms_cached") == 1, "X to cache r's instances")
            with redis.Redis.from_url(redis_server.url) as client:
                client.config_resetstat()
            direct = x.metric("ws_micro_cluster_direct_total")
            sent = [text("chat", id_a, {"n": n}, room="r") for n in range(100)]
            for one in sent:
                await a.send(one)
            assert [await recv_text(b) for _ in sent] == sent  # in order
            await nothing_more(a, id_a)
            assert x.metric("ws_micro_cluster_direct_total") == direct + len(sent)
            assert redis_calls(redis_server, "hgetall") == 0  # no lookup of the room's instances (one a frame before)
            # The room gains an instance: a frame sent once its member saw `joined` reaches it.
            async with ws_client(z.ws) as (c, id_c):
                assert await join(c, id_c, "r") == 3
                one = text("chat", id_a, {"to": "all three"}, room="r")
                await a.send(one)
                assert await recv_text(c) == one
                assert await recv_text(b) == one
                # It loses one: the watchers are told, and the room is cached again without it.
                await b.send(text("leave", id_b, {"room": "r"}))
                assert json.loads(await recv_text(b))["event"] == "left"
                one = text("chat", id_a, {"to": "two"}, room="r")
                await a.send(one)
                assert await recv_text(c) == one
                await x.wait_until(lambda: x.metric("ws_micro_cluster_rooms_cached") == 1, "X to cache r again")
                # The cached instance dies: each frame sent there is refused once, and the room looked up again.
                await killed(redis_server, z)
                await a.send(json.dumps({**frame("chat", id_a, room="r"), "id": "lost"}))
                refused = await recv_json(a)
                assert (refused["id"], refused["data"]["data"]["code"]) == ("lost", "backend_unavailable")
                assert x.metric("ws_micro_cluster_dropped_total", reason="no_subscriber") == 1
                assert x.metric("ws_micro_cluster_rooms_cached") == 0
                await nothing_more(a, id_a)


async def killed(redis_server: RedisServer, server: Server) -> None:
    """SIGKILL an instance, and wait until Redis has dropped its subscription (it may not have read the dead
    socket's end yet: a PUBLISH then is still heard)."""
    channel = f"ws_micro:deliveries:{instance_of(server)}"
    server.process.kill()
    server.process.wait(TIMEOUT)
    await eventually(lambda: redis_server.command("PUBSUB", "NUMSUB", channel)[1] == 0, "Redis to drop it")


def watch_keys(redis_server: RedisServer) -> list[str]:
    return sorted(redis_server.command("KEYS", "ws_micro:client-watch:*"))


def numbered(event: str, own: str, to: str, n: int) -> str:
    """A frame for ``to`` with ``{"n": n}`` and the id n, which an error for it carries back."""
    return json.dumps({**frame(event, own, {"n": n}, to=to), "id": n})


async def until_id(ws: ClientConnection, frame_id: int | str) -> list[dict[str, Any]]:
    """What a client receives up to the frame with this id, that one included."""
    received = [await recv_json(ws)]
    while received[-1].get("id") != frame_id:
        received.append(await recv_json(ws))
    return received


async def kick(server: Server, client_id: str) -> None:
    async with httpx.AsyncClient(timeout=TIMEOUT) as api:
        assert (await api.delete(f"{server.http}/api/clients/{client_id}")).status_code == 202


async def stream_to(ws: ClientConnection, own: str, to: str, total: int, pace: int = 10) -> None:
    """Send ``total`` frames numbered by their id to ``to``, ``pace`` at a time with a pause between, so that
    what the test does meanwhile falls in the middle of the stream."""
    for n in range(total):
        await ws.send(numbered("n", own, to, n))
        if n % pace == pace - 1:
            await anyio.sleep(0.005)  # a pace, not a wait for anything


async def refusals(ws: ClientConnection, count: Callable[[], int], total: int, into: dict[int, str]) -> None:
    """Read the errors that come back to a sender until ``count() + len(into) == total``: id -> code."""
    with anyio.fail_after(TIMEOUT):
        while count() + len(into) < total:
            received = await recv_json(ws)
            assert received["event"] == "error", received
            into[received["id"]] = received["data"]["data"]["code"]


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_frames_to_a_client_of_another_instance_go_there_without_a_lookup_once_its_place_is_known(
        redis_server: RedisServer) -> None:
    frames = 200
    with cluster(redis_server, 2) as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            first = text("chat", id_a, {"n": -1}, to=id_b)
            await a.send(first)
            assert await recv_text(b) == first  # through the relay script, which says where B is
            await x.wait_until(lambda: x.metric("ws_micro_cluster_clients_cached") == 1, "X to cache B's instance")
            assert watch_keys(redis_server) == [f"ws_micro:client-watch:{id_b}"]
            with redis.Redis.from_url(redis_server.url) as client:
                client.config_resetstat()
            sent = [text("chat", id_a, {"n": n}, to=id_b) for n in range(frames)]
            for one in sent:
                await a.send(one)
            assert [await recv_text(b) for _ in range(frames)] == sent  # in order
            await nothing_more(a, id_a)
            assert x.metric("ws_micro_cluster_direct_total") == frames
            # No relay script ran for them (the heartbeats' scripts run meanwhile: a few), and the PUBLISHes
            # carry many frames each.
            assert redis_calls(redis_server, "hget") == 0  # no lookup of the client's instance (the heartbeats do none)
            assert redis_calls(redis_server, "publish") <= frames // 10
            assert y.metric("ws_micro_cluster_received_total") == frames + 1
        # Both left: no watcher set is left behind.
        await x.wait_until(lambda: x.get("/api/clients").json()["count"] == 0, "both to leave the directory")
        assert watch_keys(redis_server) == []


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_a_stream_to_a_client_that_resumes_through_a_third_instance_arrives_once_each_in_order(
        redis_server: RedisServer) -> None:
    total = 600
    with cluster(redis_server, 3, "--recovery-window", "60") as (x, y, z):
        async with ws_client(x.ws) as (a, id_a):
            b, id_b, token = await new_session(y.ws)
            numbers: list[int] = []
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(stream_to, a, id_a, id_b, total)
                while len(numbers) < total // 4:
                    numbers.append((await recv_json(b))["data"]["data"]["n"])
                assert x.metric("ws_micro_cluster_clients_cached") == 1  # the stream goes to Y on X's cache
                cut(b)
                async with connect(resume_url(z, token, offset=len(numbers))) as back:
                    assert (await greeted(back))["data"]["data"]["recovered"] is True
                    with anyio.move_on_after(TIMEOUT):
                        while len(numbers) < total:
                            numbers.append((await recv_json(back))["data"]["data"]["n"])
                    missing = sorted(set(range(total)) - set(numbers))
                    assert len(numbers) == total, (len(numbers), missing[:20], numbers[140:170])
                    await nothing_more(back, id_b)
            # No error came back: every frame was delivered or kept.  (A frame to nobody's refusal comes last.)
            await a.send(numbered("chat", id_a, "nobody", -1))
            assert [(answer["event"], answer.get("id")) for answer in await until_id(a, -1)] == [("error", -1)]
            assert numbers == list(range(total))  # each once, in order
            assert x.metric("ws_micro_cluster_direct_total") > 0


@pytest.mark.process
@pytest.mark.redis
@pytest.mark.parametrize("leaves", ["closes", "kicked"])
async def test_cluster_a_stream_to_a_client_that_leaves_for_good_is_delivered_or_refused_frame_by_frame(
        redis_server: RedisServer, leaves: str) -> None:
    total = 400
    with cluster(redis_server, 2) as (x, y):
        async with ws_client(x.ws) as (a, id_a), ws_client(y.ws) as (b, id_b):
            delivered: list[int] = []
            refused: dict[int, str] = {}

            async def read_until_closed() -> None:
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        delivered.append((await recv_json(b))["data"]["data"]["n"])
                        if len(delivered) == total // 4:
                            if leaves == "closes":
                                tasks.start_soon(b.close)
                            else:
                                tasks.start_soon(kick, x, id_b)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(read_until_closed)
                tasks.start_soon(stream_to, a, id_a, id_b, total)
                await refusals(a, lambda: len(delivered), total, refused)
            await nothing_more(a, id_a)
            # None lost without a word: each frame reached B, in order, or its sender was told it did not.
            assert delivered == list(range(len(delivered))) and len(delivered) >= total // 4
            assert sorted(refused) == list(range(len(delivered), total))
            assert set(refused.values()) == {"unknown_client"}
            assert x.metric("ws_micro_cluster_direct_total") > 0
            assert x.metric("ws_micro_cluster_clients_cached") == 0
        await x.wait_until(lambda: x.get("/api/clients").json()["count"] == 0, "both to leave the directory")
        assert watch_keys(redis_server) == []


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_frames_on_a_cached_entry_of_a_killed_instance_fail_and_the_cache_forgets_it(
        redis_server: RedisServer) -> None:
    ttl = 3.0
    with cluster(redis_server, 1, "--heartbeat-interval", "0.2", "--instance-ttl", str(ttl)) as (x,), \
            run_server("--log-level", "warning", "--redis-url", redis_server.url,
                       "--heartbeat-interval", "0.2", "--instance-ttl", str(ttl)) as doomed:
        async with ws_client(x.ws) as (a, id_a), ws_client(doomed.ws) as (c, id_c):
            await a.send(text("chat", id_a, to=id_c))
            assert (await recv_json(c))["event"] == "chat"
            await x.wait_until(lambda: x.metric("ws_micro_cluster_clients_cached") == 1, "X to cache C's instance")
            await killed(redis_server, doomed)
            # Its subscription is gone with it: the frame on the cached entry is published to nobody.
            await a.send(numbered("chat", id_a, id_c, 1))
            assert without_message(await recv_json(a)) == {**error(id_a, "backend_unavailable", "chat"), "id": 1}
            assert x.metric("ws_micro_cluster_dropped_total", reason="no_subscriber") == 1
            assert x.metric("ws_micro_cluster_clients_cached") == 0  # forgotten: looked up again
            direct = x.metric("ws_micro_cluster_direct_total")
            await x.wait_until(lambda: x.get("/api/clients").json()["count"] == 1, "the killed instance to drop out")
            await a.send(numbered("chat", id_a, id_c, 2))
            assert without_message(await recv_json(a)) == {**error(id_a, "unknown_client", "chat"), "id": 2}
            assert x.metric("ws_micro_cluster_direct_total") == direct
        await x.wait_until(lambda: x.get("/api/clients").json()["count"] == 0, "A to leave the directory")
        # C's watchers go when its entry does: at the reap of its instance, the first heartbeat of X after the
        # deadline (the listing leaves out a dead instance's clients before that).
        await x.wait_until(lambda: watch_keys(redis_server) == [], "the reap to take C's watchers away")
        assert redis_server.command("HLEN", "ws_micro:directory") == 0


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_frames_held_for_a_moving_client_are_bounded_and_each_is_refused_or_sent_on(
        redis_server: RedisServer) -> None:
    total = ws_micro_redis.FENCE_FRAMES + 300
    with cluster(redis_server, 1, "--heartbeat-interval", "0.2", "--instance-ttl", "1",
                 "--rate-limit", "100000") as (x,), \
            run_server("--log-level", "warning", "--redis-url", redis_server.url,
                       "--heartbeat-interval", "0.2", "--instance-ttl", "1") as frozen:
        async with ws_client(x.ws) as (a, id_a), ws_client(frozen.ws) as (c, id_c):
            await a.send(text("chat", id_a, to=id_c))
            assert (await recv_json(c))["event"] == "chat"
            await x.wait_until(lambda: x.metric("ws_micro_cluster_clients_cached") == 1, "X to cache C's instance")
            frozen.process.send_signal(signal.SIGSTOP)  # subscribed still, but it answers no fence
            try:
                # X finds it dead: C is fenced, its frames held until the frozen instance answers, or FENCE_WAIT.
                await x.wait_until(lambda: x.metric("ws_micro_cluster_clients_cached") == 0, "X to forget C's place")
                for n in range(total):
                    await a.send(numbered("n", id_a, id_c, n))
                refused: dict[int, str] = {}
                await refusals(a, lambda: 0, total, refused)
                await nothing_more(a, id_a)
            finally:
                frozen.process.kill()
            moving = x.metric("ws_micro_cluster_dropped_total", reason="moving")
            assert moving > 0  # past the bound: refused at once
            assert list(refused.values()).count("backend_unavailable") == moving
            # The held ones went on after the fence, to find C reaped: refused as unknown.
            assert list(refused.values()).count("unknown_client") == total - moving
