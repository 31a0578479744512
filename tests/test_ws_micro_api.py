"""Tests of ws_micro's sidecar HTTP API (docs/api.md): names in the path, listings a page at a time, and
events only the gateway sends.

Most start `python ws_micro.py` (or uvicorn with an app of the test's) as a real process and talk to it
with real `websockets` clients and raw sockets: thousands of light WebSocket clients on raw sockets, for
the listings under load.  The in-process ones, under Starlette's TestClient, check every bound of a
listing request.  Shared fixtures and helpers are in conftest.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import random
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from conftest import (
    JWT_SECRET,
    ROOT,
    TIMEOUT,
    Server,
    client_frame,
    closed_with,
    connected,
    frame,
    gateway,
    join,
    mint,
    recv_json,
    run_server,
    text,
    ws_client,
)

import ws_micro

pytestmark = pytest.mark.anyio


# --------------------------------------------------------------------------
# Light clients: WebSockets on raw sockets, thousands at once
# --------------------------------------------------------------------------

HANDSHAKE = (b"GET /ws/py_client HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def server_frame(reader: BufferedByteReceiveStream) -> dict[str, Any]:
    """The next text frame the server sends (unmasked, unfragmented), as JSON."""
    head = await reader.receive_exactly(2)
    size = head[1] & 0x7F
    if size >= 126:
        size = int.from_bytes(await reader.receive_exactly(2 if size == 126 else 8), "big")
    return dict(json.loads(await reader.receive_exactly(size)))


async def light_client(port: int, rooms: list[str], streams: list[SocketStream]) -> str:
    """A WebSocket client on a raw socket (kept in ``streams``), joined to ``rooms``: its id."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    streams.append(stream)
    reader = BufferedByteReceiveStream(stream)
    await stream.send(HANDSHAKE)
    await reader.receive_until(b"\r\n\r\n", 4096)
    client_id = str((await server_frame(reader))["client_id"])
    joins = [client_frame(1, text("join", client_id, {"room": room}).encode()) for room in rooms]
    await stream.send(b"".join([*joins, client_frame(1, text("ping", client_id).encode())]))
    while (await server_frame(reader))["event"] != "pong":  # the joined replies, then the pong: all joined
        pass
    return client_id


@contextlib.asynccontextmanager
async def crowd(server: Server, rooms_of: list[list[str]]) -> AsyncIterator[list[str]]:
    """A light client for each list of rooms, joined to them, while the block runs: their ids, in that order."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = len(rooms_of) + 1000  # a socket each, and this process's own
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                   hard))
    streams: list[SocketStream] = []
    ids = [""] * len(rooms_of)

    async def open_one(n: int) -> None:
        ids[n] = await light_client(server.port, rooms_of[n], streams)

    try:
        with anyio.fail_after(20 * TIMEOUT):
            for start in range(0, len(rooms_of), 200):  # 200 handshakes at a time
                async with anyio.create_task_group() as tasks:
                    for n in range(start, min(start + 200, len(rooms_of))):
                        tasks.start_soon(open_one, n)
        yield ids
    finally:
        for stream in streams:
            await stream.aclose()


def walk(server: Server | list[Server], path: str, name: str, limit: int) -> tuple[list[Any], list[int]]:
    """Every entry of a listing, page after page (asking the servers in turn), and each answer's count."""
    servers = server if isinstance(server, list) else [server]
    entries: list[Any] = []
    counts: list[int] = []
    cursor: str | None = None
    for page in range(10_000):
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        answer = servers[page % len(servers)].get(path, params=params)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert len(body[name]) <= limit
        entries += body[name]
        counts.append(body["count"])
        cursor = body.get("next")
        if cursor is None:
            return entries, counts
    raise AssertionError(f"{path} did not end")


# --------------------------------------------------------------------------
# Names in the path: a "/" in a name is sent as %2F
# --------------------------------------------------------------------------


