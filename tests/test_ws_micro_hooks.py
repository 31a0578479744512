"""Tests of the registry's lifecycle hooks, on_connect and on_disconnect, and of Registry.join/leave by id
(docs/embedding.md, "Lifecycle hooks"; docs/cluster.md for joins across instances).

A host app (conftest's HOOKS_APP) is served by a real server process; its hooks write each call to a
file the test reads, as the backend's notices are read in test_ws_micro_backend.py, and its routes call
registry.join() and leave().  Clients are real `websockets` clients.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest
from conftest import (
    FAST_HEARTBEAT,
    HOOKS_APP,
    TIMEOUT,
    RedisServer,
    Server,
    closed_with,
    drop,
    eventually,
    frame,
    greeted,
    hook_calls,
    hooks_app,
    mint,
    new_session,
    nothing_more,
    recv_json,
    resume_url,
    run_server,
    text,
    ws_client,
)
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from ws_micro import Client, HandshakeRefused, Registry

pytestmark = pytest.mark.anyio


@contextlib.contextmanager
def hooked(folder: Path, **env: str) -> Iterator[Server]:
    """The host app with hooks, served by uvicorn, its log in ``folder``/server.log."""
    with run_server("--log-level", "warning", uvicorn_app="hooks:app", cwd=folder, env=hooks_app(folder, **env),
                    log=folder / "server.log") as server:
        yield server


def token(mode: str | None = None, user: str = "alice", **claims: Any) -> str:
    """A token whose meta tells the host app's on_connect what to do."""
    return mint({"sub": user, "meta": {"mode": mode} if mode else None, **claims})


async def refused(url: str) -> tuple[int, dict[str, Any]]:
    """The status and error object of a refused handshake."""
    with pytest.raises(InvalidStatus) as refusal:
        async with connect(url):
            pass
    return refusal.value.response.status_code, json.loads(refusal.value.response.body)["error"]


def member(server: Server, method: str, client_id: str, room: str, publish: str | None = None) -> httpx.Response:
    """registry.join() (PUT) or leave() (DELETE), called by the host app's route; then, with ``publish``, a
    registry.publish() of that event to the room, at once."""
    query = "" if publish is None else f"?publish={publish}"
    return httpx.request(method, f"{server.http}/members/{client_id}/{room}{query}", timeout=TIMEOUT)


# --------------------------------------------------------------------------
# on_connect
# --------------------------------------------------------------------------


@pytest.mark.process
async def test_e2e_on_connect_refuses_with_403_and_its_message_and_fails_closed_with_503(tmp_path: Path) -> None:
    with hooked(tmp_path, HOOK_TIMEOUT="2", WS_MICRO_MAX_CONNECTIONS="3") as server:
        for mode, message in [("refuse", "not today, alice"), ("false", "this connection was refused"),
                              ("long", "é" * 61)]:  # a message of 200 bytes, cut to what a close reason holds
            assert await refused(f"{server.ws}?token={token(mode)}") == (403, {"code": "refused", "message": message})
        with pytest.raises(HandshakeRefused) as refusal:  # the Python client says why
            await Client(server.ws, token=token("refuse")).connect()
        assert (refusal.value.status, refusal.value.code, refusal.value.message) == (403, "refused", "not today, alice")
        # A hook that raises, answers what is neither None nor a bool, or hangs: 503, and a clear message.
        unavailable = {"code": "hook_failed",
                       "message": "the server could not take this connection now; try again later"}
        for mode in ("raise", "answer", "hang"):
            assert await refused(f"{server.ws}?token={token(mode)}") == (503, unavailable)
        # Handshakes waiting for the hook count against max_connections: two that hang hold two places.
        async with anyio.create_task_group() as tasks:
            for _ in range(2):
                tasks.start_soon(refused, f"{server.ws}?token={token('hang')}")
            await eventually(lambda: len(hook_calls(tmp_path)) == 9, "two handshakes waiting for on_connect")
            async with ws_client(f"{server.ws}?token={token()}"):
                assert (await refused(f"{server.ws}?token={token()}"))[1]["code"] == "full"
        for reason, count in (("refused", 4), ("hook_failed", 5), ("full", 1)):
            assert server.metric("ws_micro_rejected_handshakes_total", reason=reason) == count, reason
        for outcome, count in (("accepted", 1), ("refused", 4), ("failed", 2), ("timeout", 3)):
            assert server.metric("ws_micro_on_connect_total", outcome=outcome) == count, outcome
        # Nothing is left of them; and only the one client let in got on_disconnect.
        assert server.get("/api/clients").json()["count"] == 0
        await eventually(lambda: [call[0] for call in hook_calls(tmp_path)].count("disconnect") == 1, "its disconnect")
    calls = hook_calls(tmp_path)
    assert [call[0] for call in calls].count("connect") == 10
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
    # One line for each kind of failure, the next ones held back for 10 s: what failed, and where.
    failures = [line for line in log.splitlines() if line.startswith("on_connect")]
    assert len(failures) == 2, failures
    assert failures[0].startswith("on_connect raised RuntimeError('the database is down') (at hooks.py:"), failures
    assert failures[0].endswith("; its handshake was refused with 503 (docs/embedding.md#lifecycle-hooks)")
    assert failures[1].startswith("on_connect did not return within 2 seconds, for client "), failures


