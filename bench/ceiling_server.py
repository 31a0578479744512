"""The ceiling: a bare ASGI callable with msgspec on the same uvicorn.

What this stack can do with no framework at all: no Starlette, no registry, no
queues, no limits.  It speaks just enough of the protocol for the benchmark:
the connect frame, ``echo``, ``to`` relays, and ``room``/``broadcast`` sent to
every other connection, each receiver's frame written directly.

    uvicorn bench.ceiling_server:app --port 8002
"""

import uuid
from typing import Any

import msgspec


class Payload(msgspec.Struct):
    data: dict[str, Any]


class Event(msgspec.Struct):
    event: str
    client_id: str
    data: Payload
    to: str | None = None
    room: str | None = None


decode = msgspec.json.Decoder(Event).decode
encode = msgspec.json.Encoder().encode
connections: dict[str, Any] = {}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "http":  # /healthz and POST /api/broadcast
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        delivered = 0
        if scope["path"] == "/api/broadcast":
            push = msgspec.json.decode(body)
            head = '{"event":' + encode(push["event"]).decode() + ',"client_id":"'
            tail = '","data":' + encode(push["data"]).decode() + "}"
            for client_id, peer in list(connections.items()):
                await peer({"type": "websocket.send", "text": head + client_id + tail})
                delivered += 1
            reply = encode({"delivered": delivered})
        else:
            reply = encode({"status": "ok", "connections": len(connections)})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(reply)).encode())]})
        await send({"type": "http.response.body", "body": reply})
        return

    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    client_id = str(uuid.uuid4())
    connections[client_id] = send
    await send({"type": "websocket.send", "text": encode(
        {"event": "connect", "client_id": client_id,
         "data": {"data": {"message": "connection request granted"}}}).decode()})
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message["text"]
            event = decode(text)
            if event.to is not None:
                peer = connections.get(event.to)
                if peer is not None:
                    await peer({"type": "websocket.send", "text": text})
            elif event.room is not None or event.event == "broadcast":
                for other, peer in list(connections.items()):
                    if other != client_id:
                        await peer({"type": "websocket.send", "text": text})
            elif event.event == "echo":
                await send({"type": "websocket.send", "text": text})
    except OSError:  # the peer went away mid-send
        return
    finally:
        connections.pop(client_id, None)