@pytest.mark.process
async def test_a_user_or_room_with_a_slash_in_its_name_is_reached_percent_encoded(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    with run_server("--jwt-secret", JWT_SECRET, "--default-join", "*", log=log) as server:
        token = mint({"sub": "org/alice"})
        async with ws_client(server.ws, additional_headers={"Authorization": f"Bearer {token}"}) as (ws, me):
            assert await join(ws, me, "a/b") == 1
            assert await join(ws, me, "café") == 1
            listed = server.get("/api/users/org%2Falice").json()
            assert (listed["user"], listed["count"], [entry["client_id"] for entry in listed["clients"]]) == \
                ("org/alice", 1, [me])
            assert server.get("/api/rooms/a%2Fb").json() == {"room": "a/b", "count": 1,
                                                            "members": [{"client_id": me, "user": "org/alice"}]}
            assert server.get("/api/rooms/caf%C3%A9").json()["count"] == 1
            assert server.get(f"/api/clients/{me}").json()["user"] == "org/alice"
            push = {"event": "notice", "data": {"data": {"n": 1}}}
            assert server.post("/api/rooms/a%2Fb", push).json() == {"delivered": 1}
            assert await recv_json(ws) == frame("notice", me, {"n": 1})
            assert server.post("/api/users/org%2Falice", push).json() == {"delivered": 1}
            assert await recv_json(ws) == frame("notice", me, {"n": 1})
            # A "/" sent as it is starts another segment: no route has it, and nothing is done.
            for method, path in (("GET", "/api/rooms/a/b"), ("POST", "/api/rooms/a/b"), ("GET", "/api/users/org/alice"),
                                 ("DELETE", "/api/users/org/alice"), ("DELETE", f"/api/clients/{me}/x"),
                                 ("GET", "/api/rooms/"), ("DELETE", "/api/users/")):
                answer = httpx.request(method, server.http + path, json=push if method == "POST" else None,
                                       timeout=TIMEOUT)
                assert (answer.status_code, answer.json()["error"]["code"]) == (404, "not_found"), (method, path)
            answer = httpx.put(server.http + "/api/users/org%2Falice", timeout=TIMEOUT)
            assert (answer.status_code, answer.json()["error"]["code"]) == (405, "method_not_allowed")
            # Names no room or user can have: 400, naming what is wrong.
            for path, message in (("/api/rooms/%FF", "the room in the path is not UTF-8 once percent-decoded: "
                                                     "b'\\xff' at byte 0"),
                                  ("/api/users/org%2F%C3", "the user in the path is not UTF-8 once percent-decoded: "
                                                           "b'\\xc3' at byte 4"),
                                  ("/api/rooms/" + "r" * 129, "room names have 1 to 128 characters, but got 129"),
                                  ("/api/users/" + "%2F" * 257, "users have 1 to 256 characters, but got 257")):
                answer = server.get(path)
                assert (answer.status_code, answer.json()["error"]) == (
                    400, {"code": "invalid_parameter", "message": message}), path
            answer = server.get("/api/clients/" + "x" * 20_000)
            assert (answer.status_code, answer.json()["error"]["code"]) == (404, "unknown_client")
            assert len(answer.text) < 300  # the message shows the first 100 characters
            # The documented logout of a user whose token's sub is "org/alice".
            answer = httpx.delete(server.http + "/api/users/org%2Falice", timeout=TIMEOUT)
            assert (answer.status_code, answer.json()) == (202, {"disconnected": 1})
            assert await closed_with(ws) == (1000, "disconnected by the server")
        await server.wait_until(lambda: server.get("/api/users/org%2Falice").json()["count"] == 0, "the logout")
        assert server.get("/api/rooms").json() == {"count": 0, "rooms": []}
    assert "Traceback" not in log.read_text()


# --------------------------------------------------------------------------
# Events only the gateway sends: from the API and from Python
# --------------------------------------------------------------------------

SERVER_EVENTS = ("connect", "error", "pong", "joined", "left", "presence")


@pytest.mark.process
async def test_api_pushes_of_events_only_the_gateway_sends_are_refused_and_counted(server: Server) -> None:
    async with ws_client(server.ws) as (ws, me):
        await join(ws, me, "lobby")
        before = server.metric("ws_micro_server_events_refused_total", source="api")
        paths = (f"/api/clients/{me}", "/api/rooms/lobby", "/api/users/nobody", "/api/broadcast")
        for name in SERVER_EVENTS:
            for path in paths:
                answer = server.post(path, {"event": name, "data": {"data": {"client_id": "forged"}}})
                assert (answer.status_code, answer.json()["error"]) == (422, {
                    "code": "invalid_event",
                    "message": f"{name!r} is an event only the gateway sends; push another name"}), (name, path)
        # None reached the client: the next frame it gets is the pong of its ping.
        await ws.send(text("ping", me, {"n": 1}))
        assert await recv_json(ws) == frame("pong", me, {"n": 1})
        assert server.metric("ws_micro_server_events_refused_total", source="api") == before + 24
        assert server.post(f"/api/clients/{me}", {"event": "connected", "data": {"data": {}}}).status_code == 202
        assert (await recv_json(ws))["event"] == "connected"  # any other name goes


FORGING_APP = '''
from ws_micro import Registry, create_app

registry = Registry()


@registry.on("forge")
async def forge(client_id, event):
    """Ask the registry's every send method for an event only the gateway sends; tell the client what it said."""
    name = event.data.data["event"]
    for send in (lambda: registry.send_to_client(client_id, name, {"client_id": "forged"}),
                 lambda: registry.publish("lobby", name), lambda: registry.broadcast(name),
                 lambda: registry.send_to_user("alice", name)):
        try:
            await send()
        except ValueError as exc:
            await registry.send_to_client(client_id, "refused", {"error": str(exc)})


app = create_app(registry=registry)
'''


@pytest.mark.process
async def test_the_registry_refuses_to_send_events_only_the_gateway_sends_with_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "forging_app.py").write_text(FORGING_APP)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    with run_server("--host", "127.0.0.1", "--log-level", "warning", uvicorn_app="forging_app:app", env=env) as server:
        assert server.metric("ws_micro_server_events_refused_total", source="python") == 0
        async with ws_client(server.ws) as (ws, me):
            await join(ws, me, "lobby")
            for name in SERVER_EVENTS:
                await ws.send(text("forge", me, {"event": name}))
                for _ in range(4):  # one refusal for each send method, and nothing else
                    assert await recv_json(ws) == frame(
                        "refused", me, {"error": f"{name!r} is an event only the gateway sends; send another name"})
            # The gateway's own frames still go out: pong, joined, left, error.
            await ws.send(text("ping", me))
            assert (await recv_json(ws))["event"] == "pong"
            await ws.send(text("leave", me, {"room": "lobby"}))
            assert (await recv_json(ws))["event"] == "left"
            await ws.send(text("nothing", me))
            assert (await recv_json(ws))["data"]["data"]["code"] == "unknown_event"
        assert server.metric("ws_micro_server_events_refused_total", source="python") == 24


