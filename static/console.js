// The console page: shows this connection, its frames and rooms, and sends events.
import { Client } from "./ws_micro.js";

// Everything is relative to where the gateway is mounted (this file is <root>/static/console.js),
// so the page also works under an embedding app's prefix. `?ws=<url>` points it elsewhere.
const ROOT = new URL("../", import.meta.url);
const WS_URL = new URLSearchParams(location.search).get("ws")
  ?? new URL("ws/py_client", ROOT).href.replace(/^http/, "ws");

const $ = (id) => document.getElementById(id);
const MAX_LOG = 200;

// A token comes in the page's fragment, #token=...: unlike a query string, a fragment is never sent
// to the server, so it cannot land in an access log. It goes into the token field, and out of the
// address bar (and this page's history entry), so that it is not bookmarked, shared or shown.
function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token === null) return false;
  params.delete("token");
  const rest = params.toString();
  history.replaceState(history.state, "", `${location.pathname}${location.search}${rest ? `#${rest}` : ""}`);
  $("token").value = token;
  return true;
}

takeTokenFromFragment();
// The token field is read before every try, so an edited token is used from the next one on.
const client = new Client(WS_URL, { token: () => $("token").value.trim() || null });

const CAUSES = { timeout: "timed out", keepalive: "no pong", online: "back online", error: "failed", token: "no token" };

// A refusal in a few words: "401 unauthorized".
const refused = (refusal) => `${refusal.status}${refusal.code ? ` ${refusal.code}` : ""}`;

// What the badge says: the state, and while reconnecting why and when.
function describe(state, detail) {
  if (state === "refused") return `refused: ${refused(detail)}`;
  if (state === "reconnecting" && detail.delay !== undefined) {
    const why = detail.refusal ? `refused ${refused(detail.refusal)}`
      : CAUSES[detail.cause] ?? (detail.code ? `closed ${detail.code}` : "closed");
    const when = detail.delay ? `in ${(detail.delay / 1000).toFixed(1)} s` : "now";
    return `${why}; reconnecting ${when} (attempt ${detail.attempt})`;
  }
  if (state === "reconnecting") return `reconnecting (attempt ${detail.attempt})`;
  if (state === "closed" && detail.gaveUp) return `closed: gave up after ${detail.attempt} retries`;
  if (state === "closed" && detail.reason) return `closed: ${detail.reason}`;
  return state;
}

// The box under the header: why the gateway refused this page, and what happens next.
function showRefusal(refusal, final) {
  const box = $("refusal");
  box.hidden = !refusal;
  $("retry").hidden = !final;
  if (!refusal) return;
  box.dataset.final = String(final);
  $("refusal-title").textContent = final ? "Connection refused:" : "Refused for now:";
  $("refusal-status").textContent = refused(refusal);
  $("refusal-message").textContent = refusal.message ?? "";
  $("refusal-next").textContent = final
    ? "The page will not try again by itself. Check or replace the token, then retry."
    : "Retrying by itself; the badge says when.";
  if (final) $("token-panel").open = true;
}

client.onState((state, detail) => {
  const badge = $("state");
  badge.dataset.state = state;
  badge.textContent = describe(state, detail);
  if (state === "open") {
    $("client-id").textContent = detail.clientId;
    $("user").textContent = client.user ?? "";
    $("user-wrap").hidden = client.user === null;
    showRefusal(null, false);
    renderRooms();
    refreshClients();
  } else if (state === "refused") {
    showRefusal(detail, true);
  } else if (state === "reconnecting" && detail.delay !== undefined) {
    showRefusal(detail.refusal ?? null, false);
  }
});

// With recovery on, after each reconnect: did the gateway keep this page's session? The header says so,
// and a line in the log, after the connect frame (replayed frames follow it).
let connects = 0;
function showSession() {
  connects += 1;
  const { recovered } = client;
  if (recovered === null || (connects === 1 && !recovered)) return; // no recovery, or the first session
  const text = recovered ? `session recovered: same id, same rooms; the ${client.missed} frame(s) it missed follow`
    : "new session: new id; frames sent meanwhile are lost, resynchronise";
  const session = $("session");
  session.hidden = false;
  session.dataset.recovered = String(recovered);
  session.textContent = recovered ? "session recovered" : "new session";
  const item = document.createElement("li");
  item.className = "frame session";
  item.dataset.recovered = String(recovered);
  item.textContent = text;
  $("log").prepend(item);
}