@pytest.mark.process
async def test_e2e_the_rooms_on_connect_joins_come_as_joined_frames_after_the_connect_frame(tmp_path: Path) -> None:
    with hooked(tmp_path, WS_MICRO_PRESENCE_EVENTS="true") as server:
        async with ws_client(f"{server.ws}?token={token(rooms=['lobby'])}") as (peer, peer_id):
            assert (await recv_json(peer))["event"] == "presence"  # it hears its own join of its granted room
            meta = {"rooms": ["a", "lobby:2", "a"]}
            async with connect(f"{server.ws}?token={mint({'meta': meta, 'rooms': ['lobby']})}") as ws:
                hello = await greeted(ws)
                me = hello["client_id"]
                assert hello["data"]["data"]["rooms"] == ["lobby"]  # granted by its token: in the greeting
                received = [await recv_json(ws) for _ in range(5)]
                presence = {"action": "joined", "client_id": me, "user": "alice"}
                # Then, in the order the hook joined them (a room joined twice, once), each as a join frame
                # would: joined with the members, then presence.  Its token grants it no right to join either.
                assert received == [frame("presence", me, {"room": "lobby", **presence}),
                                    frame("joined", me, {"room": "a", "members": 1}),
                                    frame("presence", me, {"room": "a", **presence}),
                                    frame("joined", me, {"room": "lobby:2", "members": 1}),
                                    frame("presence", me, {"room": "lobby:2", **presence})]
                assert await recv_json(peer) == frame("presence", peer_id, {"room": "lobby", **presence})
                await nothing_more(ws, me)
                assert server.get(f"/api/clients/{me}").json()["rooms"] == ["a", "lobby", "lobby:2"]
                await ws.send(text("join", me, {"room": "b"}))  # what the client itself may not do
                assert (await recv_json(ws))["data"]["data"]["code"] == "forbidden"


# --------------------------------------------------------------------------
# on_disconnect
# --------------------------------------------------------------------------


