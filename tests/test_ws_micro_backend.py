"""Tests of forwarding client events, connects and disconnects to the backend (docs/backend.md).

Each test starts a real gateway process and a real backend (Starlette on
uvicorn, in a thread, checking every request's signature with the docs'
function), and talks to the gateway with real `websockets` clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

import anyio
import httpx2 as httpx
import msgspec
import pytest
from conftest import (
    BACKEND_SECRET,
    JSON,
    JWT_SECRET,
    ROOT,
    TIMEOUT,
    BackendServer,
    EventBackend,
    Server,
    client_frame,
    closed_with,
    eventually,
    forward_options,
    frame,
    free_port,
    join,
    mint,
    raw_websocket,
    recv_json,
    recv_text,
    rss_mib,
    run_server,
    text,
    without_message,
    ws_client,
)
from starlette.responses import JSONResponse, Response
from websockets.asyncio.client import ClientConnection

import ws_micro

pytestmark = [pytest.mark.anyio, pytest.mark.process]


@contextlib.contextmanager
def printing(lines: list[str], *command: str, env: dict[str, str]) -> Iterator[None]:
    """Run ``command`` while the block runs; then kill it, and put what it printed in ``lines``."""
    process = subprocess.Popen(command, text=True, stdout=subprocess.PIPE, env={**os.environ, **env})
    try:
        yield
    finally:
        process.kill()
        lines += process.communicate()[0].splitlines()


async def test_e2e_events_reach_the_backend_and_its_answers_reach_the_sender(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    with EventBackend() as backend, run_server(*forward_options(backend.url), log=log) as server:
        async with ws_client(server.ws) as (ws, me):
            await join(ws, me, "lobby")
            await ws.send(text("chat", me, {"text": "hi", "n": 1}))
            assert await recv_json(ws) == frame("ack", me, {"n": 1, "part": 1})
            assert await recv_json(ws) == frame("ack", me, {"n": 1, "part": 2})
            assert [body["type"] for body in backend.received] == ["connect", "event"]  # the connect first
            forwarded = backend.received[-1]
            assert forwarded == {"type": "event", "client_id": me, "user": None, "meta": None, "event": "chat",
                                 "data": {"text": "hi", "n": 1}, "rooms": ["lobby"]}
            # No answer to send back: nothing comes, and the next frame's reply is the next thing.
            await ws.send(text("typing", me, {"mode": "none"}))
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"
            # What the sender sees when the backend fails, and the connection stays open.
            for mode, code, message in (
                    ("500", "backend_error", "the backend answered HTTP 500"),
                    ("garbage", "backend_error", 'the backend\'s answer is not {"events": [...]}: JSON is malformed'),
                    ("nested", "backend_error", 'the backend\'s answer is not {"events": [...]}: JSON is nested '
                                                'too deeply'),
                    ("slow", "backend_unavailable", "the backend did not answer within 0.5 seconds")):
                await ws.send(text("chat", me, {"mode": mode}))
                reply = (await recv_json(ws))["data"]["data"]
                assert (reply["code"], reply["event"]) == (code, "chat")
                assert reply["message"].startswith(message), reply
                assert reply.get("status") == (None if mode == "slow" else 500 if mode == "500" else 200)
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"
        for outcome, count in (("ok", 2), ("backend_error", 3), ("timeout", 1), ("unreachable", 0), ("busy", 0),
                               ("over_share", 0)):
            assert server.metric("ws_micro_forwarded_total", outcome=outcome) == count, outcome
        assert server.metric("ws_micro_forward_seconds_count") == 6
        assert server.metric("ws_micro_forward_seconds_bucket", le="+Inf") == 6
        assert server.metric("ws_micro_forward_seconds_bucket", le="0.25") == 5  # all but the slow one
    assert not any("Traceback" in line for line in log.read_text().splitlines())


async def test_e2e_each_reply_and_error_of_a_forwarded_event_carries_its_id_back() -> None:
    with EventBackend() as backend, run_server(*forward_options(backend.url), "--log-level", "warning") as server:
        async with ws_client(server.ws) as (ws, me):
            await ws.send(json.dumps({**frame("chat", me, {"n": 1}), "id": "chat-1"}))
            for part in (1, 2):  # each of the backend's events, with the id where a reply's goes
                assert await recv_text(ws) == f'{{"event":"ack","client_id":"{me}","id":"chat-1",' \
                                              f'"data":{{"data":{{"n":1,"part":{part}}}}}}}'
            # The backend gets the event as before: the id is the gateway's business with its client.
            assert backend.received[-1] == {"type": "event", "client_id": me, "user": None, "meta": None,
                                            "event": "chat", "data": {"n": 1}, "rooms": []}
            for request_id, mode, code in ((2, "500", "backend_error"), ("é", "garbage", "backend_error"),
                                           (4, "slow", "backend_unavailable")):
                await ws.send(json.dumps({**frame("chat", me, {"mode": mode}), "id": request_id}))
                refused = await recv_json(ws)
                assert (refused["id"], refused["event"], refused["data"]["data"]["code"]) == (request_id, "error", code)
            # Without an id, the replies are as they were.
            await ws.send(text("chat", me, {"n": 5}))
            assert await recv_json(ws) == frame("ack", me, {"n": 5, "part": 1})
            assert await recv_json(ws) == frame("ack", me, {"n": 5, "part": 2})
        # The Python client's request returns the first reply; the rest come to recv(), with the id.
        async with ws_micro.Client(server.ws) as client:
            with anyio.fail_after(TIMEOUT):
                first = await client.request("chat", {"n": 6})
                second = await client.recv()
            assert [(event.event, event.id, event.data.data) for event in (first, second)] == [
                ("ack", 1, {"n": 6, "part": 1}), ("ack", 1, {"n": 6, "part": 2})]
            with anyio.fail_after(TIMEOUT), pytest.raises(ws_micro.RequestError) as refused:
                await client.request("chat", {"mode": "500"})
            assert (refused.value.code, refused.value.message) == ("backend_error", "the backend answered HTTP 500")


async def test_e2e_only_the_listed_events_are_forwarded_and_handlers_and_builtins_come_first() -> None:
    with EventBackend() as backend, run_server(*forward_options(backend.url, "--forward-events", "chat,game:*"),
                                               "--log-level", "warning") as server:
        async with ws_client(server.ws) as (ws, me):
            for name in ("game:move", "chat"):
                await ws.send(text(name, me, {"mode": "none"}))
            await ws.send(text("other", me))
            assert (await recv_json(ws))["data"]["data"]["code"] == "unknown_event"
            await ws.send(text("echo", me, {"n": 1}))
            assert (await recv_json(ws))["event"] == "echo"
    assert [body["event"] for body in backend.received if body["type"] == "event"] == ["game:move", "chat"]


async def test_e2e_a_backend_that_is_down_gets_backend_unavailable_and_the_connection_stays() -> None:
    with run_server(*forward_options(f"http://127.0.0.1:{free_port()}/events"), "--log-level", "warning") as server:
        async with ws_client(server.ws) as (ws, me):
            await ws.send(text("chat", me))
            reply = (await recv_json(ws))["data"]["data"]
            assert (reply["code"], reply["event"]) == ("backend_unavailable", "chat")
            assert reply["message"].startswith("the backend cannot be reached")
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"
        assert server.metric("ws_micro_forwarded_total", outcome="unreachable") == 1


# Forwarding one event a request, and in batches of the events of one moment (forward_batch).
BATCHING = pytest.mark.parametrize("batch", [(), ("--forward-batch", "16")], ids=["alone", "batched"])


@BATCHING
async def test_e2e_each_connections_events_reach_the_backend_in_order_under_load(batch: tuple[str, ...]) -> None:
    clients, events = 20, 50
    with EventBackend() as backend, run_server(*forward_options(backend.url, *batch), "--log-level",
                                               "warning") as server:

        async def talk(address: str) -> None:
            async with ws_client(server.ws, local_addr=(address, 0)) as (ws, me):
                for n in range(events):  # all at once: the gateway reads the next when the backend answered
                    await ws.send(text("move", me, {"n": n}))
                replies = [(await recv_json(ws))["data"]["data"] for _ in range(2 * events)]
                assert replies == [{"n": n, "part": part} for n in range(events) for part in (1, 2)]

        async with anyio.create_task_group() as tasks:
            for client in range(clients):  # each from its own address, as a load from many machines: one
                tasks.start_soon(talk, f"127.0.0.{10 + client}")  # address has forward_max_pending_per_user
    by_client: dict[str, list[int]] = {}
    for body in backend.received:
        if body["type"] == "event":
            by_client.setdefault(body["client_id"], []).append(body["data"]["n"])
    assert len(by_client) == clients
    assert all(sequence == list(range(events)) for sequence in by_client.values())
    if batch:  # the events of different connections went together, never more than forward_batch
        assert 1 < max(backend.batches) <= 16, backend.batches
        assert sum(backend.batches) == clients * events
    else:
        assert backend.batches == []


async def test_e2e_a_client_flooding_a_slow_backend_is_paused_and_the_gateway_stays_small() -> None:
    # One event in flight per connection: its next frames wait, unread, in the kernel's buffers and
    # then the client's, which stops sending. The gateway holds one frame per connection at most.
    with EventBackend() as backend, run_server(*forward_options(backend.url, "--forward-timeout", "5"),
                                               "--log-level", "warning") as server:
        async with ws_client(server.ws):
            pass
        before = rss_mib(server.process)
        sock, me = raw_websocket(server)
        sock.setblocking(False)
        flood = client_frame(0x1, text("chat", me, {"mode": "slow", "pad": "x" * 8000}).encode())
        sent = 0
        with contextlib.suppress(BlockingIOError):
            for _ in range(20_000):  # 160 MB, were it all taken
                sent += sock.send(flood)
        assert sent < 20 * 1024 * 1024, "the gateway kept reading while its backend was slow"
        await eventually(lambda: len([b for b in backend.received if b["type"] == "event"]) >= 2,
                    "two slow events to reach the backend")
        assert server.metric("ws_micro_forwarded_total", outcome="busy") == 0
        assert rss_mib(server.process) - before < 20
        assert server.get("/healthz").json()["connections"] == 1
        sock.close()


async def test_e2e_past_forward_max_pending_events_are_refused_at_once() -> None:
    with EventBackend() as backend, run_server(*forward_options(backend.url, "--forward-max-pending", "3",
                                                                "--forward-timeout", "5"),
                                               "--log-level", "warning") as server:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(ws_client(server.ws)) for _ in range(8)]
            for ws, me in clients[:3]:
                await ws.send(text("chat", me, {"mode": "slow"}))
            await eventually(lambda: len([b for b in backend.received if b["type"] == "event"]) == 3,
                        "three slow events to wait at the backend")
            for ws, me in clients[3:]:
                await ws.send(text("chat", me))
                reply = (await recv_json(ws))["data"]["data"]
                assert (reply["code"], reply["message"]) == ("backend_unavailable", "3 events are waiting for the "
                                                             "backend (forward_max_pending); try again later")
            for ws, _ in clients[:3]:
                assert (await recv_json(ws))["event"] == "ack"
        assert server.metric("ws_micro_forwarded_total", outcome="busy") == 5


async def test_e2e_the_backend_hears_of_each_connect_and_disconnect_once_however_it_ends() -> None:
    limits = ("--rate-limit", "5", "--rate-burst", "2", "--max-message-size", "70000", "--max-queue-bytes", "65536",
              "--send-timeout", "1", "--jwt-secret", JWT_SECRET, "--log-level", "warning")
    with EventBackend(failing=2) as backend, run_server(*forward_options(backend.url), *limits) as server:
        ends: dict[str, str] = {}
        bearer = {"Authorization": f"Bearer {mint()}"}

        async with ws_client(server.ws, additional_headers=bearer) as (ws, me):  # a normal close
            ends[me] = "closed"
            await ws.send(text("chat", me, {"mode": "none"}))
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"
        async with ws_client(server.ws, additional_headers=bearer) as (ws, me):  # kicked by the API
            ends[me] = "kicked"
            assert httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT).status_code == 202
            await closed_with(ws)
        async with ws_client(server.ws, additional_headers=bearer) as (ws, me):  # over the rate limit
            ends[me] = "rate_limited"
            for _ in range(10):
                await ws.send(text("ping", me))
            assert (await closed_with(ws))[0] == 1008
        async with ws_client(server.ws, additional_headers=bearer) as (ws, me):  # a frame too big
            ends[me] = "message_too_big"
            await ws.send(text("chat", me, {"pad": "x" * 80_000}))
            assert (await closed_with(ws))[0] == 1009
        sock, me = raw_websocket(server, query=f"?token={mint()}")  # gone without a close frame
        ends[me] = "abnormal"
        await eventually(lambda: ("connect", None) in backend.notices(me), "the dropped client's connect notice")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        sock, me = raw_websocket(server, query=f"?token={mint()}")  # a reader that stops: cut off as slow
        ends[me] = "slow_consumer"
        for _ in range(500):
            if server.post(f"/api/clients/{me}", {"event": "bulk", "data": {"data": {"pad": "x" * 60_000}}},
                           headers=JSON).status_code == 404:
                break
        else:
            raise AssertionError("the reader that stopped was never cut off")
        sock.close()
        async with ws_client(server.ws, additional_headers=bearer) as (ws, me):  # logged out with its user
            ends[me] = "kicked#user"
            assert httpx.delete(f"{server.http}/api/users/alice", timeout=TIMEOUT).json() == {"disconnected": 1}
            await closed_with(ws)
        await eventually(lambda: all(len(backend.notices(client_id)) == 2 for client_id in ends), "the notices so far")
        assert server.metric("ws_micro_notices_total", outcome="retried") == 2  # the first, failed twice
        assert server.metric("ws_micro_notices_total", outcome="sent") == 2 * len(ends)
        async with ws_client(server.ws, additional_headers=bearer) as (ws, me):  # the server stops
            ends[me] = "shutdown"
            server.process.send_signal(signal.SIGTERM)
            assert (await closed_with(ws))[0] == 1012
        assert server.process.wait(TIMEOUT) == 0
    for client_id, end in ends.items():
        assert backend.notices(client_id) == [("connect", None), ("disconnect", end.partition("#")[0])], end
    events = [body for body in backend.received if body["type"] == "event"]
    first = next(iter(ends))
    # Its connect notice was retried (the backend failed it twice), so its event went ahead of it after
    # forward_timeout; its disconnect waited for it.
    assert [body["type"] for body in backend.received if body["client_id"] == first] == [
        "event", "connect", "disconnect"]

    assert events[0]["user"] == "alice"
    connect = next(body for body in backend.received if body["type"] == "connect")
    assert connect == {"type": "connect", "id": f"{connect['client_id']}:connect", "client_id": connect["client_id"],
                       "user": "alice", "meta": None, "rooms": [], "remote": connect["remote"]}


async def test_e2e_notices_can_go_elsewhere_or_nowhere_and_are_dropped_counted_when_never_taken() -> None:
    with EventBackend() as events, EventBackend() as lifecycle:
        with run_server(*forward_options(events.url, "--lifecycle-url", lifecycle.url), "--log-level", "warning") \
                as server:
            async with ws_client(server.ws) as (ws, me):
                await ws.send(text("chat", me, {"mode": "none"}))
                await ws.send(text("ping", me))
                await recv_json(ws)
            await eventually(lambda: len(lifecycle.notices(me)) == 2, "the notices at the lifecycle URL")
        assert [body["type"] for body in events.received] == ["event"]
        with run_server(*forward_options(events.url, "--lifecycle-url", ""), "--log-level", "warning") as server:
            async with ws_client(server.ws) as (ws, me):
                await ws.send(text("chat", me, {"mode": "none"}))
                await ws.send(text("ping", me))
                await recv_json(ws)
            assert server.metric("ws_micro_notices_total", outcome="sent") == 0
        assert events.notices(me) == []
        # Without forward_url, a lifecycle URL alone: notices, and events are not taken.
        with run_server("--lifecycle-url", lifecycle.url, "--backend-secret", BACKEND_SECRET, "--log-level",
                        "warning") as server:
            async with ws_client(server.ws) as (ws, me):
                await ws.send(text("chat", me))
                assert (await recv_json(ws))["data"]["data"]["code"] == "unknown_event"
            await eventually(lambda: len(lifecycle.notices(me)) == 2, "the notices without forwarding")
    down = f"http://127.0.0.1:{free_port()}/events"
    with run_server(*forward_options(down, "--lifecycle-retries", "1"), "--log-level", "warning") as server:
        async with ws_client(server.ws) as (ws, me):
            pass
        await server.wait_until(lambda: server.metric("ws_micro_notices_total", outcome="dropped") == 2,
                                "both notices to be given up on")
        assert server.metric("ws_micro_notices_total", outcome="retried") == 2


@pytest.mark.parametrize(("section", "batch"), [("A complete backend", ()),
                                                ("A backend that takes batches", ("--forward-batch", "8"))])
async def test_e2e_the_docs_backend_answers_chat_through_the_sidecar_api_and_logs_disconnects(
        section: str, batch: tuple[str, ...], tmp_path: Path) -> None:
    page = (ROOT / "docs" / "backend.md").read_text()
    code = re.search(f"## {section}\n.*?```python\n(.*?)```", page, re.DOTALL)
    assert code is not None, f"docs/backend.md lost its {section.lower()}"
    (tmp_path / "backend.py").write_text(code[1])
    port, gateway_port = free_port(), free_port()
    printed: list[str] = []
    with printing(printed, sys.executable, str(tmp_path / "backend.py"), env={
            "WS_MICRO_BACKEND_SECRET": BACKEND_SECRET, "PORT": str(port),
            "GATEWAY": f"http://localhost:{gateway_port}"}), \
            run_server(*forward_options(f"http://127.0.0.1:{port}/", *batch), "--forward-timeout", "5",
                       "--log-level", "warning", port=gateway_port) as server:
        async with ws_client(server.ws) as (a, id_a), ws_client(server.ws) as (b, id_b):
            await join(b, id_b, "lobby")
            await a.send(text("chat", id_a, {"room": "lobby", "text": "hi"}))
            assert await recv_json(a) == frame("sent", id_a, {"room": "lobby"})
            assert await recv_json(b) == frame("chat", id_b, {"from": id_a, "text": "hi"})
            # A malformed chat is answered, where the backend used to fail and its sender hear it cannot be reached.
            await a.send(text("chat", id_a, {"text": "which room?"}))
            assert await recv_json(a) == frame("refused", id_a, {
                "event": "chat", "message": "chat needs data.room and data.text, both strings"})
            await a.send(text("chat", id_a, {"room": "", "text": "hi"}))  # a room the sidecar API refuses
            refused = await recv_json(a)
            assert refused["event"] == "refused" and refused["data"]["data"]["event"] == "chat", refused
            assert "names no room" in refused["data"]["data"]["message"], refused
            await a.send(text("chat", id_a, {"room": "lobby", "text": "still here"}))
            assert await recv_json(a) == frame("sent", id_a, {"room": "lobby"})
            assert await recv_json(b) == frame("chat", id_b, {"from": id_a, "text": "still here"})
            # Both at once (in one batch, when batches are on): each gets its own answer.
            await a.send(text("chat", id_a, {"room": "lobby", "text": "one"}))
            await b.send(text("chat", id_b, {"text": "no room"}))
            assert await recv_json(a) == frame("sent", id_a, {"room": "lobby"})
            got = sorted([await recv_json(b), await recv_json(b)], key=lambda frame: frame["event"])  # either first
            assert [got[0], got[1]["event"]] == [frame("chat", id_b, {"from": id_a, "text": "one"}), "refused"]
    # The gateway has stopped, after sending the notices it had: both clients closed normally.
    assert sorted(printed) == sorted([f"disconnected: {id_a} closed", f"disconnected: {id_b} closed"])


async def test_e2e_notices_are_sent_several_at_once_after_the_senders_were_idle() -> None:
    with EventBackend(notice_delay=0.2) as backend, run_server(*forward_options(backend.url), "--log-level",
                                                               "warning") as server:
        def notified(client_ids: list[str], notices: int) -> bool:
            return all(len(backend.notices(client_id)) == notices for client_id in client_ids)

        for wave in range(2):
            backend.most_notices_at_once = 0
            async with contextlib.AsyncExitStack() as stack:
                client_ids = [(await stack.enter_async_context(ws_client(server.ws)))[1] for _ in range(8)]
                await eventually(functools.partial(notified, client_ids, 1), "eight connect notices")
            await eventually(functools.partial(notified, client_ids, 2), "their disconnect notices")
            # The second wave finds every sender made by the first one idle: they must all wake.
            assert backend.most_notices_at_once >= 4, wave


# One user's (or address's) slow events against everyone else's fast ones.

ATTACK_DELAY = 3.0  # seconds each of an attacker's events takes at the backend: far above the bounds below
_T = TypeVar("_T")


def bearer(token: str) -> dict[str, dict[str, str]]:
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


async def reply_seconds(ws: ClientConnection, me: str, n: int) -> float:
    """Seconds an event takes to come back answered by the backend (its first ack)."""
    started = time.perf_counter()
    await ws.send(text("chat", me, {"n": n}))
    first = await recv_json(ws)
    elapsed = time.perf_counter() - started
    assert first == frame("ack", me, {"n": n, "part": 1}), first
    assert await recv_json(ws) == frame("ack", me, {"n": n, "part": 2})
    return elapsed


async def worst_reply_seconds(ws: ClientConnection, me: str, events: int = 5) -> float:
    return max([await reply_seconds(ws, me, n) for n in range(events)])


async def attack(server: Server, backend: EventBackend, count: int, meanwhile: Callable[[], Awaitable[_T]],
                 **options: Any) -> tuple[list[dict[str, Any]], _T]:
    """``count`` connections (opened with ``options``) each send an event the backend answers after
    ATTACK_DELAY.  Once each is at the backend or refused (or the backend's pool is full), ``meanwhile``
    runs; then the first reply of each connection is in: its refusal, or its event's first ack."""
    replies: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(ws_client(server.ws, **options)) for _ in range(count)]

        def slow_events() -> int:
            return len([body for body in backend.received if body.get("data", {}).get("delay") == ATTACK_DELAY])

        async def first_reply(ws: ClientConnection, me: str) -> None:
            await ws.send(text("chat", me, {"mode": "slow", "delay": ATTACK_DELAY}))
            replies.append(await recv_json(ws))

        async with anyio.create_task_group() as tasks:
            for ws, me in clients:
                tasks.start_soon(first_reply, ws, me)
            await eventually(lambda: slow_events() + len(replies) >= count
                             or slow_events() >= ws_micro.BACKEND_POOL_SIZE, "the attack to be in place")
            result = await meanwhile()
    return replies, result


