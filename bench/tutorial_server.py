"""The tutorial's server as the tutorial writes it, for the benchmark's baseline.

FastAPI + pydantic models + its ``BaseConnectionManager`` with ``send_json``,
its prints kept (the benchmark sends every server's stdout to /dev/null), and
with the event handling the tutorial leaves out filled in the obvious way (the
FastAPI documentation's ConnectionManager pattern): ``echo`` goes back with
``send_to_client``, ``to`` is relayed with ``send_to_client``, and a broadcast
loops ``send_to_client`` over every connection.  Not part of ws_micro: FastAPI
and pydantic are bench-only extras (``pip install '.[bench]'``).

    uvicorn bench.tutorial_server:app --port 8001
"""

import uuid
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import BaseModel

app = FastAPI()


class WebsocketData(BaseModel):
    data: dict[str, Any]


class WebsocketEvent(BaseModel):
    event: str
    client_id: str
    data: WebsocketData


class BaseConnectionManager:
    def __init__(self) -> None:
        self.active_connections: dict[str, WebSocket] = {}

    async def connect(self, websocket: WebSocket) -> str:
        await websocket.accept()
        connection_id = str(uuid.uuid4())
        self.active_connections[connection_id] = websocket
        connect_event = WebsocketEvent(
            event="connect",
            client_id=connection_id,
            data=WebsocketData(data={"message": "connection request granted"}),
        )
        await websocket.send_json(connect_event.model_dump())
        print(f"Client {connection_id} connected")
        return connection_id

    async def disconnect(self, connection_id: str) -> None:
        if connection_id in self.active_connections:
            del self.active_connections[connection_id]

    async def send_to_client(self, client_id: str, message: dict[str, Any]) -> None:
        if client_id in self.active_connections:
            await self.active_connections[client_id].send_json(message)

    async def broadcast(self, message: dict[str, Any]) -> int:
        for client_id in list(self.active_connections):
            await self.send_to_client(client_id, message)
        return len(self.active_connections)


py_connection_manager = BaseConnectionManager()


@app.websocket("/ws/py_client")
async def websocket_endpoint(websocket: WebSocket) -> None:
    connection_id = await py_connection_manager.connect(websocket)
    try:
        while True:
            message = await websocket.receive_json()
            event = WebsocketEvent(**message)
            print(f"Received event: {event.event}")
            to = message.get("to")
            if to is not None:
                await py_connection_manager.send_to_client(to, message)
            elif event.event == "echo":
                await py_connection_manager.send_to_client(connection_id, message)
            elif event.event == "broadcast":
                await py_connection_manager.broadcast(message)
    except WebSocketDisconnect:
        print(f"Client {connection_id} disconnected")
        await py_connection_manager.disconnect(connection_id)
    except Exception as e:
        print(f"Error: {e}")
        await py_connection_manager.disconnect(connection_id)


@app.post("/api/broadcast")
async def broadcast(event: dict[str, Any]) -> dict[str, int]:
    """The obvious HTTP trigger for a broadcast: the same loop over send_to_client."""
    message = {"event": event["event"], "client_id": "", "data": event["data"]}
    return {"delivered": await py_connection_manager.broadcast(message)}


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"status": "ok", "connections": len(py_connection_manager.active_connections)}