client.on("*", (frame) => {
  const item = document.createElement("li");
  item.className = frame.event === "error" ? "frame error" : frame.event === "presence" ? "frame presence" : "frame";
  const head = document.createElement("div");
  head.className = "frame-head";
  const name = document.createElement("strong");
  name.textContent = frame.event;
  const from = document.createElement("code");
  from.textContent = frame.client_id === client.clientId ? "to me" : `from ${frame.client_id}`;
  head.append(name, " ", from);
  if (frame.room) head.append(` in ${frame.room}`);
  const body = document.createElement("pre");
  body.textContent = frame.event === "error" ? `${frame.data.data.code}: ${frame.data.data.message}`
    : frame.event === "presence" ? presence(frame.data.data)
      : JSON.stringify(frame.data.data);
  item.append(head, body);
  $("log").prepend(item);
  while ($("log").children.length > MAX_LOG) $("log").lastChild.remove();
  if (["joined", "left", "error"].includes(frame.event)) renderRooms();
  if (frame.event === "connect") showSession();
});

// "alice (3d04...) joined lobby"; without a user, the id alone.
function presence({ room, action, client_id: who, user }) {
  return `${user ? `${user} (${who})` : who} ${action} ${room}`;
}

$("send-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const error = $("send-error");
  error.textContent = "";
  let data;
  try {
    data = JSON.parse($("data").value || "{}");
    if (data === null || typeof data !== "object" || Array.isArray(data)) throw new Error("not an object");
  } catch {
    error.textContent = "Data must be a JSON object, like {\"text\": \"hi\"}.";
    return;
  }
  const route = $("route").value;
  const target = $("target").value.trim();
  if (route !== "builtin" && !target) {
    error.textContent = route === "room" ? "Name a room." : "Give a client id.";
    return;
  }
  const sent = client.send($("event").value.trim(), data,
    route === "client" ? { to: target } : route === "room" ? { room: target } : {});
  if (!sent) error.textContent = "Not connected; try again when the badge says open.";
});

$("room-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const room = $("room").value.trim();
  if (room) client.join(room);
  $("room").value = "";
});

function renderRooms() {
  const list = $("rooms");
  list.replaceChildren();
  for (const room of client.rooms) {
    const item = document.createElement("li");
    const leave = document.createElement("button");
    leave.type = "button";
    leave.className = "small";
    leave.textContent = "Leave";
    leave.setAttribute("aria-label", `Leave ${room}`);
    leave.addEventListener("click", () => { client.leave(room); renderRooms(); });
    const use = document.createElement("button");
    use.type = "button";
    use.className = "link";
    use.textContent = room;
    use.title = "Send to this room";
    use.addEventListener("click", () => { $("route").value = "room"; $("target").value = room; $("event").focus(); });
    item.append(use, leave);
    list.append(item);
  }
}

async function refreshClients() {
  const note = $("clients-note");
  const list = $("clients");
  try {
    const response = await fetch(new URL("api/clients", ROOT));
    if (!response.ok) throw new Error(`the API answered ${response.status}`);
    const body = await response.json();
    // The API answers a page at a time (docs/api.md): its first page, with the count of everyone.
    note.textContent = body.next ? `${body.count} connected, the first ${body.clients.length} shown`
      : `${body.count} connected`;
    list.replaceChildren(...body.clients.map((entry) => {
      const item = document.createElement("li");
      const pick = document.createElement("button");
      pick.type = "button";
      pick.className = "link";
      pick.textContent = entry.client_id;
      pick.title = "Send to this client";
      pick.addEventListener("click", () => {
        $("route").value = "client";
        $("target").value = entry.client_id;
        $("event").focus();
      });
      item.append(pick);
      if (entry.client_id === client.clientId) item.append(" (me)");
      if (entry.rooms.length) item.append(` in ${entry.rooms.join(", ")}`);
      return item;
    }));
  } catch (error) {
    note.textContent = `Clients unavailable: ${error.message}.`;
  }
}

$("refresh").addEventListener("click", refreshClients);
$("reconnect").addEventListener("click", () => client.reconnect());
$("retry").addEventListener("click", () => client.reconnect());
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  client.reconnect();
});
// A token pasted into the address bar of the open page (#token=...): use it at once.
window.addEventListener("hashchange", () => {
  if (takeTokenFromFragment()) client.reconnect();
});
$("clear").addEventListener("click", () => $("log").replaceChildren());
client.connect();
window.wsMicroClient = client; // for the console and the browser tests