@pytest.mark.process
async def test_e2e_on_disconnect_is_called_once_for_each_session_however_it_ends(tmp_path: Path) -> None:
    ends: dict[str, tuple[str, str]] = {}  # client id -> its user, and how its session ended
    with hooked(tmp_path, WS_MICRO_RECOVERY_WINDOW="1") as server:
        async with ws_client(f"{server.ws}?token={token()}") as (ws, me):  # a normal close
            ends[me] = ("alice", "closed")
        async with ws_client(f"{server.ws}?token={token()}") as (ws, me):  # kicked through the API
            ends[me] = ("alice", "kicked")
            assert httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT).status_code == 202
            await closed_with(ws)
        async with ws_client(f"{server.ws}?token={token(user='grumpy')}") as (ws, grumpy):  # its on_disconnect raises
            ends[grumpy] = ("grumpy", "closed")
        # Dropped, resumed, dropped again: one session, which ends when the window passes.
        ws, me, resume = await new_session(f"{server.ws}?token={token()}")
        ends[me] = ("alice", "expired")
        await drop(ws, server, me)
        back = await connect(resume_url(server, resume, offset=0) + f"&token={token()}")
        assert (await greeted(back))["data"]["data"]["recovered"] is True
        await drop(back, server, me)
        await eventually(lambda: len(hook_calls(tmp_path, me)) == 2, "the session to expire")
        # Kicked while away: it ends then.
        ws, me, _ = await new_session(f"{server.ws}?token={token()}")
        ends[me] = ("alice", "kicked")
        await drop(ws, server, me)
        assert httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT).status_code == 202
        # Back further behind than its frames go (an offset past them), with credentials on_connect refuses: the
        # session ends (not_recovered), and the new one it would have had is refused after the handshake.
        ws, me, resume = await new_session(f"{server.ws}?token={token()}")
        ends[me] = ("alice", "not_recovered")
        await drop(ws, server, me)
        async with connect(resume_url(server, resume, offset=99) + f"&token={token('refuse')}") as back:
            assert await closed_with(back) == (1008, "not today, alice")
        assert server.metric("ws_micro_disconnects_total", reason="refused") == 1
        # The server stops: the sessions of a client connected, and of one away, end.
        ws, me, _ = await new_session(f"{server.ws}?token={token()}")
        ends[me] = ("alice", "shutdown")
        away, away_id, _ = await new_session(f"{server.ws}?token={token()}")
        ends[away_id] = ("alice", "shutdown")
        await drop(away, server, away_id)
        await eventually(lambda: all(len(hook_calls(tmp_path, client_id)) == 2 for client_id, (_, end) in ends.items()
                                     if end != "shutdown"), "every session's end so far")
        assert server.metric("ws_micro_on_disconnect_total", outcome="failed") == 1
        server.process.send_signal(signal.SIGTERM)
        assert (await closed_with(ws))[0] == 1012
        server.process.wait(TIMEOUT)  # uvicorn ends by its signal, once it has shut down
    for client_id, (user, end) in ends.items():
        assert hook_calls(tmp_path, client_id) == [["connect", client_id, user], ["disconnect", client_id, user, end]]
    # The session refused after its handshake: on_connect was asked, and it never began.
    refused_ids = {call[1] for call in hook_calls(tmp_path)} - set(ends)
    assert [hook_calls(tmp_path, client_id) for client_id in refused_ids] == [
        [["connect", client_id, "alice"]] for client_id in refused_ids]
    assert len(refused_ids) == 1
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
    raised_at = next(number for number, line in enumerate(HOOKS_APP.splitlines(), 1) if "raise KeyError" in line)
    assert [line for line in log.splitlines() if line.startswith("on_disconnect")] == [
        f"on_disconnect raised KeyError('grumpy') (at hooks.py:{raised_at}), for client {grumpy} (closed)"]


@pytest.mark.process
async def test_e2e_on_disconnect_calls_that_hang_are_bounded_in_number_and_in_time(tmp_path: Path) -> None:
    # The hook of user slowpoke never returns.  At most HOOK_MAX_RUNNING (3 here) calls run at once, each
    # for HOOK_TIMEOUT: past them, the calls are dropped, counted and logged, and the gateway holds no more.
    with hooked(tmp_path, HOOK_TIMEOUT="3", HOOK_MAX_RUNNING="3") as server:
        def ended() -> list[str]:
            return [call[1] for call in hook_calls(tmp_path) if call[0] == "disconnect"]

        slow = []
        for n in range(5):
            async with ws_client(f"{server.ws}?token={token(user='slowpoke')}") as (_, me):
                slow.append(me)
            if n < 3:
                await eventually(lambda: ended() == slow, "its on_disconnect to be called")
            else:
                dropped = n - 2
                await server.wait_until(lambda: server.metric("ws_micro_on_disconnect_total", outcome="dropped")
                                        == dropped, "its on_disconnect to be dropped")  # noqa: B023 (awaited here)
        assert ended() == slow[:3]
        await server.wait_until(lambda: server.metric("ws_micro_on_disconnect_total", outcome="timeout") == 3,
                                "the calls that hang to be cancelled")
        async with ws_client(f"{server.ws}?token={token()}") as (_, me):  # room again
            pass
        await eventually(lambda: ended() == [*slow[:3], me], "the next one's on_disconnect")
        await server.wait_until(lambda: server.metric("ws_micro_on_disconnect_total", outcome="done") == 1, "done")
    lines = [line for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("on_disconnect")]
    assert lines == [f"on_disconnect was not called for client {slow[3]} (closed): 3 calls are running already",
                     f"on_disconnect did not return within 3 seconds, for client {slow[0]} (closed); cancelled"]


