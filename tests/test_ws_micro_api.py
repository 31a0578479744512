"""Tests of ws_micro's sidecar HTTP API (docs/api.md): events only the gateway sends.

Each starts `python ws_micro.py` (or uvicorn with an app of the test's) as a real process and talks to it
with real `websockets` clients.  Shared fixtures and helpers are in conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    Server,
    frame,
    join,
    recv_json,
    run_server,
    text,
    ws_client,
)

pytestmark = pytest.mark.anyio


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