# --------------------------------------------------------------------------
# Listings, a page at a time
# --------------------------------------------------------------------------

LISTER = '''
import sys, time
import httpx2 as httpx

base, seconds = sys.argv[1], float(sys.argv[2])
deadline, pages = time.monotonic() + seconds, 0
with httpx.Client(base_url=base, timeout=30) as client:
    while time.monotonic() < deadline:
        for path in ("/api/clients", "/api/rooms", "/api/rooms/room-000"):
            cursor = None
            while time.monotonic() < deadline:
                answer = client.get(path, params={"limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
                pages += 1
                if pages == 1:
                    print("listing", flush=True)
                cursor = answer.get("next")
                if cursor is None:
                    break
print(pages, flush=True)
'''


async def round_trips(ws: Any, me: str, count: int) -> list[float]:
    """The time, in milliseconds, of each of ``count`` pings answered by pongs, one after the other."""
    times = []
    for n in range(count):
        started = time.perf_counter()
        await ws.send(text("ping", me, {"n": n}))
        assert await recv_json(ws) == frame("pong", me, {"n": n})
        times.append((time.perf_counter() - started) * 1000)
    return times


def percentile(values: list[float], share: float) -> float:
    return sorted(values)[min(len(values) - 1, math.ceil(share * len(values)) - 1)]