# --------------------------------------------------------------------------
# Registry.join and leave, by id
# --------------------------------------------------------------------------


@pytest.mark.process
async def test_e2e_registry_join_and_leave_put_a_client_in_a_room_as_its_own_join_would(tmp_path: Path) -> None:
    with hooked(tmp_path, WS_MICRO_PRESENCE_EVENTS="true", WS_MICRO_MAX_ROOMS_PER_CONNECTION="2",
                WS_MICRO_RECOVERY_WINDOW="60") as server:
        async with ws_client(f"{server.ws}?token={token(rooms=['lobby'])}") as (peer, peer_id), \
                ws_client(f"{server.ws}?token={token()}") as (ws, me):
            assert (await recv_json(peer))["event"] == "presence"
            assert member(server, "PUT", me, "lobby").json() == {"found": True}
            presence = {"room": "lobby", "action": "joined", "client_id": me, "user": "alice"}
            assert await recv_json(ws) == frame("joined", me, {"room": "lobby", "members": 2})
            assert await recv_json(ws) == frame("presence", me, presence)
            assert await recv_json(peer) == frame("presence", peer_id, presence)
            # A member, though its token grants it no join: what is sent to the room reaches it.
            assert server.post("/api/rooms/lobby", {"event": "news", "data": {"data": {}}}).json() == {"delivered": 2}
            assert await recv_json(ws) == frame("news", me)
            assert await recv_json(peer) == frame("news", peer_id)
            # Bad names and a room past max_rooms_per_connection are refused, naming them; nothing changes.
            answer = member(server, "PUT", me, "x" * 200)
            assert answer.status_code == 400 and answer.json()["error"].startswith(f"room {'x' * 100!r}... (200 ")
            assert member(server, "PUT", me, "second").json() == {"found": True}
            assert (await recv_json(ws))["data"]["data"] == {"room": "second", "members": 1}
            await recv_json(ws)  # its presence
            assert member(server, "PUT", me, "third").json() == {
                "error": f"client {me!r} is in 2 rooms already (max_rooms_per_connection); it cannot join room 'third'"}
            assert member(server, "PUT", me, "lobby").status_code == 200  # a room it is in does not count
            assert (await recv_json(ws))["event"] == "joined"
            await recv_json(ws)
            await recv_json(peer)
            # Leave: left, and the others hear it; a room it is not in: found, and nothing happens.
            assert member(server, "DELETE", me, "lobby").json() == {"found": True}
            assert await recv_json(ws) == frame("left", me, {"room": "lobby", "members": 1})
            assert await recv_json(peer) == frame("presence", peer_id, {**presence, "action": "left"})
            assert member(server, "DELETE", me, "lobby").json() == {"found": True}
            await nothing_more(ws, me)
            # No such client, or one away (its session waits for it): not found.
            assert member(server, "PUT", "nobody", "lobby").json() == {"found": False}
            ws2, away, _ = await new_session(f"{server.ws}?token={token()}")
            await drop(ws2, server, away)
            assert member(server, "PUT", away, "lobby").json() == {"found": False}
            assert server.get(f"/api/clients/{away}").json()["rooms"] == []