@BATCHING
async def test_e2e_one_users_slow_events_leave_others_their_free_latency(batch: tuple[str, ...]) -> None:
    # The case: 150 connections of one user fill a pool of 100 with events that take 3 s, and
    # another user's event, answered in 0.01 s, waited 4.78 s.
    attackers, share = 150, 10
    with EventBackend() as backend, run_server(*forward_options(backend.url, "--forward-timeout", "10", *batch),
                                               "--jwt-secret", JWT_SECRET, "--log-level", "warning") as server:
        async with ws_client(server.ws, **bearer(mint())) as (ws, alice):
            await reply_seconds(ws, alice, -1)  # the pool's first connection, and alice's connect notice
            free = await worst_reply_seconds(ws, alice)
            replies, attacked = await attack(server, backend, attackers, functools.partial(
                worst_reply_seconds, ws, alice), **bearer(mint({"sub": "mallory"})))
        print(f"alice's worst of 5 replies: {free:.3f} s free, {attacked:.3f} s with mallory's {attackers} "
              f"slow events")
        assert attacked < free + 0.5, (free, attacked)
        refusals = [reply["data"]["data"] for reply in replies if reply["event"] == "error"]
        assert len(refusals) == attackers - share
        assert {(refusal["code"], refusal["message"]) for refusal in refusals} == {(
            "backend_unavailable",
            "user 'mallory' has 10 events waiting for the backend (forward_max_pending_per_user); try again later")}
        assert [reply["event"] for reply in replies if reply["event"] != "error"] == ["ack"] * share
        assert server.metric("ws_micro_forwarded_total", outcome="over_share") == attackers - share
        assert server.metric("ws_micro_forwarded_total", outcome="busy") == 0


