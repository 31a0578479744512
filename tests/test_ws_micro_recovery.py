"""Tests of connection recovery (docs/recovery.md), against a real server process.

A client's connection is dropped as a network would drop it (a reset, no close
frame), and it resumes with its token: its id, its rooms and every frame it
missed, once each and in order.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator

import anyio
import httpx2 as httpx
import pytest
from conftest import (
    BACKEND_SECRET,
    FAST_HEARTBEAT,
    JWT_SECRET,
    TIMEOUT,
    EventBackend,
    RedisServer,
    Server,
    closed_with,
    cut,
    drop,
    eventually,
    forward_options,
    frame,
    greeted,
    mint,
    new_session,
    nothing_more,
    push,
    recv_json,
    resume_url,
    rss_mib,
    run_server,
    text,
    until_away,
    ws_client,
)
from starlette.types import Message
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import ws_micro
from ws_micro import Client

pytestmark = [pytest.mark.anyio, pytest.mark.process]


@pytest.fixture(scope="module")
def recovering() -> Iterator[Server]:
    with run_server("--log-level", "warning", "--recovery-window", "60") as running:
        yield running


async def test_recovery_gives_a_dropped_client_its_id_rooms_and_every_missed_frame_once_in_order(
        recovering: Server) -> None:
    server = recovering
    async with ws_client(server.ws) as (peer, peer_id):
        await peer.send(json.dumps(frame("join", peer_id, {"room": "lobby"})))
        await recv_json(peer)
        ws = await connect(server.ws)
        hello = await greeted(ws)
        me, token = hello["client_id"], hello["data"]["data"]["resume_token"]
        assert hello["data"]["data"]["recovered"] is False and token.startswith(me + ".")
        await ws.send(json.dumps(frame("join", me, {"room": "lobby"})))
        assert (await recv_json(ws))["event"] == "joined"  # frame 1
        # Sent while connected but never read: lost in the dead socket's buffers, as on a real network.
        push(server, f"/api/clients/{me}", "in_flight", 0)
        await drop(ws, server, me)
        assert server.get("/healthz").json()["connections"] == 1  # the away client is no open connection
        # While it is away: by id, to its room, to everyone, and relayed by another client.
        push(server, f"/api/clients/{me}", "direct", 1)
        assert server.post("/api/rooms/lobby", {"event": "room", "data": {"data": {"n": 2}}}).json() == {
            "delivered": 2}
        assert (await recv_json(peer))["event"] == "room"
        relayed = json.dumps(frame("relay", peer_id, {"n": 3}, to=me))
        await peer.send(relayed)
        room_relay = json.dumps(frame("chat", peer_id, {"n": 4}, room="lobby"))
        await peer.send(room_relay)
        await nothing_more(peer, peer_id)  # the relays went through before it answered
        assert server.post("/api/broadcast", {"event": "all", "data": {"data": {"n": 5}}}).json() == {"delivered": 2}
        assert (await recv_json(peer))["event"] == "all"

        async with connect(resume_url(server, token, offset=1)) as back:
            again = await greeted(back)
            assert again["client_id"] == me
            info = again["data"]["data"]
            assert (info["recovered"], info["rooms"], info["offset"], info["missed"]) == (True, ["lobby"], 1, 6)
            assert info["resume_token"] not in (token, None)
            received = [await recv_json(back) for _ in range(6)]
            assert [(f["event"], f["data"]["data"]["n"]) for f in received] == [
                ("in_flight", 0), ("direct", 1), ("room", 2), ("relay", 3), ("chat", 4), ("all", 5)]
            assert received[3] == json.loads(relayed) and received[4] == json.loads(room_relay)
            assert server.post("/api/rooms/lobby", {"event": "after", "data": {"data": {"n": 6}}}).json() == {
                "delivered": 2}
            assert (await recv_json(back))["event"] == "after"
            await nothing_more(back, me)
            assert server.get(f"/api/clients/{me}").json()["rooms"] == ["lobby"]
            assert "away_since" not in server.get(f"/api/clients/{me}").json()
    assert server.metric("ws_micro_sessions_total", outcome="resumed") >= 1


async def test_recovery_without_an_offset_replays_what_was_sent_while_away(recovering: Server) -> None:
    server = recovering
    ws, me, token = await new_session(server.ws)
    push(server, f"/api/clients/{me}", "before", 1)
    assert (await recv_json(ws))["event"] == "before"
    await drop(ws, server, me)
    push(server, f"/api/clients/{me}", "away", 2)
    async with connect(resume_url(server, token)) as back:
        assert (await greeted(back))["data"]["data"]["offset"] == 1
        assert (await recv_json(back))["event"] == "away"
        await nothing_more(back, me)


async def test_recovery_takes_over_a_connection_the_server_still_thinks_open(recovering: Server) -> None:
    server = recovering
    old, me, token = await new_session(server.ws)
    push(server, f"/api/clients/{me}", "unread", 1)
    # The client gave up on its connection (its network changed) before the server noticed anything.
    async with connect(resume_url(server, token, offset=0)) as back:
        info = (await greeted(back))["data"]["data"]
        assert info["recovered"] is True
        assert (await recv_json(back))["event"] == "unread"
        push(server, f"/api/clients/{me}", "new", 2)
        assert (await recv_json(back))["event"] == "new"
        await nothing_more(back, me)
        # The old connection was dropped by the server, and gets nothing more.
        with anyio.fail_after(TIMEOUT), contextlib.suppress(ConnectionClosed):
            while (json.loads(await old.recv()))["event"] == "unread":
                pass
            raise AssertionError("the old connection got a frame after its session moved")
        assert server.get("/api/clients").json()["clients"].count(server.get(f"/api/clients/{me}").json()) == 1


async def test_a_resume_token_works_once_and_cannot_be_guessed(recovering: Server) -> None:
    server = recovering
    ws, me, token = await new_session(server.ws)
    await drop(ws, server, me)
    # Guessed: the client id is no secret, the rest is.  A guess gets a new session and spoils nothing.
    for guess in (f"{me}.{'A' * 43}", me, f"{me}.", "x" * 5000, f"{uuid.uuid4()}.{token.split('.')[1]}"):
        async with connect(resume_url(server, guess, offset=0)) as stranger:
            info = await greeted(stranger)
            assert info["client_id"] != me and info["data"]["data"]["recovered"] is False
    push(server, f"/api/clients/{me}", "kept", 1)
    async with connect(resume_url(server, token, offset=0)) as back:
        assert (await greeted(back))["data"]["data"]["recovered"] is True
        assert (await recv_json(back))["event"] == "kept"
        # The same token again, while its session is in use: refused before the handshake, with a reason.
        with pytest.raises(InvalidStatus) as refused:
            await connect(resume_url(server, token, offset=0))
        assert refused.value.response.status_code == 409
        assert json.loads(refused.value.response.body or b"")["error"]["code"] == "resume_token_used"
        assert server.get(f"/ws/py_client?resume_token={token}").status_code == 409  # what the JS client asks
        await nothing_more(back, me)
    assert server.metric("ws_micro_sessions_total", outcome="token_reused") >= 1
    with pytest.raises(InvalidStatus) as bad_offset:
        await connect(resume_url(server, token) + "&resume_offset=-1")
    assert bad_offset.value.response.status_code == 400


async def test_a_session_ends_for_good_when_kicked_or_closed_by_its_client(recovering: Server) -> None:
    server = recovering
    ws, me, token = await new_session(server.ws)
    await drop(ws, server, me)
    assert server.http and httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT).status_code == 202
    assert server.post(f"/api/clients/{me}", {"event": "x", "data": {"data": {}}}).status_code == 404
    async with connect(resume_url(server, token, offset=0)) as stranger:
        info = await greeted(stranger)
        assert info["client_id"] != me and info["data"]["data"]["recovered"] is False

    async with connect(server.ws) as closing:
        hello = await greeted(closing)
        me, token = hello["client_id"], hello["data"]["data"]["resume_token"]
    await server.wait_until(lambda: server.get(f"/api/clients/{me}").status_code == 404, "a closed client to go")
    async with connect(resume_url(server, token, offset=0)) as stranger:
        assert (await greeted(stranger))["data"]["data"]["recovered"] is False


async def test_a_session_expires_after_the_window_and_resuming_then_says_not_recovered() -> None:
    with run_server("--log-level", "warning", "--recovery-window", "0.5") as server:
        ws, me, token = await new_session(server.ws)
        await ws.send(json.dumps(frame("join", me, {"room": "gone"})))
        await recv_json(ws)
        cut(ws)
        await server.wait_until(lambda: server.metric("ws_micro_sessions_total", outcome="expired") == 1,
                                "the session to expire")
        assert server.get(f"/api/clients/{me}").status_code == 404
        assert server.get("/api/rooms").json() == {"count": 0, "rooms": []}
        assert server.metric("ws_micro_sessions_away") == 0
        async with connect(resume_url(server, token, offset=1)) as back:
            info = await greeted(back)
            assert info["client_id"] != me and info["data"]["data"]["recovered"] is False


async def test_waiting_sessions_share_one_memory_budget_and_the_oldest_make_room() -> None:
    # Frames relayed to each client by id are its own: 20 sessions kept 10 of 8 KB each would pin 1.6 MB.
    # recovery_max_memory bounds them all.
    budget, padding = 400_000, "x" * 8000
    with run_server("--log-level", "warning", "--recovery-window", "60",
                    "--recovery-max-memory", str(budget)) as server:
        sessions = []
        for _ in range(20):  # dropped in this order: the first waits longest
            ws, me, token = await new_session(server.ws)
            await drop(ws, server, me)
            sessions.append((me, token))
        rss = rss_mib(server.process)
        async with ws_client(server.ws) as (sender, sender_id):
            for n in range(10):  # 20 x 10 x 8 KB = 1.6 MB if each kept them all
                for me, _ in sessions:
                    await sender.send(text("news", sender_id, {"n": n, "pad": padding}, to=me))
            await sender.send(text("ping", sender_id))
            while (answer := await recv_json(sender))["event"] != "pong":
                assert answer["data"]["data"]["code"] == "unknown_client"  # evicted meanwhile
        kept = server.metric("ws_micro_sessions_kept_bytes")
        evicted = server.metric("ws_micro_sessions_total", outcome="evicted")
        assert budget - 10 * 8200 < kept <= budget and evicted >= 10, (kept, evicted)
        assert server.metric("ws_micro_sessions_away") == 20 - evicted
        assert rss_mib(server.process) - rss < 20
        # The newest came through whole; the oldest made room, and are told so when they come back.
        newest, oldest = sessions[-1], sessions[0]
        async with connect(resume_url(server, newest[1], offset=0)) as back:
            info = await greeted(back)
            assert (info["client_id"], info["data"]["data"]["missed"]) == (newest[0], 10)
            assert [(await recv_json(back))["data"]["data"]["n"] for _ in range(10)] == list(range(10))
        async with connect(resume_url(server, oldest[1], offset=0)) as back:
            info = await greeted(back)
            assert info["client_id"] != oldest[0] and info["data"]["data"]["recovered"] is False


async def test_a_fan_out_kept_for_many_waiting_sessions_is_counted_once_and_replayed_with_each_ones_id() -> None:
    # A broadcast, a room publish and a room relay reach 20 waiting sessions: each frame's body is held once
    # for all of them (a server-made frame differs only in each receiver's client_id), and counted once
    # against recovery_max_memory.  Each session, resumed, gets the very bytes it would have got connected.
    budget, padding = 400_000, "x" * 8000
    with run_server("--log-level", "warning", "--recovery-window", "60",
                    "--recovery-max-memory", str(budget)) as server:
        async with ws_client(server.ws) as (peer, peer_id), ws_client(server.ws) as (sender, sender_id):
            for ws, client_id in ((peer, peer_id), (sender, sender_id)):
                await ws.send(json.dumps(frame("join", client_id, {"room": "lobby"})))
                assert (await recv_json(ws))["event"] == "joined"
            sessions = []
            for _ in range(20):
                ws, me, token = await new_session(server.ws)
                await ws.send(json.dumps(frame("join", me, {"room": "lobby"})))
                assert (await recv_json(ws))["event"] == "joined"  # frame 1
                await drop(ws, server, me)
                sessions.append((me, token))
            assert server.metric("ws_micro_sessions_kept_bytes") < 20 * 1000  # a joined frame each
            for n in range(4):  # 6 frames of 8 KB each session keeps: 960 KB if each kept its own copy
                data = {"n": n, "pad": padding}
                if n < 2:
                    assert server.post("/api/broadcast", {"event": "news", "data": {"data": data}}).json() == {
                        "delivered": 22}
                    assert server.post("/api/rooms/lobby", {"event": "room", "data": {"data": data}}).json() == {
                        "delivered": 22}
                else:
                    await sender.send(json.dumps(frame("chat", sender_id, data, room="lobby")))
            live = [await peer.recv(decode=True) for _ in range(6)]  # what a connected receiver got, in order
            assert [json.loads(text)["event"] for text in live] == ["news", "room", "news", "room", "chat", "chat"]
            await nothing_more(peer, peer_id)  # the relays went through
            kept = server.metric("ws_micro_sessions_kept_bytes")
            # 6 bodies of 8 KB once, 120 slots, and 20 joined frames: far below 20 copies of each.
            assert 6 * 8000 < kept < 6 * 8300 + 20 * 250, kept
            assert server.metric("ws_micro_sessions_total", outcome="evicted") == 0
            assert server.metric("ws_micro_sessions_away") == 20
            for me, token in sessions:
                async with connect(resume_url(server, token, offset=1)) as back:
                    info = await greeted(back)
                    assert (info["client_id"], info["data"]["data"]["missed"]) == (me, 6)
                    replayed = [await back.recv(decode=True) for _ in range(6)]
                    # Byte for byte the live frames, with this client's id where the peer's was.
                    assert replayed == [text.replace(peer_id, me) if json.loads(text)["event"] != "chat" else text
                                        for text in live]
                    assert replayed[0] == ('{"event":"news","client_id":"' + me + '","data":{"data":{"n":0,"pad":"'
                                           + padding + '"}}}')
                    await nothing_more(back, me)
            assert server.metric("ws_micro_sessions_kept_bytes") == 0


@pytest.mark.process  # the backend runs in a thread, on a port
async def test_a_session_evicted_before_its_read_loop_saw_the_drop_is_told_to_the_backend_once() -> None:
    # Driven through ASGI, to hold the server's disconnect back: both writes fail, both sessions start
    # waiting, and the first is evicted (recovery_max_sessions 1) while its read loop still waits.
    with EventBackend() as backend:
        app = ws_micro.create_app(recovery_window=60, recovery_max_sessions=1, static_dir="",
                                  forward_url=backend.url, backend_secret=BACKEND_SECRET)
        peers: list[tuple[anyio.Event, anyio.Event, list[str]]] = []

        async def client(dead: anyio.Event, gone: anyio.Event, frames: list[str]) -> None:
            messages: list[Message] = [{"type": "websocket.connect"}]

            async def receive() -> Message:
                if messages:
                    return messages.pop()
                await gone.wait()  # the server hears of the drop only now
                return {"type": "websocket.disconnect", "code": 1006}

            async def send(message: Message) -> None:
                if message["type"] == "websocket.send":
                    if dead.is_set():
                        raise OSError("connection reset by peer")
                    frames.append(message["text"])

            scope = {"type": "websocket", "path": "/ws/py_client", "root_path": "", "query_string": b"",
                     "headers": [(b"host", b"gateway")], "client": ("127.0.0.1", 1), "server": ("gateway", 80),
                     "scheme": "ws", "subprotocols": [], "asgi": {"version": "3.0"}}
            await app(scope, receive, send)

        async with app.router.lifespan_context(app), anyio.create_task_group() as tasks:
            for _ in range(2):
                peers.append((anyio.Event(), anyio.Event(), []))
                tasks.start_soon(client, *peers[-1])
            await eventually(lambda: all(frames for _, _, frames in peers), "both connect frames")
            for dead, _, _ in peers:
                dead.set()
            assert await app.state.registry.broadcast("news") == 2  # kept, for both
            for _, gone, _ in peers:
                gone.set()
        # The lifespan's end ended the session still waiting (no client can come back to a server that stopped),
        # and sent every notice still queued: each session's end is told once.
        evicted, waiting = (json.loads(frames[0])["client_id"] for _, _, frames in peers)
        assert backend.notices(evicted) == [("connect", None), ("disconnect", "evicted")]
        assert backend.notices(waiting) == [("connect", None), ("disconnect", "shutdown")]


async def test_one_addresss_drops_push_out_its_own_waiting_sessions_not_everyones() -> None:
    with run_server("--log-level", "warning", "--recovery-window", "60",
                    "--recovery-max-sessions-per-user", "3") as server:
        bystander = await new_session(server.ws, local_addr=("127.0.0.2", 0))
        await drop(bystander[0], server, bystander[1])
        flood = []
        for _ in range(6):  # one address drops twice its share
            ws, me, token = await new_session(server.ws)
            await drop(ws, server, me)
            flood.append((me, token))
        assert server.metric("ws_micro_sessions_away") == 4  # the bystander's and the flood's last 3
        assert server.metric("ws_micro_sessions_total", outcome="evicted") == 3
        expected = [((bystander[1], bystander[2]), True), *((session, False) for session in flood[:3]),
                    *((session, True) for session in flood[3:])]
        for (me, token), kept in expected:
            async with connect(resume_url(server, token)) as back:
                info = await greeted(back)
                assert (info["client_id"] == me, info["data"]["data"]["recovered"]) == (kept, kept), me


async def test_a_session_whose_missed_frames_pass_the_bounds_is_lost_and_says_so() -> None:
    with run_server("--log-level", "warning", "--recovery-window", "60", "--recovery-max-frames", "3") as server:
        ws, me, token = await new_session(server.ws)
        for n in range(5):  # connected, the oldest make room
            push(server, f"/api/clients/{me}", "seen", n)
            assert (await recv_json(ws))["data"]["data"]["n"] == n
        await drop(ws, server, me)
        for n in range(3):
            push(server, f"/api/clients/{me}", "kept", n)
        assert server.metric("ws_micro_sessions_kept_bytes") > 0
        # The fourth would push out a frame the client never saw: the session ends, and the push says so.
        assert server.post(f"/api/clients/{me}", {"event": "x", "data": {"data": {}}}).status_code == 404
        assert server.metric("ws_micro_sessions_total", outcome="overflowed") == 1
        assert server.metric("ws_micro_sessions_kept_bytes") == 0
        async with connect(resume_url(server, token, offset=5)) as back:
            info = await greeted(back)
            assert info["client_id"] != me and info["data"]["data"]["recovered"] is False
        # An offset older than what was kept while connected cannot be recovered either.
        ws, me, token = await new_session(server.ws)
        for n in range(5):
            push(server, f"/api/clients/{me}", "seen", n)
        await drop(ws, server, me)
        async with connect(resume_url(server, token, offset=1)) as back:
            assert (await greeted(back))["data"]["data"]["recovered"] is False
        assert server.metric("ws_micro_sessions_total", outcome="not_recovered") == 2  # each: its token or its frames


async def test_waiting_sessions_are_bounded_and_the_oldest_make_room() -> None:
    with run_server("--log-level", "warning", "--recovery-window", "60", "--recovery-max-sessions", "2") as server:
        sessions = []
        for _ in range(3):
            ws = await connect(server.ws)
            hello = await greeted(ws)
            sessions.append((hello["client_id"], hello["data"]["data"]["resume_token"]))
            cut(ws)
            await until_away(server, hello["client_id"])
        assert server.metric("ws_micro_sessions_away") == 2
        assert server.metric("ws_micro_sessions_total", outcome="evicted") == 1
        assert server.get(f"/api/clients/{sessions[0][0]}").status_code == 404
        for (_, token), recovered in zip(sessions, (False, True, True), strict=True):
            async with connect(resume_url(server, token, offset=0)) as back:
                assert (await greeted(back))["data"]["data"]["recovered"] is recovered


async def test_the_python_client_resumes_by_itself_and_says_whether_it_recovered(recovering: Server) -> None:
    server = recovering
    async with Client(server.ws) as client:
        await client.send("join", {"room": "py"})
        assert (await client.recv()).event == "joined"
        me = client.client_id
        assert client.recovered is False
        cut(client._connection)
        await until_away(server, me)
        push(server, "/api/rooms/py", "missed", 1)
        event = await client.recv()
        assert (event.event, event.data.data, client.client_id, client.recovered) == ("missed", {"n": 1}, me, True)
        await client.send("ping", {"n": 2})
        assert (await client.recv()).event == "pong"
        # Kicked while away: the next resume gets a new session, and the app hears of it.
        cut(client._connection)
        await until_away(server, me)
        assert httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT).status_code == 202
        with pytest.raises(ws_micro.SessionLost):
            await client.recv()
        assert client.client_id != me and client.recovered is False
        await client.send("ping", {"n": 3})
        assert (await client.recv()).event == "pong"


async def test_a_python_clients_request_goes_on_across_a_resumed_connection(recovering: Server) -> None:
    server = recovering
    async with Client(server.ws) as client:
        me = client.client_id
        cut(client._connection)  # the client has not noticed yet: its request finds out, and resumes first
        await until_away(server, me)
        push(server, f"/api/clients/{me}", "missed", 1)
        with anyio.fail_after(TIMEOUT):
            pong = await client.request("ping", {"n": 2})
            assert (pong.event, pong.id, pong.data.data, client.client_id, client.recovered) == (
                "pong", 1, {"n": 2}, me, True)
            missed = await client.recv()  # replayed before the answer, kept for recv()
            assert (missed.event, missed.data.data) == ("missed", {"n": 1})
        # A session that cannot be resumed (kicked while away): the request fails with SessionLost.
        cut(client._connection)
        await until_away(server, me)
        assert httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT).status_code == 202
        with anyio.fail_after(TIMEOUT), pytest.raises(ws_micro.SessionLost):
            await client.request("ping")
        with anyio.fail_after(TIMEOUT):
            assert (await client.request("ping")).id == 3  # connected again, as a new client


async def test_recovery_off_changes_nothing_on_the_wire(server: Server) -> None:
    async with connect(server.ws + "?resume_token=whatever.secret&resume_offset=3") as ws:
        hello = await greeted(ws)
        assert hello["data"]["data"] == {"message": "connection request granted"}


async def test_the_backend_hears_a_session_begin_and_end_once_however_often_its_connection_drops() -> None:
    with EventBackend() as backend, run_server(*forward_options(backend.url, "--recovery-window", "2"),
                                               "--log-level", "warning") as server:
        token = ""
        for attempt in range(3):
            # Back with the offset it got to: with an earlier one, a pong replayed from before would pass
            # for the one nothing_more() waits for, and the connection could drop before the event is read.
            ws = await connect(resume_url(server, token, offset=attempt) if token else server.ws)
            hello = await greeted(ws)
            me, token = hello["client_id"], hello["data"]["data"]["resume_token"]
            assert hello["data"]["data"]["recovered"] is (attempt > 0)
            assert hello["data"]["data"].get("missed", 0) == 0
            await ws.send(text("chat", me, {"mode": "none", "n": attempt}))
            await nothing_more(ws, me)  # the event was forwarded before the ping was read
            await drop(ws, server, me)
        assert backend.notices(me) == [("connect", None)]
        await eventually(lambda: len(backend.notices(me)) == 2, "the session to expire")
        assert backend.notices(me) == [("connect", None), ("disconnect", "expired")]
        assert [body["data"]["n"] for body in backend.received if body["type"] == "event"] == [0, 1, 2]


@pytest.mark.redis
@pytest.mark.parametrize("instances", [1, 2])
async def test_a_resume_whose_answer_is_lost_can_be_made_again_with_the_same_token(
        redis_server: RedisServer, instances: int) -> None:
    options = ("--redis-url", redis_server.url, *FAST_HEARTBEAT) if instances == 2 else ()
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(run_server("--log-level", "warning", "--recovery-window", "60", *options))
                   for _ in range(instances)]
        first, last = servers[0], servers[-1]
        ws, me, token = await new_session(first.ws)
        await drop(ws, last, me)
        push(last, f"/api/clients/{me}", "missed", 1)
        # The gateway takes the token and answers with the next one; the network drops that answer.
        lost = await connect(resume_url(last, token, offset=0))
        await drop(lost, last, me)
        async with connect(resume_url(last, token, offset=0)) as back:
            info = (await greeted(back))["data"]["data"]
            assert (info["recovered"], info["missed"]) == (True, 1)
            assert (await recv_json(back))["event"] == "missed"
            # Used while its session is connected, it is refused: one connection holds a session.
            with pytest.raises(InvalidStatus) as refused:
                await connect(resume_url(first, token, offset=0))
            assert refused.value.response.status_code == 409
            await nothing_more(back, me)


async def test_a_resume_keeps_only_the_rooms_its_new_credentials_allow() -> None:
    with run_server("--log-level", "warning", "--recovery-window", "60", "--jwt-secret", JWT_SECRET) as server:
        granted = mint({"rooms": ["secret"]})
        ws = await connect(server.ws, additional_headers={"Authorization": f"Bearer {granted}"})
        hello = await greeted(ws)
        me, token = hello["client_id"], hello["data"]["data"]["resume_token"]
        assert hello["data"]["data"]["rooms"] == ["secret"]
        await drop(ws, server, me)
        revoked = mint({"rooms": ["public"]})
        async with connect(resume_url(server, token, offset=0),
                           additional_headers={"Authorization": f"Bearer {revoked}"}) as back:
            info = (await greeted(back))["data"]["data"]
            assert (info["recovered"], info["rooms"]) == (True, ["public"])
            await server.wait_until(lambda: server.get(f"/api/clients/{me}").json()["rooms"] == ["public"],
                                    "the revoked room to be left")
            assert server.post("/api/rooms/secret", {"event": "x", "data": {"data": {}}}).json() == {"delivered": 0}
        # Someone else's credentials do not take the session.
        ws, me, token = await new_session(server.ws, additional_headers={"Authorization": f"Bearer {granted}"})
        await drop(ws, server, me)
        mallory = mint({"sub": "mallory"})
        async with connect(resume_url(server, token, offset=0),
                           additional_headers={"Authorization": f"Bearer {mallory}"}) as other:
            info = await greeted(other)
            assert info["client_id"] != me and info["data"]["data"]["recovered"] is False
        assert "away_since" in server.get(f"/api/clients/{me}").json()


async def test_a_frame_over_the_size_limit_ends_the_session_too(recovering: Server) -> None:
    ws, me, token = await new_session(recovering.ws, max_size=None)
    await ws.send("x" * (70 * 1024))
    assert (await closed_with(ws))[0] == 1009
    await recovering.wait_until(lambda: recovering.get(f"/api/clients/{me}").status_code == 404, "the session to end")
    async with connect(resume_url(recovering, token, offset=0)) as back:
        assert (await greeted(back))["data"]["data"]["recovered"] is False