# --------------------------------------------------------------------------
# In cluster mode
# --------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.redis
async def test_cluster_registry_join_and_leave_reach_a_client_on_another_instance(
        redis_server: RedisServer, tmp_path: Path) -> None:
    env = {"WS_MICRO_REDIS_URL": redis_server.url, "WS_MICRO_HEARTBEAT_INTERVAL": FAST_HEARTBEAT[1],
           "WS_MICRO_INSTANCE_TTL": FAST_HEARTBEAT[3], "WS_MICRO_PRESENCE_EVENTS": "true",
           "WS_MICRO_MAX_ROOMS_PER_CONNECTION": "2", "WS_MICRO_RECOVERY_WINDOW": "60"}
    folders = [tmp_path / "x", tmp_path / "y"]
    with contextlib.ExitStack() as stack:
        for folder in folders:
            folder.mkdir()
        x, y = (stack.enter_context(hooked(folder, **env)) for folder in folders)
        async with ws_client(f"{x.ws}?token={token()}") as (ws, me), \
                ws_client(f"{y.ws}?token={token(rooms=['lobby'])}") as (peer, peer_id):
            assert (await recv_json(peer))["event"] == "presence"
            # Joined through y, where it is not: joined (the members counted across instances), then what y
            # publishes to the room as soon as join() returned; and after leave(), nothing more.
            for _ in range(3):
                assert member(y, "PUT", me, "lobby", publish="news").json() == {"found": True, "delivered": 2}
                assert await recv_json(ws) == frame("joined", me, {"room": "lobby", "members": 2})
                presence = {"room": "lobby", "action": "joined", "client_id": me, "user": "alice"}
                assert await recv_json(ws) == frame("presence", me, presence)
                assert await recv_json(ws) == frame("news", me)
                assert await recv_json(peer) == frame("presence", peer_id, presence)
                assert await recv_json(peer) == frame("news", peer_id)
                assert member(y, "DELETE", me, "lobby", publish="news").json() == {"found": True, "delivered": 1}
                assert await recv_json(ws) == frame("left", me, {"room": "lobby", "members": 1})
                assert await recv_json(peer) == frame("presence", peer_id, {**presence, "action": "left"})
                assert await recv_json(peer) == frame("news", peer_id)
            await nothing_more(ws, me)
            # Past max_rooms_per_connection where it is: refused from y too, naming it.
            for room in ("a", "b"):
                assert member(y, "PUT", me, room).json() == {"found": True}
                assert [(await recv_json(ws))["event"] for _ in range(2)] == ["joined", "presence"]
            assert member(y, "PUT", me, "c").json() == {
                "error": f"client {me!r} is in 2 rooms already (max_rooms_per_connection); it cannot join room 'c'"}
            assert x.get(f"/api/clients/{me}").json()["rooms"] == ["a", "b"]
            # Connected nowhere, or away (its session parked in Redis): not found.
            assert member(y, "PUT", "nobody", "lobby").json() == {"found": False}
            away, away_id, _ = await new_session(f"{x.ws}?token={token()}")
            await drop(away, y, away_id)
            assert member(y, "PUT", away_id, "lobby").json() == {"found": False}
            assert member(x, "PUT", away_id, "lobby").json() == {"found": False}
            await nothing_more(ws, me)


# --------------------------------------------------------------------------
# In process: registering the hooks
# --------------------------------------------------------------------------


def test_the_hooks_take_async_functions_and_the_handlers_of_socketio_names_point_to_them() -> None:
    registry = Registry()

    def not_async(client_id: str, user: str | None, meta: dict[str, Any] | None) -> None:
        pass

    with pytest.raises(TypeError, match="on_connect takes an async function"):
        registry.on_connect(not_async)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'connect' is sent by the server only .*use @registry\.on_connect"):
        registry.on("connect")
    with pytest.raises(ValueError, match=r"use @registry\.on_disconnect"):
        registry.on("disconnect")


async def test_registry_join_refuses_a_bad_room_name_naming_it_and_finds_no_client_without_a_gateway() -> None:
    registry = Registry()
    with pytest.raises(ValueError, match=r"room '': room names have 1 to 128 characters, but got 0"):
        await registry.join("someone", "")
    assert await registry.join("nobody", "lobby") is False
    assert await registry.leave("nobody", "lobby") is False