@BATCHING
async def test_e2e_slow_events_from_one_address_leave_other_addresses_the_backend(batch: tuple[str, ...]) -> None:
    # The other case: with forward_max_pending 100, 100 connections each holding a 3 s event
    # got a bystander's event refused at once, 8 times out of 8.  Anonymous clients share by address.
    attackers, share = 100, 10
    with EventBackend() as backend, run_server(*forward_options(backend.url, "--forward-timeout", "10",
                                                                "--forward-max-pending", "100", *batch),
                                               "--log-level", "warning") as server:
        async with ws_client(server.ws, local_addr=("127.0.0.2", 0)) as (ws, bystander):
            await reply_seconds(ws, bystander, -1)
            free = await worst_reply_seconds(ws, bystander)
            replies, attacked = await attack(server, backend, attackers, functools.partial(
                worst_reply_seconds, ws, bystander))
        print(f"127.0.0.2's worst of 5 replies: {free:.3f} s free, {attacked:.3f} s with {attackers} slow events "
              "from 127.0.0.1")
        assert attacked < free + 0.5, (free, attacked)
        refusals = [reply["data"]["data"] for reply in replies if reply["event"] == "error"]
        assert {(refusal["code"], refusal["message"]) for refusal in refusals} == {(
            "backend_unavailable",
            "address 127.0.0.1 has 10 events waiting for the backend (forward_max_pending_per_user); "
            "try again later")}
        assert len(refusals) == attackers - share
        assert server.metric("ws_micro_forwarded_total", outcome="over_share") == attackers - share


