// The Node `ws` contender of bench_ws_micro.py: what bench/ceiling_server.py does, on Node's http
// server and the `ws` library (with bufferutil, the native masking ws recommends installing).
//
// It speaks just enough of ws_micro's protocol for the benchmark, as the ceiling does: the connect
// frame with a client_id; `to` relays; `room` frames to every other member of the room (`join`
// adds the sender to data.data.room, without an answer: the ceiling answers none either); `broadcast`
// to every other connection; `echo` back; GET anything -> {"status":"ok","connections":n}; and
// POST /api/broadcast {"event":..., "data":...} -> a frame to every connection, each with the
// receiver's client_id (so each is its own string, as in the gateway), answered {"delivered":n}.
// Every frame is parsed (JSON.parse) and routed, the same work per frame as the ceiling's msgspec.
//
//     node bench/node_ws_server.js PORT      (bench_ws_micro.py runs npm ci in bench/ first)
'use strict';

const crypto = require('node:crypto');
const { broadcastParts, parseEvent } = require('./protocol');
const http = require('node:http');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2]);
const connections = new Map(); // client_id -> WebSocket
const rooms = new Map(); // room -> Set of WebSocket

// POST /api/broadcast's answer, [status, body]: every connection gets its own frame, with its own
// client_id in it (each its own string, as in the gateway and the ceiling).
function broadcast(body) {
  const [parts, refusal] = broadcastParts(body);
  if (refusal !== null) return refusal;
  const [head, tail] = parts;
  let delivered = 0;
  for (const [clientId, peer] of connections) {
    peer.send(head + clientId + tail);
    delivered += 1;
  }
  return [200, JSON.stringify({ delivered })];
}

const server = http.createServer((request, response) => {
  const chunks = [];
  request.on('data', (chunk) => chunks.push(chunk));
  request.on('end', () => {
    const [status, reply] = request.url === '/api/broadcast'
      ? broadcast(Buffer.concat(chunks).toString())
      : [200, JSON.stringify({ status: 'ok', connections: connections.size })];
    response.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(reply) });
    response.end(reply);
  });
});

// 16 MiB frames at most, as uvicorn's default ws_max_size; no compression (ws's server default).
const wss = new WebSocketServer({ server, maxPayload: 16 * 1024 * 1024, perMessageDeflate: false });

wss.on('connection', (ws) => {
  const clientId = crypto.randomUUID();
  const joined = new Set();
  connections.set(clientId, ws);
  ws.send(JSON.stringify({ event: 'connect', client_id: clientId,
                           data: { data: { message: 'connection request granted' } } }));
  ws.on('message', (data, isBinary) => {
    const [event, why] = parseEvent(data.toString());
    if (why !== null) {
      ws.close(1007, why);
      return;
    }
    // The received bytes go out again as a text frame: no re-encoding (the ceiling sends its str).
    if (typeof event.to === 'string') {
      const peer = connections.get(event.to);
      if (peer !== undefined) peer.send(data, { binary: false });
    } else if (typeof event.room === 'string') {
      for (const peer of rooms.get(event.room) ?? []) {
        if (peer !== ws) peer.send(data, { binary: false });
      }
    } else if (event.event === 'broadcast') {
      for (const peer of connections.values()) {
        if (peer !== ws) peer.send(data, { binary: false });
      }
    } else if (event.event === 'echo') {
      ws.send(data, { binary: !!isBinary });
    } else if (event.event === 'join' && typeof event.data?.data?.room === 'string') {
      const room = event.data.data.room;
      if (!rooms.has(room)) rooms.set(room, new Set());
      rooms.get(room).add(ws);
      joined.add(room);
    }
  });
  ws.on('close', () => {
    connections.delete(clientId);
    for (const room of joined) {
      const members = rooms.get(room);
      members.delete(ws);
      if (members.size === 0) rooms.delete(room);
    }
  });
  ws.on('error', () => {}); // a reset peer: 'close' follows
});

server.listen(port, '127.0.0.1');
