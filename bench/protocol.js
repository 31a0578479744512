// What the two JavaScript contenders of bench_ws_micro.py (node_ws_server.js, uws_server.js) parse alike;
// each routes and writes with its own library.
'use strict';

// A client frame's event, or why it is none (the close reason; the caller closes with 1007).
function parseEvent(text) {
  let event;
  try {
    event = JSON.parse(text);
  } catch {
    return [null, 'not JSON'];
  }
  if (event === null || typeof event !== 'object') return [null, 'not a JSON object'];
  return [event, null];
}

// POST /api/broadcast's body: [head, tail] around each receiver's client_id (each frame its own string, as in
// the gateway and the ceiling), or [status, body] of the error answer.
function broadcastParts(body) {
  let push;
  try {
    push = JSON.parse(body);
  } catch {
    push = null;
  }
  if (push === null || typeof push !== 'object') {
    return [null, [400, JSON.stringify({ error: { code: 'invalid_json', message: 'the body is not a JSON object' } })]];
  }
  return [['{"event":' + JSON.stringify(push.event) + ',"client_id":"', '","data":' + JSON.stringify(push.data) + '}'],
          null];
}

module.exports = { parseEvent, broadcastParts };