async def test_e2e_a_flood_of_connections_from_one_address_does_not_hold_back_others_notices(
        tmp_path: Path) -> None:
    # Every connection queues a connect and a disconnect notice, and a connection's events wait for its
    # connect notice (up to forward_timeout).  One address opening and closing connections faster than
    # the backend takes notices queued them all ahead of everyone else's: another address's first event
    # waited forward_timeout (3 s).
    churn, notice_delay, log = 200, 0.1, tmp_path / "gateway.log"
    with EventBackend(notice_delay=notice_delay) as backend, \
            run_server(*forward_options(backend.url, "--forward-timeout", "3"), log=log) as server:

        async def open_and_close() -> None:
            for _ in range(churn // 10):
                async with ws_client(server.ws):
                    pass

        async with anyio.create_task_group() as tasks:
            for _ in range(10):
                tasks.start_soon(open_and_close)
        await server.wait_until(lambda: server.metric("ws_micro_disconnects_total", reason="closed") == churn,
                                "the connections to end")
        taken = len(backend.received)
        async with ws_client(server.ws, local_addr=("127.0.0.2", 0)) as (ws, bystander):
            first = await reply_seconds(ws, bystander, 0)
        print(f"127.0.0.2's first reply: {first:.3f} s after {churn} connections from 127.0.0.1, of whose "
              f"{2 * churn} notices the backend had taken {taken}")
        # Its connect notice waits for a sender to finish one notice, then takes its own time.
        assert first < 2 * notice_delay + 0.3, first
        assert [body["type"] for body in backend.received if body["client_id"] == bystander] == ["connect", "event"]
        dropped = server.metric("ws_micro_notices_total", outcome="dropped")
        assert dropped >= 2 * churn - taken - 100 - 8  # all the address's but 100 queued and 8 being sent
    warnings = [line for line in log.read_text().splitlines() if "lifecycle_max_queued_per_user" in line]
    assert warnings == ["WARNING:  forwarding: a notice was dropped: address 127.0.0.1 has 100 waiting "
                        "(lifecycle_max_queued_per_user)"]


async def test_e2e_a_backend_answer_with_an_event_only_the_gateway_sends_is_refused_whole(tmp_path: Path) -> None:
    async def answer(body: dict[str, Any]) -> Response:
        if body["type"] != "event":
            return Response(status_code=204)
        forged = body["data"]["event"]  # what the client asks this backend to answer with
        return JSONResponse({"events": [{"event": "ack", "data": {}},
                                        {"event": forged, "data": {"message": "connection request granted"}}]})

    log = tmp_path / "gateway.log"
    with BackendServer("/events", answer) as backend, run_server(*forward_options(backend.url), log=log) as server:
        for source in ("backend", "api", "python"):
            assert server.metric("ws_micro_server_events_refused_total", source=source) == 0
        async with ws_client(server.ws) as (ws, me):
            for name in ("connect", "error", "pong", "joined", "left", "presence"):
                await ws.send(text("chat", me, {"event": name}))
                assert without_message(await recv_json(ws)) == {
                    "event": "error", "client_id": me,
                    "data": {"data": {"code": "backend_error", "event": "chat", "status": 200}}}
            await ws.send(text("chat", me, {"event": "connect"}))
            reply = (await recv_json(ws))["data"]["data"]
            assert reply["message"] == "the backend answered 'connect', an event only the gateway sends"
            # Not even the answer's first event went out: the next frame is the pong.
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"
            await ws.send(text("chat", me, {"event": "chat"}))  # any other name goes
            assert [(await recv_json(ws))["event"] for _ in range(2)] == ["ack", "chat"]
        assert server.metric("ws_micro_server_events_refused_total", source="backend") == 7
        assert server.metric("ws_micro_forwarded_total", outcome="backend_error") == 7
        assert server.metric("ws_micro_forwarded_total", outcome="ok") == 1
    # The backend's operator is told once (throttled: one line per 10 s), not once per answer.
    [line] = [line for line in log.read_text().splitlines() if "only the gateway sends" in line]
    assert line.startswith("WARNING") and line.endswith(
        "forwarding: the backend answered 'connect', an event only the gateway sends, to event 'chat'; its whole "
        "answer was refused and its sender got backend_error (docs/backend.md)")
    assert "Traceback" not in log.read_text()


# The gateway's HTTP client (ws_micro's own, on asyncio's transports) against answers framed every way a
# backend's server may frame them.

class RawBackend:
    """A backend on bare sockets (asyncio streams, in the test's own loop), answering each forwarded event
    with an ``ack`` framed as its ``data.mode`` says, notices with 204; it counts the connections made to it
    and the most open at once. ``hold`` events wait for ``release``."""

    def __init__(self, tls: ssl.SSLContext | None = None, keep_alive: float | None = None) -> None:
        self.tls = tls  # with it, https on localhost
        # A request that comes on a connection idle for longer is not answered, and the connection closed: what a
        # server does when its keep-alive timer fires as the request is on its way.
        self.keep_alive = keep_alive
        self.closed_unanswered = 0
        self.connections = self.open = self.most_open = 0
        self.events: list[dict[str, Any]] = []
        self.release = asyncio.Event()

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0, ssl=self.tls)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"https://localhost:{port}/events" if self.tls else f"http://127.0.0.1:{port}/events"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        loop, answered_at = asyncio.get_running_loop(), None
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.keep_alive is not None and answered_at is not None \
                        and loop.time() - answered_at > self.keep_alive:
                    self.closed_unanswered += 1
                    return
                if await self.answer(head, reader, writer):
                    return
                answered_at = loop.time()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def answer(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer the request that starts with ``head``; True when the connection is to close."""
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)\r\n", head)
        assert length is not None and head.startswith(b"POST /events HTTP/1.1\r\n"), head
        body = json.loads(await reader.readexactly(int(length[1])))
        if body["type"] != "event":
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            return False
        self.events.append(body)
        mode, n = body["data"].get("mode"), body["data"].get("n")
        content = json.dumps({"events": [{"event": "ack", "data": {"n": n}}]}).encode()
        sized = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(content), content)
        if mode == "chunked":  # 7-byte chunks, one with an extension, and a trailer
            chunks = [content[i:i + 7] for i in range(0, len(content), 7)]
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
                b"%x%s\r\n%s\r\n" % (len(chunk), b";x=1" if i == 1 else b"", chunk) for i, chunk in enumerate(chunks))
                + b"0\r\nX-Checksum: 1\r\n\r\n")
        elif mode == "close":
            writer.write(sized.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        elif mode == "eof":  # HTTP/1.0 without a length: the body ends with the connection
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + content)
        elif mode == "hints":
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" + sized)
        elif mode == "dribble":  # a byte at a time, each in its own segment: parsed as the bytes come
            for byte in sized:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.001)  # not a wait for anything: it keeps the bytes in separate reads
        elif mode == "huge":  # an answer over the gateway's 1 MiB, sent whole
            big = b'{"events": [{"event": "ack", "data": {"pad": "' + b"x" * 2_000_000 + b'"}}]}'
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
                len(big), big))
        elif mode == "head":  # headers without end
            writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"y" * 100_000)
        elif mode in ("status", "lengths"):
            writer.write(b"HTPT/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}" if mode == "status" else
                         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}")
        elif mode == "late":  # after the gateway's forward_timeout, with another event than the ack
            await asyncio.sleep(1.0)
            writer.write(sized.replace(b'"ack"', b'"not_yours"'))
        elif mode == "hold":
            await self.release.wait()
            writer.write(sized)
        elif mode == "pause":
            await asyncio.sleep(body["data"]["delay"])
            writer.write(sized)
        else:
            writer.write(sized)
        await writer.drain()
        return mode in ("close", "eof", "huge", "head", "status", "lengths", "late")


async def test_e2e_answers_framed_every_way_reach_the_sender_over_kept_alive_connections(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    async with RawBackend() as backend:
        with run_server(*forward_options(backend.url), log=log) as server:
            async with ws_client(server.ws) as (ws, me):
                for n, mode in enumerate(("plain", "chunked", "hints", "dribble", "plain", "close", "plain", "eof",
                                          "plain", "late", "plain")):
                    await ws.send(text("chat", me, {"mode": mode, "n": n}))
                    reply = await recv_json(ws)
                    if mode == "late":  # out of time; its answer, when it comes, must not pass for the next one's
                        assert reply["data"]["data"]["code"] == "backend_unavailable", reply
                    else:
                        assert reply == frame("ack", me, {"n": n}), (mode, reply)
                for mode, code, message in (
                        ("huge", "backend_error", 'the backend\'s answer is not {"events": [...]}: it is larger '
                                                  'than 1048576 bytes'),
                        ("head", "backend_unavailable", "the backend cannot be reached (its answer is not HTTP/1.1: "
                                                        "its head, a chunk's size line or its trailer is longer than "
                                                        "65536 bytes)"),
                        ("status", "backend_unavailable", "the backend cannot be reached (its answer is not "
                                                          "HTTP/1.1: illegal status line: bytearray(b'HTPT/1.1 200 "
                                                          "OK'))"),
                        ("lengths", "backend_unavailable", "the backend cannot be reached (its answer is not "
                                                           "HTTP/1.1: conflicting Content-Length headers)")):
                    await ws.send(text("chat", me, {"mode": mode}))
                    reply = (await recv_json(ws))["data"]["data"]
                    assert (reply["code"], reply["message"]) == (code, message), (mode, reply)
                    await ws.send(text("chat", me, {"n": 99}))  # and the next event goes through, on a new connection
                    assert await recv_json(ws) == frame("ack", me, {"n": 99})
            # One connection for the events up to the first that closed it, then one after each that did.
            assert backend.connections == 1 + 3 + 4, backend.connections
    assert "Traceback" not in log.read_text()


async def test_e2e_events_past_the_pool_wait_for_its_connections_and_open_no_more() -> None:
    count = ws_micro.BACKEND_POOL_SIZE + 50
    async with RawBackend() as backend:
        with run_server(*forward_options(backend.url, "--forward-timeout", "10", "--forward-max-pending-per-user",
                                         "0"), "--log-level", "warning") as server:
            async with contextlib.AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(ws_client(server.ws)) for _ in range(count)]
                for n, (ws, me) in enumerate(clients):
                    await ws.send(text("chat", me, {"mode": "hold", "n": n}))
                await eventually(lambda: len(backend.events) == ws_micro.BACKEND_POOL_SIZE,
                                 "the pool's connections to be taken")
                backend.release.set()
                for n, (ws, me) in enumerate(clients):
                    assert await recv_json(ws) == frame("ack", me, {"n": n})
            assert (backend.most_open, backend.connections) == (ws_micro.BACKEND_POOL_SIZE,) * 2
            assert server.metric("ws_micro_forwarded_total", outcome="ok") == count


def without(tmp_path: Path, *packages: str) -> dict[str, str]:
    """The environment of a process where ``packages`` cannot be imported, as where they were never installed."""
    missing = tmp_path / "missing"
    missing.mkdir(exist_ok=True)
    for package in packages:
        (missing / f"{package}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{package}'\", "
                                               f"name='{package}')\n")
    return {"PYTHONPATH": str(missing)}


async def test_e2e_forwarding_and_the_connect_hook_need_only_h11_which_uvicorn_brings(tmp_path: Path) -> None:
    # They used to need aiohttp; a copied ws_micro.py now forwards with h11, which uvicorn requires.
    async def grant(asked: dict[str, Any]) -> Any:
        return JSONResponse({"user": "alice"})

    with EventBackend() as backend, BackendServer("/hook", grant) as hook, run_server(
            *forward_options(backend.url), "--connect-hook-url", hook.url, "--log-level", "warning",
            env=without(tmp_path, "aiohttp")) as server:
        async with ws_client(server.ws) as (ws, me):
            await ws.send(text("chat", me, {"n": 1}))
            assert await recv_json(ws) == frame("ack", me, {"n": 1, "part": 1})
        assert backend.received[-1]["user"] == "alice"


async def test_e2e_without_h11_a_gateway_that_forwards_nothing_runs_as_before(tmp_path: Path) -> None:
    # h11 is imported only where a backend URL is set: under a server that does not bring it (granian), a
    # gateway without forwarding or a connect hook runs without it.
    with run_server(asgi_server="granian", env=without(tmp_path, "h11")) as server:
        async with ws_client(server.ws) as (ws, me):
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"


async def test_e2e_a_batch_answered_wrong_fails_its_events_as_one_event_answered_wrong_would(tmp_path: Path) -> None:
    # Each event of a batch is answered by the entry at its place: a forged event fails its own sender
    # only; a status, an answer that is not an array of as many, or no answer in time fail every event of
    # the batch, each sender getting what it would have for its event alone.
    batches: list[list[dict[str, Any]]] = []

    async def answer(body: Any) -> Response:
        if isinstance(body, dict):
            return Response(status_code=204)  # a notice
        batches.append(body)
        modes = [event["data"].get("mode") for event in body]
        if "500" in modes:
            return JSONResponse({"error": "boom"}, 500)
        if "short" in modes:
            return JSONResponse([{"events": []}] * (len(body) + 1))
        if "object" in modes:
            return JSONResponse({"events": []})
        if "slow" in modes:
            await anyio.sleep(1)
        if "empty" in modes:
            return Response(status_code=204)
        return JSONResponse([None if event["data"].get("mode") == "none" else {"events": [{
            "event": "connect" if event["data"].get("mode") == "forge" else "ack", "data": event["data"]}]}
            for event in body])

    log = tmp_path / "gateway.log"
    with BackendServer("/events", answer) as backend, run_server(
            *forward_options(backend.url, "--forward-batch", "4"), log=log) as server:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(ws_client(server.ws)) for _ in range(4)]

            async def round_of(modes: list[str]) -> list[dict[str, Any]]:
                """Each client sends an event with its mode, all at once; the first frame each gets back."""
                for (ws, me), mode in zip(clients, modes, strict=True):
                    await ws.send(text("chat", me, {"mode": mode}))
                    if mode in ("none", "empty"):  # nothing comes back: the pong of its next frame comes first
                        await ws.send(text("ping", me))
                return [await recv_json(ws) for ws, _ in clients]

            replies = await round_of(["ack", "forge", "none", "ack"])
            assert [reply["event"] for reply in replies[:2]] == ["ack", "error"]
            assert replies[1]["data"]["data"]["message"] == "the backend answered 'connect', an event only the " \
                                                             "gateway sends"
            assert [reply["event"] for reply in replies[2:]] == ["pong", "ack"]
            for mode, code, message in (
                    ("500", "backend_error", "the backend answered HTTP 500"),
                    ("short", "backend_error", "the backend answered {n} replies to a batch of {m} events"),
                    ("object", "backend_error", 'the backend\'s answer to a batch is not [{{"events": [...]}}, '
                                                "...]: Expected `array`, got `object`"),
                    ("slow", "backend_unavailable", "the backend did not answer within 0.5 seconds")):
                # One of the batch's events asks for the failure: every event of its batch gets it.
                replies = await round_of([mode, "ack", "ack", "ack"])
                failing = next(b for b in reversed(batches) if any(e["data"]["mode"] == mode for e in b))
                senders = {event["client_id"] for event in failing}
                for (_, me), reply in zip(clients, replies, strict=True):
                    if me in senders:
                        assert reply["event"] == "error", (mode, reply)
                        expected = message.format(n=len(failing) + 1, m=len(failing))
                        assert (reply["data"]["data"]["code"], reply["data"]["data"]["message"]) == (code, expected)
                    else:
                        assert reply["event"] == "ack", (mode, reply)
            # 204: nothing for any of them, and the connections go on.
            assert [reply["event"] for reply in await round_of(["empty"] * 4)] == ["pong"] * 4
        assert server.metric("ws_micro_forwarded_total", outcome="timeout") >= 1
    assert "Traceback" not in log.read_text()


async def test_e2e_a_batch_carries_at_most_forward_batch_bytes_and_a_larger_event_goes_alone() -> None:
    sizes: list[tuple[int, int]] = []  # (events, bytes) of each batch, as the gateway encoded it

    async def answer(body: Any) -> Response:
        if isinstance(body, dict):
            return Response(status_code=204)
        sizes.append((len(body), len(msgspec.json.encode(body))))
        return JSONResponse([{"events": [{"event": "ack", "data": {"n": event["data"]["n"]}}]} for event in body])

    clients, events, limit = 10, 20, 1200
    with BackendServer("/events", answer) as backend, run_server(
            *forward_options(backend.url, "--forward-batch", "100", "--forward-batch-bytes", str(limit)),
            "--log-level", "warning") as server:

        async def talk(address: str) -> None:
            async with ws_client(server.ws, local_addr=(address, 0)) as (ws, me):
                for n in range(events):
                    await ws.send(text("chat", me, {"n": n, "pad": "x" * 250}))
                assert [(await recv_json(ws))["data"]["data"]["n"] for _ in range(events)] == list(range(events))
                await ws.send(text("chat", me, {"n": -1, "pad": "y" * 2 * limit}))
                assert (await recv_json(ws))["data"]["data"]["n"] == -1

        async with anyio.create_task_group() as tasks:
            for client in range(clients):
                tasks.start_soon(talk, f"127.0.0.{10 + client}")
    assert sum(count for count, _ in sizes) == clients * (events + 1)
    assert max(count for count, _ in sizes) > 1, sizes
    assert all(size <= limit for count, size in sizes if count > 1), sizes
    assert len([size for count, size in sizes if count == 1 and size > 2 * limit]) == clients, sizes


async def test_e2e_a_connection_idle_for_as_long_as_a_backend_keeps_one_is_not_reused() -> None:
    # uvicorn and Node close a connection idle for 5 s. An event written on it as the backend closed it got
    # backend_unavailable: the gateway cannot send a POST again, as the backend may have taken it.
    async with RawBackend(keep_alive=4.5) as backend:
        with run_server(*forward_options(backend.url), "--log-level", "warning") as server:
            async with ws_client(server.ws) as (ws, me):
                await ws.send(text("chat", me, {"n": 1}))
                assert await recv_json(ws) == frame("ack", me, {"n": 1})
                await anyio.sleep(4.6)  # the scenario itself: the pooled connection idle past the backend's keep-alive
                await ws.send(text("chat", me, {"n": 2}))
                assert await recv_json(ws) == frame("ack", me, {"n": 2})
            assert (backend.closed_unanswered, backend.connections) == (0, 2)


async def test_requests_out_of_time_while_waiting_or_connecting_never_let_the_pool_grow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A connection made just as its request ran out of time closed and gave its slot back, and so did the
    # request: the pool counted one connection less each time, and opened more than BACKEND_POOL_SIZE.
    # The client in this process, with a pool of 2, against a real server answering in 50 ms; each round's
    # requests run out of time around then, while in flight, waiting for a connection, or connecting.
    monkeypatch.setattr(ws_micro, "BACKEND_POOL_SIZE", 2)
    client = ws_micro._BackendClient(ws_micro.Settings(backend_secret=BACKEND_SECRET), "forward_url")
    async with RawBackend() as backend, client.running():
        body = json.dumps({"type": "event", "data": {"mode": "pause", "delay": 0.05, "n": 0}}).encode()
        for _ in range(30):
            outcomes = await asyncio.gather(*(client.post(backend.url, body, 1000, 0.045 + 0.001 * (n % 10))
                                              for n in range(10)), return_exceptions=True)
            assert all(isinstance(outcome, (tuple, TimeoutError)) for outcome in outcomes), outcomes
        # The connections it closed are gone at the server too; then ten requests at once may open two.
        await eventually(lambda: backend.open <= 2, "the closed connections' handlers to end")
        backend.most_open = backend.open
        slow = body.replace(b"0.05", b"0.1")
        answers = await asyncio.gather(*(client.post(backend.url, slow, 1000, 5) for _ in range(10)))
        assert [status for status, _ in answers] == [200] * 10
        assert backend.most_open <= 2, backend.most_open


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost, signed by its own key: (its PEM file, the key's PEM file)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_e2e_an_https_backend_is_reached_when_its_certificate_is_trusted_and_only_then(tmp_path: Path) -> None:
    cert_file, key_file = self_signed_certificate(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    async with RawBackend(tls) as backend:
        # The system's trusted certificates, as OpenSSL reads them (SSL_CERT_FILE), vouch for the backend's.
        with run_server(*forward_options(backend.url), "--log-level", "warning",
                        env={"SSL_CERT_FILE": str(cert_file)}) as server:
            async with ws_client(server.ws) as (ws, me):
                for n in range(3):
                    await ws.send(text("chat", me, {"n": n}))
                    assert await recv_json(ws) == frame("ack", me, {"n": n})
        assert backend.connections == 1
        with run_server(*forward_options(backend.url), "--log-level", "warning") as server:
            async with ws_client(server.ws) as (ws, me):
                await ws.send(text("chat", me, {"n": 0}))
                refused = (await recv_json(ws))["data"]["data"]
                assert refused["code"] == "backend_unavailable", refused
                assert "CERTIFICATE_VERIFY_FAILED" in refused["message"], refused
        assert len(backend.events) == 3  # the untrusting gateway's event never reached it