@contextlib.contextmanager
def listing(server: Server, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """Another process walking the listings page after page, for at most ``seconds``, while the block runs."""
    lister = subprocess.Popen([sys.executable, "-c", LISTER, server.http, str(seconds)], text=True,
                              stdout=subprocess.PIPE)
    try:
        assert lister.stdout is not None and lister.stdout.readline() == "listing\n"  # it has asked once
        yield lister
    finally:
        lister.kill()
        lister.communicate()


@pytest.mark.process
async def test_listings_of_thousands_come_a_page_at_a_time_and_hold_no_one_up(tmp_path: Path) -> None:
    clients, rooms, each = 3000, 600, 20  # about 100 members a room, and 1.4 MB of clients listed in all
    chosen = random.Random(22)
    rooms_of = [[f"room-{n:03d}" for n in chosen.sample(range(rooms), each)] for _ in range(clients)]
    log = tmp_path / "gateway.log"
    with run_server("--log-level", "warning", log=log) as server:
        async with crowd(server, rooms_of) as ids, ws_client(server.ws) as (bystander, me):
            # A bystander's pings, alone and while another process walks the listings as fast as it can.
            alone = await round_trips(bystander, me, 300)
            with listing(server, 60):
                busy = await round_trips(bystander, me, 300)
            figures = {name: (round(percentile(times, 0.5), 2), round(percentile(times, 0.99), 2),
                              round(max(times), 2)) for name, times in (("alone", alone), ("listing", busy))}
            print("ping round trips in ms (median, 99th percentile, most):", figures)
            # Before pages, one listing of them all held the loop for 50 ms and more at a time.
            assert percentile(busy, 0.99) < max(4 * percentile(alone, 0.99), 20), figures

            everyone = sorted([*ids, me])
            # The page size: a default a browser shows, at most api_max_page_size, and a count without them.
            assert len(server.get("/api/clients").json()["clients"]) == 100
            assert len(server.get("/api/clients", params={"limit": 1000}).json()["clients"]) == 1000
            assert server.get("/api/clients", params={"limit": 0}).json() == {"count": clients + 1, "clients": []}
            answer = server.get("/api/clients", params={"limit": 1001})
            assert (answer.status_code, answer.json()["error"]) == (400, {
                "code": "invalid_parameter", "message": "limit must be a whole number from 0 to 1000, but got '1001'"})
            # Walking each listing finds every entry once, in order, with the count of them all on every page.
            entries, counts = walk(server, "/api/clients", "clients", 257)
            assert [entry["client_id"] for entry in entries] == everyone
            assert set(counts) == {clients + 1}
            entries, counts = walk(server, "/api/rooms", "rooms", 37)
            expected = {f"room-{n:03d}": sum(f"room-{n:03d}" in mine for mine in rooms_of) for n in range(rooms)}
            assert {entry["room"]: entry["members"] for entry in entries} == expected
            assert [entry["room"] for entry in entries] == sorted(expected) and set(counts) == {rooms}
            entries, counts = walk(server, "/api/rooms/room-000", "members", 7)
            members = sorted(client_id for client_id, mine in zip(ids, rooms_of, strict=True) if "room-000" in mine)
            assert [entry["client_id"] for entry in entries] == members and set(counts) == {len(members)}
    assert "Traceback" not in log.read_text()


@pytest.mark.process
async def test_a_paging_client_sees_everyone_present_throughout_once_while_others_come_and_go() -> None:
    with run_server("--log-level", "warning") as server:
        async with crowd(server, [["stay"]] * 300) as stayers, contextlib.AsyncExitStack() as stack:
            seen: list[str] = []
            cursor = None
            comers: list[Any] = []
            for page in range(1000):
                # Between pages a client comes, and every other time the oldest that came goes.
                comers.append(await stack.enter_async_context(ws_client(server.ws)))
                if page % 2:
                    await comers.pop(0)[0].close()
                body = server.get("/api/clients", params={"limit": 9, **({"cursor": cursor} if cursor else {})})
                seen += [entry["client_id"] for entry in body.json()["clients"]]
                cursor = body.json().get("next")
                if cursor is None:
                    break
            assert len(seen) == len(set(seen)) and seen == sorted(seen)  # none twice, in order
            assert set(stayers) <= set(seen)  # everyone present throughout, once


# In process: every bound of a listing request.


def test_a_page_ends_early_past_api_max_page_bytes_and_the_walk_goes_on() -> None:
    with gateway(api_max_page_bytes=1000) as client, contextlib.ExitStack() as stack:
        ids = []
        for n in range(12):
            ws, me = stack.enter_context(connected(client))
            for room in (f"a-long-room-name-{n}", f"another-long-room-name-{n}"):
                ws.send_json(frame("join", me, {"room": room}))
                ws.receive_json()
            ids.append(me)
        pages = []
        cursor = None
        while True:
            body = client.get("/api/clients", params={"limit": 100, **({"cursor": cursor} if cursor else {})}).json()
            pages.append(body["clients"])
            cursor = body.get("next")
            if cursor is None:
                break
        # Each entry is about 200 bytes of JSON: a page takes entries until they reach 1000, at its 6th.
        assert [len(page) for page in pages] == [6, 6]
        assert [entry["client_id"] for page in pages for entry in page] == sorted(ids)


@pytest.mark.parametrize(("query", "message"), [
    ("limit=-1", "limit must be a whole number from 0 to 1000, but got '-1'"),
    ("limit=1e3", "limit must be a whole number from 0 to 1000, but got '1e3'"),
    ("limit=", "limit must be a whole number from 0 to 1000, but got ''"),
    ("limit=%EF%BC%91", "limit must be a whole number from 0 to 1000, but got '\uff11'"),  # a full-width 1
    ("limit=" + "9" * 5000, "limit must be a whole number from 0 to 1000, but got '" + "9" * 40 + "'... "
                            "(5000 characters)"),
    ("limit=1&limit=2", "limit is given twice"),
    ("cursor=a&cursor=b", "cursor is given twice"),
    ("cursor=not%20base64", "cursor must be a page's next, as it was given, but got 'not base64'"),
    ("cursor=YQ%3D%3D", "cursor must be a page's next, as it was given, but got 'YQ=='"),  # padded
    ("cursor=_w", "cursor must be a page's next, as it was given, but got '_w'"),  # b"\xff": not UTF-8
    ("cursor=" + "QUFB" * 44, "cursor must be a page's next, as it was given, but got '" + "QUFB" * 10 + "'... "
                              "(176 characters)"),  # 132 characters once decoded: longer than any key
    ("cursor=" + "A" * 10_000, "cursor must be a page's next, as it was given, but got '" + "A" * 40 + "'... "
                               "(10000 characters)"),
    ("&".join(f"p{n}=1" for n in range(17)), "at most 16 query parameters, but got 17"),
    ("&" * 5000, "at most 16 query parameters, but got 5001"),
    ("cursor=%FF", "the query string is not UTF-8 once percent-decoded: 'utf-8' codec can't decode byte 0xff in "
                   "position 0: invalid start byte"),
])
def test_a_listing_request_it_cannot_take_gets_400_naming_what_is_wrong(query: str, message: str) -> None:
    with gateway() as client:
        for path in ("/api/clients", "/api/rooms", "/api/rooms/lobby", "/api/users/alice"):
            answer = client.get(f"{path}?{query}")
            assert (answer.status_code, answer.json()) == (
                400, {"error": {"code": "invalid_parameter", "message": message}}), path


def test_a_forged_cursor_is_only_a_place_to_start_after() -> None:
    with gateway() as client, connected(client) as (_, a), connected(client) as (_, b):
        first, second = sorted([a, b])

        def listed(key: str) -> list[str]:
            cursor = base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()
            return [entry["client_id"] for entry in client.get(f"/api/clients?cursor={cursor}").json()["clients"]]

        assert listed(first) == [second]
        assert listed(first[:-1]) == [first, second]
        assert listed("\U0010ffff" * 36) == []  # after every key
        assert listed("é") == []  # after every id
        assert listed(" ") == [first, second]
        assert client.get("/api/clients?limit=0&other=ignored").json() == {"count": 2, "clients": []}
        assert client.get("/api/clients?cursor=").json()["count"] == 2  # empty: from the first


def raw_request(server: Server, head: bytes) -> tuple[int, dict[str, Any]]:
    """Send a request head as it is, on a raw socket; the status and JSON body of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), dict(json.loads(rest.partition(b"\r\n\r\n")[2]))


@pytest.mark.process
def test_without_a_token_a_request_with_two_host_headers_is_refused(server: Server) -> None:
    # Before, the first Host was checked and the second ignored: "localhost" let "evil.example" through.
    for hosts in ((b"localhost", b"evil.example"), (b"evil.example", b"localhost"), (b"localhost", b"localhost")):
        status, body = raw_request(server, b"GET /api/clients HTTP/1.1\r\n"
                                           + b"".join(b"Host: " + host + b"\r\n" for host in hosts)
                                           + b"Connection: close\r\n\r\n")
        assert (status, body) == (403, {"error": {"code": "forbidden", "message": "without WS_MICRO_API_TOKEN the "
                                                  "API answers requests with one Host header, not 2"}}), hosts
    status, body = raw_request(server, b"GET /api/clients HTTP/1.1\r\nHost: " + b"h" * 20_000
                                       + b"\r\nConnection: close\r\n\r\n")
    assert status == 403 and body["error"]["message"].endswith("... (20000 characters)")
    assert len(body["error"]["message"]) < 300
    status, body = raw_request(server, b"GET /api/clients HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert status == 200  # one loopback Host, as before


def test_listings_stay_in_order_through_splits_of_the_index_and_large_rooms(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks of 2 to 4 keys, and rooms looked at 3 members at a time: every path of the code, with few clients.
    monkeypatch.setattr(ws_micro._SortedKeys, "CHUNK", 2)
    monkeypatch.setattr(ws_micro, "_PICK_STEP", 3)
    with gateway() as client, contextlib.ExitStack() as stack:
        connections: dict[str, tuple[int, contextlib.ExitStack]] = {}
        for n in range(16):
            own = stack.enter_context(contextlib.ExitStack())
            ws, me = own.enter_context(connected(client))
            for room in ("big", f"r{n:02d}"):
                ws.send_json(frame("join", me, {"room": room}))
                ws.receive_json()
            connections[me] = (n, own)
        for me, (n, own) in list(connections.items()):  # a third leave: chunks shrink, and some empty
            if n % 3 == 0:
                own.close()  # waits for the server side to end
                del connections[me]
        expected = sorted(connections)
        for limit in (1, 2, 3, 5, 100):
            found = []
            for path, name in (("/api/clients", "clients"), ("/api/rooms/big", "members"), ("/api/rooms", "rooms")):
                cursor = None
                entries = []
                while True:
                    body = client.get(path, params={"limit": limit, **({"cursor": cursor} if cursor else {})}).json()
                    entries += body[name]
                    cursor = body.get("next")
                    if cursor is None:
                        break
                found.append(entries)
            clients, members, rooms = found
            assert [entry["client_id"] for entry in clients] == expected, limit
            assert members == [{"client_id": me, "user": None} for me in expected], limit
            assert rooms == [{"room": "big", "members": len(expected)},
                             *({"room": f"r{n:02d}", "members": 1} for n in sorted(n for n, _ in connections.values()))]
