// The uWebSockets.js contender of bench_ws_micro.py: what bench/ceiling_server.py does, in
// uWebSockets.js (its C++ server; JavaScript only for the handlers).
//
// The official uWebSockets.js is published on GitHub only.  The npm registry's build of it that
// loads on this Node is @trufflesuite/uws-js-unofficial (uWebSockets.js v20.30.0 built from source
// by Truffle's CI; see docs/performance.md).  Its main module falls back to a JavaScript imitation
// built on `ws` when the binary does not load, so the binary is required here directly: no
// binary, no contender.
//
// The same protocol subset as bench/node_ws_server.js: the connect frame with a client_id; `to`
// relays; `room` frames to every other member of the room (`join` subscribes the sender to
// data.data.room, without an answer, and a room frame is uWS's own publish); `broadcast` to every
// other connection; `echo` back; GET anything -> {"status":"ok","connections":n}; and POST
// /api/broadcast {"event":..., "data":...} -> a frame to every connection, each with the receiver's
// client_id, answered {"delivered":n}.  Every frame is decoded and parsed (JSON.parse) and routed,
// the same work per frame as the ceiling's msgspec.
//
//     node bench/uws_server.js PORT      (bench_ws_micro.py runs npm ci in bench/ first)
'use strict';

const crypto = require('node:crypto');
const { broadcastParts, parseEvent } = require('./protocol');

const uWS = require('@trufflesuite/uws-js-unofficial/binaries/uws_' + process.platform + '_' + process.arch
                    + '_' + process.versions.modules + '.node');

const port = Number(process.argv[2]);
const connections = new Map(); // client_id -> WebSocket
const decoder = new TextDecoder();

const STATUS_LINES = { 200: '200 OK', 400: '400 Bad Request' };

function respond(response, status, reply) {
  response.cork(() => response.writeStatus(STATUS_LINES[status]).writeHeader('content-type', 'application/json')
    .end(reply));
}

// POST /api/broadcast's answer, [status, body]: every connection gets its own frame, with its own
// client_id in it (each its own string, as in the gateway and the ceiling).
function broadcast(body) {
  const [parts, refusal] = broadcastParts(body);
  if (refusal !== null) return refusal;
  const [head, tail] = parts;
  let delivered = 0;
  for (const [clientId, peer] of connections) {
    peer.send(head + clientId + tail, false);
    delivered += 1;
  }
  return [200, JSON.stringify({ delivered })];
}

const app = uWS.App()
  .ws('/*', {
    compression: uWS.DISABLED,
    maxPayloadLength: 16 * 1024 * 1024, // as uvicorn's default ws_max_size (uWS's own is 16 KiB)
    idleTimeout: 0, // no server pings: the other contenders send none either
    open: (ws) => {
      const clientId = crypto.randomUUID();
      ws.getUserData().clientId = clientId;
      connections.set(clientId, ws);
      ws.send(JSON.stringify({ event: 'connect', client_id: clientId,
                               data: { data: { message: 'connection request granted' } } }), false);
    },
    message: (ws, message, isBinary) => {
      const [event, why] = parseEvent(decoder.decode(message));
      if (why !== null) {
        ws.end(1007, why);
        return;
      }
      // The received bytes go out again as a text frame (valid until this handler returns).
      if (typeof event.to === 'string') {
        const peer = connections.get(event.to);
        if (peer !== undefined) peer.send(message, false);
      } else if (typeof event.room === 'string') {
        ws.publish(event.room, message, false); // every subscriber but the sender
      } else if (event.event === 'broadcast') {
        for (const peer of connections.values()) {
          if (peer !== ws) peer.send(message, false);
        }
      } else if (event.event === 'echo') {
        ws.send(message, isBinary);
      } else if (event.event === 'join' && typeof event.data?.data?.room === 'string') {
        ws.subscribe(event.data.data.room);
      }
    },
    close: (ws) => {
      connections.delete(ws.getUserData().clientId); // uWS drops its subscriptions itself
    },
  })
  .post('/api/broadcast', (response) => {
    const chunks = [];
    response.onAborted(() => {});
    response.onData((chunk, isLast) => {
      chunks.push(Buffer.from(chunk.slice(0))); // the chunk is neutered when this returns
      if (isLast) respond(response, ...broadcast(Buffer.concat(chunks).toString()));
    });
  })
  .any('/*', (response) => {
    respond(response, 200, JSON.stringify({ status: 'ok', connections: connections.size }));
  });

app.listen('127.0.0.1', port, (listening) => {
  if (!listening) {
    console.error(`uws_server.js: cannot listen on 127.0.0.1:${port}`);
    process.exit(1);
  }
});
