"""ws_micro_redis: cluster mode for ws_micro, several instances sharing one registry over Redis.

``create_app(redis_url=...)`` loads this module, which must sit beside ``ws_micro.py`` at the same
version, and needs redis-py (``pip install 'redis[hiredis]'``).  Its :class:`RedisBackend` fills the
core's backend seam (``ws_micro._Backend``): the registry hands it what belongs to clients of other
instances, and it hands the registry what other instances send.  It reads the registry, and changes a
connection, a session or the registry only through the registry's methods meant for a backend.
docs/cluster.md has the design, the keys and the faults; docs/recovery.md, how sessions wait in Redis.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import itertools
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Literal

import anyio
import msgspec
from anyio.abc import TaskGroup

import ws_micro
from ws_micro import (
    _NO_LIFESPAN,
    BACKEND_UNAVAILABLE,
    UNKNOWN_CLIENT,
    BackendUnavailable,
    Registry,
    Settings,
    _addressed,
    _Backend,
    _Connection,
    _Delivery,
    _encode,
    _Index,
    _Kept,
    _Kick,
    _KickUser,
    _MetricFamily,
    _not_installed,
    _Page,
    _Paging,
    _Parked,
    _ToClient,
    _ToEveryone,
    _ToGroup,
    _too_many_rooms,
    _ToRoom,
    _ToUser,
    _url_scheme,
    logger,
)

_REDIS_MISSING: ImportError | None = None  # why redis-py cannot be imported, said when redis_url is set
try:  # optional: without redis-py, RedisBackend says what to install
    import redis.asyncio
    from redis.asyncio.connection import parse_url
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
except ImportError as exc:
    redis = None  # type: ignore[assignment]
    _REDIS_MISSING = exc

__version__ = "0.3.0"

ws_micro._check_sibling(__file__, __version__)

UNAVAILABLE = "Redis is unavailable; only clients on this instance can be reached"
NOT_STARTED = (f"cluster mode has no Redis connection, because {_NO_LIFESPAN}; "
               "only clients on this instance can be reached")
RESYNCING = ("Redis lost the cluster's state and instances are still registering again; "
             "only clients on this instance and on instances already back can be reached")
TAKEN_FOR_DEAD = "this instance was taken for dead by the cluster; connect again"  # the close reason (1012)
NOT_LISTENING = "not listening to Redis (reconnecting, or dead for less than instance_ttl)"
OUTBOX_LIMIT = 10_000  # deliveries waiting for Redis before senders wait too
RESYNC_POLL = 0.1  # seconds between looks for peers while they are registering again
SHARING_WAIT = 1.0  # seconds a join waits for the instances that relayed its room alone to know it is not (_RoomShared)
# Clients whose instance a sender caches (learnt from the relay script's answers): past it, no more are learnt until
# cached clients move or leave; the others' frames are looked up, one script a client.  An entry is a few hundred
# bytes: about 30 MiB at most.
CACHE_LIMIT = 100_000
# Seconds a fenced client's frames wait for its old instance to say it routed on every direct frame sent to it
# before (_FencePassed): as SHARING_WAIT, past it the old instance is taken for dead, and they go on.
FENCE_WAIT = 1.0
# Frames held for one fenced client, and for all, past which a frame is refused to its sender (counted as dropped,
# "moving"): a fence lasts a round trip through the old instance, a few milliseconds, and the outbox holds
# OUTBOX_LIMIT deliveries in all for the same reason.
FENCE_FRAMES = 1_000
FENCE_LIMIT = OUTBOX_LIMIT
# Seconds an instance taken for dead is remembered as such (p:taken:<id>), for it to know when it comes back: a
# day, past any pause a process or a VM survives; an instance truly dead costs Redis a small key as long.
TAKEN_KEEP = 86_400
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")  # redis_url through Redis Sentinel (docs/cluster.md)
SENTINEL_PORT = 26379  # Sentinel's own default port, for a sentinel named without one
# Bytes of messages after which a run of deliveries is cut into another relay script: about what Redis writes to
# a client per turn of its event loop (64 KiB), so that a backlog of large frames reaches Redis, and its
# subscribers, in pieces of the size they did one script a frame, never as one message over Redis's output
# buffer limit for a subscriber (32 MiB by default), past which Redis drops it and what is on its way to it.
# Small frames still travel hundreds to a message.
RUN_BYTES = 64 * 1024

# Why a cross-instance delivery was lost (the cluster_dropped_total labels): its client left
# before it arrived; its instance was not listening (dead before its deadline passed, or
# reconnecting); Redis could not be reached; Redis had lost the instances' state and they
# had not all registered again; its client was moving, and more frames were held for it than a fence holds.
CLUSTER_DROP_REASONS = ("gone", "no_subscriber", "backend_unavailable", "resyncing", "moving")


# Connection recovery's messages between instances (and from the scripts): a session was parked in
# Redis by its instance, and every delivery on its way to it there has come since; it may be
# resumed now; the instance resuming it has been sent every delivery routed to it before it did;
# it ended (kicked, overflowed, expired, resumed), told the instance that parked it; and a request
# to the instance holding a connection open to park it, for a client come back elsewhere.
class _WasParked(msgspec.Struct, tag="parked", array_like=True):
    client_id: str


class _Sealed(msgspec.Struct, tag="sealed", array_like=True):
    client_id: str


class _WasResumed(msgspec.Struct, tag="resumed", array_like=True):
    client_id: str


class _SessionEnded(msgspec.Struct, tag="ended", array_like=True):
    client_id: str
    reason: str


class _TakeOver(msgspec.Struct, tag="takeover", array_like=True):
    client_id: str
    token_hash: str
    requester: str


# A user's tokens issued up to ``before`` were revoked on an instance, until ``expires`` (Unix times):
# published to every instance, and kept in Redis for those that join later (Registry.revoke_user).
class _Revoked(msgspec.Struct, tag="revoked", array_like=True):
    user: str
    before: float
    expires: float


# Registry.join (``join``) or leave of a client another instance holds: asked of that instance (routed to it
# through the directory, as a frame for that client is), which does it as Registry.join does there, then
# answers the requester's ``request`` with its outcome: 1 done; 0 no such client connected there; -1 past
# max_rooms_per_connection.  Asked and answered, not sent and forgotten: the caller's next publish to the
# room must find the client in it.
class _Membership(msgspec.Struct, tag="member", array_like=True):
    client_id: str
    room: str
    join: bool
    requester: str
    request: int


class _MembershipDone(msgspec.Struct, tag="member_done", array_like=True):
    request: int
    outcome: int


# A room whose members this instance had found all here (it watched the room) has members elsewhere now: its
# members' frames go through Redis again.  The instance that joined it (``by``) is told when the watcher knows
# (_RoomSharedSeen), and answers its join then: a frame sent after a client saw its "joined" reaches it.
class _RoomShared(msgspec.Struct, tag="shared", array_like=True):
    room: str
    by: str


class _RoomSharedSeen(msgspec.Struct, tag="shared_seen", array_like=True):
    room: str


# A frame for a client sent on the sender's cached entry of the client's instance (see _Moved), without the relay
# script: ``origin`` is the sending instance, told if the client is no longer here and the frame cannot be routed
# on (_Undelivered).  The sending client's id is in ``text`` (its client_id).
class _Direct(msgspec.Struct, tag="direct", array_like=True):
    client_id: str
    text: str
    origin: str


# The directory moved a client this instance had cached (it watched it: p:client-watch:<client>) away from
# instance ``was`` (a park, a resume, a client that left, a reaped instance).  The watcher fences the client: it
# holds its new frames for it until ``was`` has routed on every direct frame it sent there before (_Fence,
# answered by _FencePassed), so that none overtakes them.
class _Moved(msgspec.Struct, tag="moved", array_like=True):
    client_id: str
    was: str


class _Fence(msgspec.Struct, tag="fence", array_like=True):
    client_id: str
    origin: str
    number: int


class _FencePassed(msgspec.Struct, tag="fence_passed", array_like=True):
    client_id: str
    number: int


# A direct frame that reached an instance its client had left, and could not be routed on from there: its
# sender's instance (``origin`` of the _Direct) tells the sender, as it would have been told by the relay script.
class _Undelivered(msgspec.Struct, tag="undelivered", array_like=True):
    client_id: str
    text: str
    code: str
    message: str


_Control = (_WasParked | _Sealed | _WasResumed | _SessionEnded | _TakeOver | _Revoked | _Membership | _MembershipDone
            | _RoomShared | _RoomSharedSeen | _Moved | _Fence | _FencePassed | _Undelivered)

_encode_delivery = msgspec.msgpack.Encoder().encode
# Each pub/sub message is a msgpack array of deliveries and control messages (the scripts' publish()): those
# for one instance at one moment travel together, and are decoded in one pass.
_decode_deliveries = msgspec.msgpack.Decoder(list[_Delivery | _Direct | _Control]).decode

# The delivery scripts the outbox runs as one "relay" script when they are queued one after another.
_RELAYED = frozenset(("send", "group"))  # as the outbox names them; they are not scripts of their own
# Messages the outbox publishes on an instance's channel as they are (a frame for a client or a room on a cached
# entry, a fence), in order with the deliveries: in a run with relay scripts, the script publishes them with the
# rest, without a lookup; in a run of their own, one PUBLISH per instance.
_DIRECT = frozenset(("direct", "room", "fence"))
_RUN = _RELAYED | _DIRECT
# What the outbox sends about frames, which is not one: a fence (_Fence) and the notices of fences and of frames
# refused (_FencePassed, _Undelivered, run as the "tell" script).  Not counted as dropped when lost: the frames are.
_UNCOUNTED = frozenset(("fence", "notice"))
# What goes to one instance, a client's or a sender's: not held while resyncing (a notice held would be lost unsaid).
_ROUTED = frozenset(("send", "direct", "fence", "notice"))

# The scripts run inside Redis, so each lookup and its publish is one round trip, and liveness
# is judged by one clock (Redis's).  ARGV[1] is the key prefix.  Keys, for prefix p:
#   p:instances                ZSET  instance id -> deadline (Redis time, s): live while in the future
#   p:directory                HASH  client id -> instance id
#   p:instance:<id>:clients    HASH  client id -> the client's JSON entry in GET /api/clients
#   p:instance:<id>:rooms      SET   rooms with members on that instance
#   p:instance:<id>:users      SET   users with connections on that instance
#   p:room:<room>              HASH  instance id -> members of the room there (whom to publish to)
#   p:user:<user>              HASH  instance id -> connections of the user there
#   p:room-ids:<room>          ZSET  the ids of its members, every score 0: in order, for GET /api/rooms/<room>
#   p:user-ids:<user>          ZSET  the ids of the user's connections, likewise
#   p:clients                  ZSET  every client id in the directory, likewise: for GET /api/clients
#   p:rooms                    ZSET  every room with a p:room:<room>, likewise: for GET /api/rooms
#   p:synced                   HASH  instance id -> run_id of the Redis server it last wrote its whole state to
#   p:deliveries:<id>          pub/sub channel of that instance
#   p:client-watch:<client id> SET   instances that cached the client's instance (told _Moved when it changes)
#   p:taken:<id>               STRING  an instance the others took for dead (when: Redis time), for it to know when back
# With connection recovery, a session waiting for its client lives in Redis as an instance of its
# own, "~<client id>", alive until its window ends: the scripts route frames to it as to any
# instance, and keep() appends them to its list instead of publishing them.
#   p:session:<client id>      HASH  its resume token's hash, offsets, bounds, who parked it, who waits
#   p:kept:<client id>         LIST  its frames, the first at offset "base"
#   p:pending:<client id>      LIST  frames routed to it until it is sealed (then appended to kept)
#   p:claiming:<client id>     STRING  the instance resuming it, for a few seconds: one resume wins
#   p:used:<client id>         STRING  the hash of its last spent token (refused while the session is
#                                      connected), expiring after the window
#   p:instance:<id>:kept       STRING  bytes kept by the sessions that instance parked (its budget)
#   p:instance:<id>:parked     ZSET    those sessions, scored by when it parked them (the first go first)
#   p:revoked:<user>           STRING  up to when the user's tokens are refused, expiring with it


def _lua_layout(*structs: type[msgspec.Struct]) -> str:
    """A Lua table of where each field of these tagged, array-like Structs sits in its msgpack array (the tag
    first): generated from the Structs, so that the scripts read and write fields by name, and a field
    reordered in Python moves in the scripts too."""
    entries = []
    for struct in structs:
        fields = ", ".join(f"{name} = {position}" for position, name in enumerate(struct.__struct_fields__, 2))
        entries.append(f"{struct.__struct_config__.tag} = {{{fields}}}")
    return "local F = {" + ", ".join(entries) + "}\n"


_LUA_PRELUDE = _lua_layout(_ToClient, _ToRoom, _ToUser, _ToEveryone, _Kick, _KickUser, _RoomShared, _Moved,
                           _WasParked, _Sealed, _WasResumed, _SessionEnded, _TakeOver,
                           _Revoked) + f"local TAKEN_KEEP = {TAKEN_KEEP}\n" + """
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function alive(id)
  local deadline = redis.call('ZSCORE', p .. ':instances', id)
  return deadline and tonumber(deadline) > now
end
local function live()
  return redis.call('ZRANGEBYSCORE', p .. ':instances', '(' .. now, '+inf')
end
local reached, unheard = 0, 0  -- clients sent a delivery; live instances that were not listening
-- A message of ours (a _Delivery or a _Control), its fields by name.
local function pack(tag, fields)
  local message = {tag}
  for name, value in pairs(fields) do message[F[tag][name]] = value end
  return cmsgpack.pack(message)
end
-- Publish messages of ours (each msgpack-encoded) to instance id as one pub/sub message: a msgpack array of
-- them, which the instance decodes in one pass.  -> how many subscribers heard it (0: not listening)
local function publish(id, messages)
  local n = #messages
  local head = n < 16 and string.char(0x90 + n) or n < 65536 and string.char(0xdc) .. struct.pack('>I2', n)
               or string.char(0xdd) .. struct.pack('>I4', n)
  return redis.call('PUBLISH', p .. ':deliveries:' .. id, head .. table.concat(messages))
end
-- A client's directory entry changed from instance ``old``: the instances that cached it (its watchers, added by
-- the relay script) are told (a _Moved) and forgotten.  Every script that changes an entry calls this.
local function moved(client, old)
  local watch = p .. ':client-watch:' .. client
  local watchers = redis.call('SMEMBERS', watch)
  if #watchers > 0 then
    local message = pack('moved', {client_id = client, was = old})
    for _, watcher in ipairs(watchers) do publish(watcher, {message}) end
    redis.call('DEL', watch)
  end
end
-- A room lost instance id: its watchers (see shared() below) are told and forgotten too, without waiting for their
-- answers, for a watcher that caches the room's instances would go on publishing to id for nothing, and would not
-- know when the room is all its own again.  A frame published meanwhile costs a message, never a member's frame.
local function unshared(name, id)
  local watch = p .. ':room-watch:' .. name
  for _, watcher in ipairs(redis.call('SMEMBERS', watch)) do
    -- No one to answer (by ''): an answer to id would count towards a join of id's that came after.
    if watcher ~= id then publish(watcher, {pack('shared', {room = name, by = ''})}) end
  end
  redis.call('DEL', watch)
end
-- Take instance id out of a room's or user's instances; a room left with none leaves the rooms' index.
local function drop_instance(kind, name, id)
  local key = p .. ':' .. kind .. ':' .. name
  redis.call('HDEL', key, id)
  if kind == 'room' then
    unshared(name, id)
    if redis.call('EXISTS', key) == 0 then redis.call('ZREM', p .. ':rooms', name) end
  end
end
-- A room's instances are cached by an instance that relays to it, once the relay script has found them all live
-- (none a waiting session) and made that instance one of the room's watchers (p:room-watch:<room>): a room whose
-- members are all on it is relayed there without Redis, another is published to its instances without a lookup.
-- When the room gains an instance (id), its watchers are told (a _RoomShared) and forgotten: they ask again.
-- ``notified`` counts the watchers that heard, each of which tells id when it knows (see _RoomSharedSeen).
local notified = 0
local function shared(name, id)
  local watch = p .. ':room-watch:' .. name
  for _, watcher in ipairs(redis.call('SMEMBERS', watch)) do
    if watcher ~= id and publish(watcher, {pack('shared', {room = name, by = id})}) > 0 then
      notified = notified + 1
    end
  end
  redis.call('DEL', watch)
end
local function reap(id)
  -- Each client's entry names its rooms and user: its memberships go with it, at a cost of the
  -- instance's own memberships, whatever the size of the rooms.
  local clients = p .. ':instance:' .. id .. ':clients'
  local entries = redis.call('HGETALL', clients)
  for i = 1, #entries, 2 do
    local client = entries[i]
    if redis.call('HGET', p .. ':directory', client) == id then
      redis.call('HDEL', p .. ':directory', client)
      redis.call('ZREM', p .. ':clients', client)
      moved(client, id)
    end
    local ok, entry = pcall(cjson.decode, entries[i + 1])
    if ok and type(entry) == 'table' then
      for _, room in ipairs(type(entry.rooms) == 'table' and entry.rooms or {}) do
        redis.call('ZREM', p .. ':room-ids:' .. room, client)
      end
      if type(entry.user) == 'string' then redis.call('ZREM', p .. ':user-ids:' .. entry.user, client) end
    end
  end
  for _, kind in ipairs({'room', 'user'}) do
    local names = p .. ':instance:' .. id .. ':' .. kind .. 's'
    for _, name in ipairs(redis.call('SMEMBERS', names)) do drop_instance(kind, name, id) end
    redis.call('DEL', names)
  end
  redis.call('DEL', clients)
  redis.call('ZREM', p .. ':instances', id)
  redis.call('HDEL', p .. ':synced', id)
end
-- Make a client a member, on instance id, of a room or user ("room" or "user"); recovery moves members.
local function add_member(kind, name, client, id)
  if redis.call('HINCRBY', p .. ':' .. kind .. ':' .. name, id, 1) == 1 and kind == 'room' then shared(name, id) end
  redis.call('SADD', p .. ':instance:' .. id .. ':' .. kind .. 's', name)
  redis.call('ZADD', p .. ':' .. kind .. '-ids:' .. name, 0, client)
  if kind == 'room' then redis.call('ZADD', p .. ':rooms', 0, name) end
end
-- A page of a listing: the first `limit` keys of `index` (a sorted set whose scores are all 0, so in the
-- order of their bytes) after `after` ('' from the first); entry(key) for each, but those it finds gone
-- (false), preceded by their key if `keyed`, until they pass max_bytes.
-- -> {count, the key to go on after ('' at the end), entries...}
local function page(count, index, after, limit, max_bytes, entry, keyed)
  local keys = redis.call('ZRANGEBYLEX', index, after == '' and '-' or '(' .. after, '+', 'LIMIT', 0, limit + 1)
  local result, size = {count, ''}, 0
  for i = 1, math.min(#keys, limit) do
    if #result > 2 and size >= max_bytes then result[2] = keys[i - 1] return result end
    local value = entry(keys[i])
    if value then
      if keyed then result[#result + 1] = keys[i] end
      result[#result + 1] = value
      size = size + #value + (keyed and #keys[i] or 0)
    end
  end
  if limit > 0 and #keys > limit then result[2] = keys[limit] end
  return result
end
-- The JSON entry of a client on a live instance, or false.
local function client_entry(client)
  local id = redis.call('HGET', p .. ':directory', client)
  return id and alive(id) and redis.call('HGET', p .. ':instance:' .. id .. ':clients', client)
end
-- A waiting session ends: its memberships go, and the instance that parked it is told, to tell the
-- backend and the session's rooms.  ("ended", client, reason) is a _SessionEnded message.
-- A session leaves the budget of the instance that parked it (see charge() below), with what it kept.
local function release(client, parker, size)
  if not parker then return end
  local held = p .. ':instance:' .. parker
  if redis.call('DECRBY', held .. ':kept', tonumber(size) or 0) <= 0 then redis.call('DEL', held .. ':kept') end
  redis.call('ZREM', held .. ':parked', client)
end
local function end_session(client, reason)
  local session = p .. ':session:' .. client
  local s = redis.call('HMGET', session, 'parker', 'size')
  local parker = s[1]
  release(client, parker, s[2])
  reap('~' .. client)
  redis.call('DEL', session, p .. ':kept:' .. client, p .. ':pending:' .. client)
  if parker then
    publish(parker, {pack('ended', {client_id = client, reason = reason})})
  end
end
-- The sessions an instance parked share one budget (recovery_max_memory, as the bytes of their frames):
-- p:instance:<id>:kept holds what they keep in all, p:instance:<id>:parked them in the order they were
-- parked.  Charge it ``bytes`` more; past ``budget``, the sessions parked first end ('evicted').
local function charge(parker, bytes, budget)
  local held = p .. ':instance:' .. parker
  local total = redis.call('INCRBY', held .. ':kept', bytes)
  while total > budget do
    local oldest = redis.call('ZRANGE', held .. ':parked', 0, 0)[1]
    if not oldest then break end
    end_session(oldest, 'evicted')
    total = tonumber(redis.call('GET', held .. ':kept') or 0)
  end
end
-- Keep a delivery (a msgpack-encoded _Delivery) for a waiting session, within its bounds: 'kept';
-- 'kicked' (a kick ends it); or 'lost' (no such session, or this frame passed its bounds and ended it).
-- Until the session is sealed, frames routed to it here wait in a pending list, behind those its old
-- instance forwards ("diverted": routed to it there before it was parked), which go first.
local function keep(client, message, diverted)
  local d = cmsgpack.unpack(message)
  local tag = d[1]
  if tag == 'kick' or tag == 'kick_user' then end_session(client, 'kicked') return 'kicked' end
  local f = F[tag]
  if not f or not f.text then return 'lost' end
  -- A relayed frame as it is; a server frame's text and tail with the client's id between (as _Frame.to).
  local tail = f.tail and d[f.tail]
  local text = d[f.text] .. (tail and (client .. tail) or '')
  local session = p .. ':session:' .. client
  local kept, pending = p .. ':kept:' .. client, p .. ':pending:' .. client
  if redis.call('EXISTS', session) == 0 then return 'lost' end
  local b = redis.call('HMGET', session, 'base', 'away_at', 'max_frames', 'max_bytes', 'sealed', 'size', 'parker',
                      'max_memory')
  local base, away_at, max_frames, max_bytes = tonumber(b[1]), tonumber(b[2]), tonumber(b[3]), tonumber(b[4])
  local charged = tonumber(b[6])  -- what its parker's budget counts for it
  redis.call('RPUSH', (diverted or b[5] == '1') and kept or pending, text)
  local n = redis.call('LLEN', kept) + redis.call('LLEN', pending)
  local size = charged + #text
  while n > max_frames or size > max_bytes do
    if base >= away_at or redis.call('LLEN', kept) == 0 then end_session(client, 'overflowed') return 'lost' end
    size = size - #redis.call('LPOP', kept)
    base, n = base + 1, n - 1
  end
  redis.call('HSET', session, 'base', base, 'size', size)
  charge(b[7], size - charged, tonumber(b[8]))
  return redis.call('EXISTS', session) == 1 and 'kept' or 'lost'  -- its own frame may have made it the oldest's
end
local function deliver(id, message, clients)
  if string.sub(id, 1, 1) == '~' then
    keep(string.sub(id, 2), message, false)
    reached = reached + clients
  elseif publish(id, {message}) > 0 then
    reached = reached + clients
  else
    unheard = unheard + 1
  end
end
"""
_LUA = {
    # Renew this instance's deadline, and reap the instances whose deadline passed.  One reaped by an instance
    # that was not itself coming back from a loss of Redis (ARGV[4] = 1: its heartbeat, not _sync's) was taken
    # for dead while its peers could reach Redis: frames for its clients were dropped, unseen, since its
    # deadline passed.  It may only have stopped a while (a pause, a partition from Redis), its clients still
    # connected: p:taken:<id> tells it so when it comes back (TAKEN_KEEP seconds at most).  Only if the reaper's
    # own deadline had not passed: a heartbeat that reaches Redis late (sent into a Redis that froze, or into a
    # partition that healed, and given up on by its instance) vouches for nothing.  The mark is read, not taken
    # away: such a late heartbeat of the marked instance, whose answer goes nowhere, must not take it; the
    # instance takes it away once it has ended its connections ("untaken").  Its value, Redis's time, tells one
    # marking from the next.
    # _sync, which took its own entry away first, passes 1 only if its instance's deadline had not passed by its
    # own clock (it lost its connection, not Redis its state) and 0 at its first registration.
    # ARGV: p, instance, ttl, 1 to mark those it reaps (else 0)
    # -> {1 if the instance was not registered (new, reaped, or Redis restarted), {live instances},
    #     its mark if it had been taken for dead (else nil)}
    "heartbeat": """
local was = redis.call('ZSCORE', p .. ':instances', ARGV[2])
local mark = ARGV[4] == '1' and (not was or tonumber(was) > now)
local added = redis.call('ZADD', p .. ':instances', now + tonumber(ARGV[3]), ARGV[2])
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', p .. ':instances', '-inf', now)) do
  if string.sub(dead, 1, 1) == '~' then
    end_session(string.sub(dead, 2), 'expired')
  else
    reap(dead)
    if mark then redis.call('SET', p .. ':taken:' .. dead, t[1] .. '.' .. t[2], 'EX', TAKEN_KEEP) end
  end
end
return {added, live(), redis.call('GET', p .. ':taken:' .. ARGV[2])}""",
    # Peers this instance waited for after it lost Redis (it refused their frames meanwhile) that did not come
    # back within instance_ttl: it counts them as dead from now on, so they were taken for dead as above.
    # ARGV: p, instances... -> 1
    "taken": """
for i = 2, #ARGV do redis.call('SET', p .. ':taken:' .. ARGV[i], t[1] .. '.' .. t[2], 'EX', TAKEN_KEEP) end
return 1""",
    # This instance ended its connections for its mark (the heartbeat's answer): taken away, unless it is a newer
    # one.  ARGV: p, instance, the mark -> 1
    "untaken": """
local key = p .. ':taken:' .. ARGV[2]
if redis.call('GET', key) == ARGV[3] then redis.call('DEL', key) end
return 1""",
    # ARGV: p, instance
    "reap": "reap(ARGV[2]) return 1",
    # The delivery scripts (relay, all) answer nil when their own instance is not registered:
    # Redis lost its state (restarted empty, flushed) or reaped it, so the directory cannot be trusted.
    # The deliveries the outbox flushes at one moment, in one script: each looked up in the directory (a frame
    # for a client, "send") or in its room's or user's instances ("group"), and every message for one instance
    # published to it as one pub/sub message at the end (kept for a waiting session at once, as deliver()
    # does).  An instance's liveness is read once.
    # ARGV: p, the deliveries as one msgpack array of, for each, "send", its client id, the length of its message
    # or "group", "room:<room>" or "user:<user>", the length of its message, or "direct", an instance, the length
    # of its message; their messages, one after another;
    # own instance (four arguments, not three a delivery: redis-py packs each argument in Python, and Redis's
    # cmsgpack reads no msgpack bin, so the messages are not in the array) -> nil if own is not registered, else
    # each delivery's answer: send -1 no such client, 0 its instance is not listening, 1 kept for its waiting
    # session, or the id of the instance it was published to (the sender may cache it: the sender is made one of
    # the client's watchers, p:client-watch:<client>, told when it moves); direct (a message for the instance
    # named in place of a key, published as it is) 1 heard, 0 not; group {members
    # reached on other instances, live instances with members that were not listening, 1 if the room's
    # instances may be cached (then it is among the room's watchers: see shared()), the other instances}
    "relay": """
local own, run, messages, at = ARGV[4], cmsgpack.unpack(ARGV[2]), ARGV[3], 1
if not redis.call('ZSCORE', p .. ':instances', own) then return false end
local live, queued, order = {}, {}, {}  -- instance -> alive(id); instance -> its messages; instances in order
local function to(id)  -- the queue of messages for instance id, if it is another, live one (else nil)
  if id == own then return nil end
  local known = live[id]
  if known == nil then known = alive(id) or false live[id] = known end
  if not known then return nil end
  local q = queued[id]
  if not q then q = {} queued[id] = q order[#order + 1] = id end
  return q
end
local answers = {}  -- a number, final; an instance id (send), or {reached, {id, members, ...}} (group), until published
local direct = {}  -- answer number -> the instance a direct message was queued for
for i = 1, #run, 3 do
  local key, message = run[i + 1], string.sub(messages, at, at + run[i + 2] - 1)
  at = at + run[i + 2]
  if run[i] == 'send' then
    local id = redis.call('HGET', p .. ':directory', key)
    local q = id and to(id)
    if not q then
      answers[#answers + 1] = -1
    elseif string.sub(id, 1, 1) == '~' then
      answers[#answers + 1] = keep(key, message, false) == 'lost' and -1 or 1
    else
      q[#q + 1] = message
      answers[#answers + 1] = id
      redis.call('SADD', p .. ':client-watch:' .. key, own)
    end
  elseif run[i] == 'direct' then
    local q = to(key)
    answers[#answers + 1] = 0
    if q then
      q[#q + 1] = message
      direct[#answers] = key
    end
  else
    local counts = redis.call('HGETALL', p .. ':' .. key)
    -- A room's instances may be cached by the sender (see shared()) if they are all live instances: not a
    -- waiting session (its frames are kept here), not one dead but not reaped yet (looked up until it is); and
    -- if the sender has members there, whose last one leaving takes it out of the watchers: a publish to a room
    -- with no member here (an API call's, to any name) would leave a p:room-watch:<room> behind for good.
    local answer, cacheable, here = {0, {}}, string.sub(key, 1, 5) == 'room:', false
    for j = 1, #counts, 2 do
      local id, members = counts[j], tonumber(counts[j + 1])
      local q = to(id)
      if id == own then here = true end
      if q and string.sub(id, 1, 1) == '~' then
        keep(string.sub(id, 2), message, false)
        answer[1] = answer[1] + members
        cacheable = false
      elseif q then
        q[#q + 1] = message
        answer[2][#answer[2] + 1] = id
        answer[2][#answer[2] + 1] = members
      elseif id ~= own then
        cacheable = false
      end
    end
    cacheable = cacheable and here
    if cacheable then redis.call('SADD', p .. ':room-watch:' .. string.sub(key, 6), own) end
    answer[3] = cacheable and 1 or 0
    answers[#answers + 1] = answer
  end
end
local heard = {}
for _, id in ipairs(order) do
  if string.sub(id, 1, 1) ~= '~' then heard[id] = publish(id, queued[id]) > 0 end
end
for n, id in pairs(direct) do
  if heard[id] then answers[n] = 1 end
end
for n, answer in ipairs(answers) do
  if type(answer) == 'string' then
    answers[n] = heard[answer] and answer or 0
  elseif type(answer) == 'table' then
    local reached, unheard, sent, others = answer[1], 0, answer[2], {}
    for j = 1, #sent, 2 do
      if heard[sent[j]] then reached = reached + sent[j + 1] else unheard = unheard + 1 end
      others[#others + 1] = sent[j]
    end
    answers[n] = {reached, unheard, answer[3], others}
  end
end
return answers""",
    # A room (each of ARGV[3...]) has members on this instance again, written by _sync: ARGV: p, own, rooms... -> 1
    "shared": "for i = 3, #ARGV do shared(ARGV[i], ARGV[2]) end return 1",
    # ARGV: p, message, own instance -> {clients reached on other instances, live instances not listening}
    "all": """
if not redis.call('ZSCORE', p .. ':instances', ARGV[3]) then return false end
for _, id in ipairs(live()) do
  if id ~= ARGV[3] then deliver(id, ARGV[2], redis.call('HLEN', p .. ':instance:' .. id .. ':clients')) end
end
return {reached, unheard}""",
    # ARGV: p, "room" or "user", its name, own instance, members here, a client id, 1 if that client is a
    #       member now (else 0) -> {members on every live instance, watchers of the room told it is shared}
    "members": """
local key = p .. ':' .. ARGV[2] .. ':' .. ARGV[3]
local names = p .. ':instance:' .. ARGV[4] .. ':' .. ARGV[2] .. 's'
if ARGV[7] == '1' then
  redis.call('ZADD', p .. ':' .. ARGV[2] .. '-ids:' .. ARGV[3], 0, ARGV[6])
else
  redis.call('ZREM', p .. ':' .. ARGV[2] .. '-ids:' .. ARGV[3], ARGV[6])
end
if tonumber(ARGV[5]) > 0 then
  if redis.call('HSET', key, ARGV[4], ARGV[5]) == 1 and ARGV[2] == 'room' then shared(ARGV[3], ARGV[4]) end
  redis.call('SADD', names, ARGV[3])
  if ARGV[2] == 'room' then redis.call('ZADD', p .. ':rooms', 0, ARGV[3]) end
else
  drop_instance(ARGV[2], ARGV[3], ARGV[4])
  redis.call('SREM', names, ARGV[3])
end
local members = 0
local counts = redis.call('HGETALL', key)
for i = 1, #counts, 2 do
  if alive(counts[i]) then members = members + tonumber(counts[i + 1]) end
end
return {members, notified}""",
    # The listings, a page at a time (see page()).  Each costs Redis the page's entries, and a count: the
    # live instances (list), the instances with members (group_members), or nothing (rooms).
    # ARGV: p, after, limit, max_bytes -> a page of the JSON entries of the clients on live instances
    "list": """
local count = 0
for _, id in ipairs(live()) do count = count + redis.call('HLEN', p .. ':instance:' .. id .. ':clients') end
return page(count, p .. ':clients', ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), client_entry)""",
    # ARGV: p, "room" or "user", its name, after, limit, max_bytes -> a page of the JSON entries of its
    # members on live instances
    "group_members": """
local count = 0
local counts = redis.call('HGETALL', p .. ':' .. ARGV[2] .. ':' .. ARGV[3])
for i = 1, #counts, 2 do
  if alive(counts[i]) then count = count + tonumber(counts[i + 1]) end
end
return page(count, p .. ':' .. ARGV[2] .. '-ids:' .. ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]),
            client_entry)""",
    # ARGV: p, after, limit, max_bytes -> a page of room, members, room, members...: the rooms with members on
    # a live instance.  Its count is every room with a p:room:<room>: one whose members were all on a dead
    # instance counts until that instance is reaped.
    "rooms": """
return page(redis.call('ZCARD', p .. ':rooms'), p .. ':rooms', ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
            function(room)
  local total = 0
  local counts = redis.call('HGETALL', p .. ':room:' .. room)
  for i = 1, #counts, 2 do
    if alive(counts[i]) then total = total + tonumber(counts[i + 1]) end
  end
  return total > 0 and tostring(total)
end, true)""",
    # Connection recovery.  ARGV: p, client id, its entry (JSON, with rooms and user), the members left here
    # of its rooms and user (JSON {"rooms": {room: n}, "user": n}), token hash, window (s), base, away_at,
    # max_frames, max_bytes, size (unused: the script counts), who waits for it ("" none), 1 if sealed
    # already, max_memory, its kept frames..., own instance
    # -> 1 parked, 0 it was not this instance's (Redis lost it): it is not kept.  The marker ("parked",
    # client) on our own channel comes after every delivery that was on its way to it here.
    "park": """
local client, own = ARGV[2], ARGV[#ARGV]
local home = '~' .. client
if redis.call('HGET', p .. ':directory', client) ~= own then return 0 end
local entry, left = cjson.decode(ARGV[3]), cjson.decode(ARGV[4])
redis.call('HSET', p .. ':directory', client, home)
moved(client, own)
redis.call('HDEL', p .. ':instance:' .. own .. ':clients', client)
redis.call('HSET', p .. ':instance:' .. home .. ':clients', client, ARGV[3])
local function move(kind, name, members_left)
  add_member(kind, name, client, home)
  if members_left > 0 then
    redis.call('HSET', p .. ':' .. kind .. ':' .. name, own, members_left)
  else
    drop_instance(kind, name, own)
    redis.call('SREM', p .. ':instance:' .. own .. ':' .. kind .. 's', name)
  end
end
for _, room in ipairs(entry.rooms) do move('room', room, tonumber(left.rooms[room]) or 0) end
if type(entry.user) == 'string' then move('user', entry.user, tonumber(left.user) or 0) end
redis.call('ZADD', p .. ':instances', now + tonumber(ARGV[6]), home)
local session = p .. ':session:' .. client
redis.call('DEL', session, p .. ':kept:' .. client)
redis.call('HSET', session, 'token', ARGV[5], 'parker', own, 'sealed', ARGV[13], 'base', ARGV[7], 'away_at', ARGV[8],
           'max_frames', ARGV[9], 'max_bytes', ARGV[10], 'size', 0, 'max_memory', ARGV[14])
if ARGV[12] ~= '' then redis.call('HSET', session, 'waiter', ARGV[12]) end
local size = 0
for i = 15, #ARGV - 1 do
  redis.call('RPUSH', p .. ':kept:' .. client, ARGV[i])
  size = size + #ARGV[i]
end
redis.call('HSET', session, 'size', size)
redis.call('ZADD', p .. ':instance:' .. own .. ':parked', now, client)
publish(own, {pack('parked', {client_id = client})})
charge(own, size, tonumber(ARGV[14]))
return 1""",
    # A client of this instance left: out of the directory, and its watchers told.  ARGV: p, client id, own -> 1
    "gone": """
if redis.call('HGET', p .. ':directory', ARGV[2]) == ARGV[3] then
  redis.call('HDEL', p .. ':directory', ARGV[2])
  moved(ARGV[2], ARGV[3])
end
return 1""",
    # ARGV: p, client id, a msgpack-encoded delivery that was on its way to it, own instance -> 1
    "keep": "keep(ARGV[2], ARGV[3], true) return 1",
    # ARGV: p, client id, reason, own instance -> 1
    "end": "if redis.call('EXISTS', p .. ':session:' .. ARGV[2]) == 1 then end_session(ARGV[2], ARGV[3]) end return 1",
    # Every delivery on its way to the parker has been kept: it may be resumed.  ARGV: p, client id, own
    "seal": """
local session = p .. ':session:' .. ARGV[2]
if redis.call('EXISTS', session) == 0 then return 0 end
local pending = p .. ':pending:' .. ARGV[2]
for _, frame in ipairs(redis.call('LRANGE', pending, 0, -1)) do redis.call('RPUSH', p .. ':kept:' .. ARGV[2], frame) end
redis.call('DEL', pending)
redis.call('HSET', session, 'sealed', 1)
local waiter = redis.call('HGET', session, 'waiter')
if waiter then publish(waiter, {pack('sealed', {client_id = ARGV[2]})}) end
return 1""",
    # ARGV: p, instance, message, own instance -> 1: a control message to one instance
    "tell": "publish(ARGV[2], {ARGV[3]}) return 1",
    # ARGV: p, user, before, expires (Unix times, s), own instance -> 1.  Kept as p:revoked:<user> until it
    # expires (read by instances as they join), and told to every live one.
    "revoke": """
local expires = tonumber(ARGV[4])
redis.call('SET', p .. ':revoked:' .. ARGV[2], ARGV[3], 'PXAT', math.ceil(expires * 1000))
local message = pack('revoked', {user = ARGV[2], before = tonumber(ARGV[3]), expires = expires})
for _, id in ipairs(live()) do
  if string.sub(id, 1, 1) ~= '~' then publish(id, {message}) end
end
return 1""",
    # What a resume token would take; with "claim", it is held for this instance for a few seconds, so
    # that one concurrent resume wins.  The token spent last is as good while the session waits (its
    # client may never have had the next one).  ARGV: p, client id, token hash, "claim" or "look", own
    # instance -> {"parked", entry} | {"unsealed"} (we are told when it is) | {"open", instance}
    #           | {"reused"} | {"none"}
    "peek": """
local client, own = ARGV[2], ARGV[#ARGV]
local id = redis.call('HGET', p .. ':directory', client)
local used = redis.call('GET', p .. ':used:' .. client) == ARGV[3]
if not id or not alive(id) then return {'none'} end
if string.sub(id, 1, 1) ~= '~' then return used and {'reused'} or {'open', id} end
local session = p .. ':session:' .. client
local s = redis.call('HMGET', session, 'token', 'sealed')
if s[1] ~= ARGV[3] and not used then return {'none'} end
if s[2] ~= '1' then redis.call('HSET', session, 'waiter', own) return {'unsealed'} end
if ARGV[4] == 'claim' and not redis.call('SET', p .. ':claiming:' .. client, own, 'NX', 'EX', 3) then
  return {'reused'}
end
return {'parked', redis.call('HGET', p .. ':instance:' .. id .. ':clients', client)}""",
    # Take a parked session: its memberships move here, its token is spent.  ARGV: p, client id, token
    # hash, its new entry, window (s), own instance -> {"ok", base, away_at, frames...}, or {"gone"} if
    # it is not there (ended, or taken).  The marker ("resumed", client) on our channel follows every
    # delivery routed here for it before, which its list holds.
    "resume": """
local client, own = ARGV[2], ARGV[#ARGV]
local home = '~' .. client
local session = p .. ':session:' .. client
local s = redis.call('HMGET', session, 'token', 'sealed', 'base', 'away_at', 'parker', 'size')
local token_ok = s[1] == ARGV[3] or redis.call('GET', p .. ':used:' .. client) == ARGV[3]
if redis.call('HGET', p .. ':directory', client) ~= home or not alive(home) or not token_ok or s[2] ~= '1'
    or redis.call('GET', p .. ':claiming:' .. client) ~= own then
  return {'gone'}
end
for _, kind in ipairs({'room', 'user'}) do
  for _, name in ipairs(redis.call('SMEMBERS', p .. ':instance:' .. home .. ':' .. kind .. 's')) do
    add_member(kind, name, client, own)
  end
end
redis.call('HSET', p .. ':directory', client, own)
moved(client, home)
redis.call('ZADD', p .. ':clients', 0, client)  -- there since it connected; as the directory, written anew
redis.call('HSET', p .. ':instance:' .. own .. ':clients', client, ARGV[4])
local frames = redis.call('LRANGE', p .. ':kept:' .. client, 0, -1)
-- reap() would take the memberships just moved: drop the parked instance's own keys only.
for _, kind in ipairs({'room', 'user'}) do
  local names = p .. ':instance:' .. home .. ':' .. kind .. 's'
  for _, name in ipairs(redis.call('SMEMBERS', names)) do drop_instance(kind, name, home) end
  redis.call('DEL', names)
end
release(client, s[5], s[6])
redis.call('DEL', p .. ':instance:' .. home .. ':clients', session, p .. ':kept:' .. client,
           p .. ':pending:' .. client, p .. ':claiming:' .. client)
redis.call('ZREM', p .. ':instances', home)
redis.call('SET', p .. ':used:' .. client, ARGV[3], 'EX', math.ceil(tonumber(ARGV[5])))
publish(own, {pack('resumed', {client_id = client})})
if s[5] then
  publish(s[5], {pack('ended', {client_id = client, reason = 'resumed'})})
end
local answer = {'ok', s[3], s[4]}
for _, frame in ipairs(frames) do answer[#answer + 1] = frame end
return answer""",
    # ARGV: p, client id -> its JSON entry, if its instance is live
    "get": """
local id = redis.call('HGET', p .. ':directory', ARGV[2])
if not id or not alive(id) then return false end
return redis.call('HGET', p .. ':instance:' .. id .. ':clients', ARGV[2])""",
}


class _Member(msgspec.Struct):
    """A room's member, as ``GET /api/rooms/<room>`` lists it, from its client's entry."""

    client_id: str
    user: str | None = None


_decode_member = msgspec.json.Decoder(_Member).decode


def _ignore(result: Any) -> None:
    pass


def _array_head(length: int) -> bytes:
    """The head of a msgpack array of ``length`` items (as the scripts' publish() writes it)."""
    if length < 16:
        return bytes((0x90 + length,))
    return b"\xdc" + length.to_bytes(2, "big") if length < 65536 else b"\xdd" + length.to_bytes(4, "big")


def _not_sent(result: Any, client_id: str) -> tuple[str, str]:
    """The error code and message a frame for ``client_id`` of another instance is refused with, given the
    answer that was not 1 (a BackendUnavailable: may have missed it; else: connected nowhere)."""
    if isinstance(result, BackendUnavailable):
        return BACKEND_UNAVAILABLE, f"{result}; {client_id!r} may have missed this frame"
    return UNKNOWN_CLIENT, f"no client with id {client_id!r}"


def _room_missed(problem: Any, room: str) -> str:
    return f"{problem}; members of {room!r} on other instances may have missed this frame"


class _Refusal:
    """What the outbox tells the sender of a frame for a client of another instance, given the frame's answer:
    nothing if it was sent (1), else why not, as a local relay does (``failed(*about, code, message)``)."""

    __slots__ = ("about", "client_id", "failed")

    def __init__(self, failed: Callable[..., None], about: tuple[Any, ...], client_id: str) -> None:
        self.failed, self.about, self.client_id = failed, about, client_id

    def __call__(self, result: Any) -> None:
        if result != 1:
            self.failed(*self.about, *_not_sent(result, self.client_id))


class _RoomRefusal:
    """What a room frame sent to the room's cached instances tells its sender if any did not hear it: once, counted
    once (the outbox calls it with each instance's answer, a BackendUnavailable for one that did not)."""

    __slots__ = ("about", "backend", "failed", "room", "told")

    def __init__(self, backend: RedisBackend, failed: Callable[..., None], about: tuple[Any, ...], room: str) -> None:
        self.backend, self.failed, self.about, self.room, self.told = backend, failed, about, room, False

    def __call__(self, result: Any) -> None:
        if not isinstance(result, BackendUnavailable) or self.told:
            return
        self.told = True
        self.backend.dropped[result.reason] += 1
        self.backend._rooms_at.pop(self.room, None)  # looked up again
        self.failed(*self.about, BACKEND_UNAVAILABLE, _room_missed(result, self.room))


async def _batches(items: AsyncIterator[bytes], size: int) -> AsyncIterator[list[bytes]]:
    batch: list[bytes] = []
    async for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _group_key(delivery: _ToGroup) -> str:
    """The Redis key (after the prefix) of the instances holding a delivery's room or user."""
    return f"room:{delivery.room}" if isinstance(delivery, _ToRoom) else f"user:{delivery.user}"


def _sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any], dict[str, Any]]:
    """A ``redis+sentinel://`` (or, TLS to every node, ``rediss+sentinel://``) URL,
    ``[[user]:password@]host[:port][,host[:port]...]/service[/db][?option=value&...]``: the sentinels, the
    service's name, the keyword arguments of the connections to its primary (the password, the db, and the
    options of a ``redis://`` URL, as redis-py reads them), and those of the connections to the sentinels
    (``sentinel_username`` and ``sentinel_password`` from the query, TLS as for the primary).
    ValueError, naming the setting and the value, if it is not such a URL."""
    scheme, rest = _url_scheme(url), url.partition("://")[2]
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    userinfo, _, hosts = netloc.rpartition("@")
    sentinels: list[tuple[str, int]] = []
    for host in hosts.split(","):
        name, colon, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        name, port = (name, port) if colon else (host, str(SENTINEL_PORT))
        if not name.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"redis_url must name each sentinel as host or host:port, but got {host!r}")
        sentinels.append((name.strip("[]"), int(port)))
    service, _, db = path.partition("/")
    if not service or "/" in db or not (db == "" or db.isdigit()):
        raise ValueError(f"redis_url must end in /service or /service/db after its sentinels, but got {'/' + path!r}")
    # The primary's options are those of a redis:// URL: let redis-py read them, on a stand-in host.
    stand_in = f"{'rediss' if scheme == 'rediss+sentinel' else 'redis'}://{userinfo + '@' if userinfo else ''}" \
               f"localhost/{db or 0}{'?' + query if query else ''}"
    try:
        primary: dict[str, Any] = dict(parse_url(stand_in))
    except ValueError as exc:  # an option's value: "Invalid value for 'db' in connection URL."
        raise ValueError(f"redis_url: {exc}") from None
    for key in ("host", "port", "connection_class"):
        primary.pop(key, None)
    tls = {key: value for key, value in primary.items() if key.startswith("ssl_")}
    if scheme == "rediss+sentinel":
        primary["ssl"] = tls["ssl"] = True  # the pool picks its TLS connection class from this
    to_sentinels: dict[str, Any] = {**tls, **{key[len("sentinel_"):]: primary.pop(key) for key in
                                              ("sentinel_username", "sentinel_password") if key in primary}}
    return sentinels, service, primary, to_sentinels


def _clients(settings: Settings) -> tuple[Any, Any, Any]:
    """The client for commands, the client for the subscription, and the Sentinel they follow (or None).

    Both clients fail fast and let the supervisor reconnect: redis-py's own retries would stall a read loop.
    Subscribed, a quiet channel is normal: no read timeout (older redis-py applies it to listen()); a dead
    connection shows in the heartbeat, which ends the session."""
    assert settings.redis_url is not None
    timeout = settings.redis_timeout
    options: dict[str, Any] = {"socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0)}
    if _url_scheme(settings.redis_url) not in SENTINEL_SCHEMES:
        return (redis.asyncio.Redis.from_url(settings.redis_url, socket_timeout=timeout, **options),
                redis.asyncio.Redis.from_url(settings.redis_url, socket_timeout=None, **options), None)
    # Each connection asks the sentinels for the primary when it connects: after a failover, the
    # supervisor's reconnection finds the new one.
    sentinels, service, primary, to_sentinels = _sentinel_url(settings.redis_url)
    sentinel = Sentinel(sentinels, sentinel_kwargs={**to_sentinels, "socket_timeout": timeout, **options},
                        **primary)
    return (sentinel.master_for(service, socket_timeout=timeout, **options),
            sentinel.master_for(service, socket_timeout=None, **options), sentinel)


class RedisBackend(_Backend):
    """Several gateway instances sharing one registry over Redis; docs/cluster.md has the design.

    Each instance publishes what belongs to another on that instance's channel,
    found through a directory of client -> instance.  Delivery is at most once,
    and no loss is silent: it is counted, and a sender gets ``backend_unavailable``.
    """

    def __init__(self, registry: Registry, settings: Settings) -> None:
        if _REDIS_MISSING is not None:
            raise _not_installed("redis_url", "redis-py", "'redis[hiredis]'", "redis", _REDIS_MISSING)
        assert settings.redis_url is not None
        self.registry = registry
        self.settings = settings
        self.instance = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.available = False
        self.started = False  # whether running() ever ran: without it (no lifespan), Redis is never reached
        self._said_unreachable = False  # that Redis cannot be reached, said once until it is
        # Deliveries from other instances, and those lost (pub/sub is at-most-once).
        self.received = 0
        self.dropped = collections.Counter(dict.fromkeys(CLUSTER_DROP_REASONS, 0))
        self._errors = (RedisError, OSError)
        self.redis, self._subscriber, self._sentinel = _clients(settings)
        self._scripts = {name: self.redis.register_script(_LUA_PRELUDE + body) for name, body in _LUA.items()}
        self._scripts["notice"] = self._scripts["tell"]  # a tell about frames, not one: not counted if lost
        # Not the p:instance:<id> of 0.1.0, whose deliveries were laid out otherwise: mixed versions do not
        # misread each other, they find each other not listening (counted, and answered backend_unavailable).
        self._channel = f"{settings.redis_prefix}:deliveries:{self.instance}"
        self._clients_key = f"{settings.redis_prefix}:instance:{self.instance}:clients"
        self._tasks: TaskGroup | None = None
        self._session: anyio.CancelScope | None = None  # the current connection's, cancelled on failure
        self._outbox: list[tuple[str, tuple[Any, ...], Callable[[Any], None]]] = []
        self._outbox_ready: anyio.Event | None = None  # events need the event loop: made in running()
        self._outbox_drained: anyio.Event
        # Connection recovery: sessions parked by this instance, until they end (to tell of it), and of
        # those, the ones whose marker has not come back (deliveries for them here go to Redis too);
        # sessions resumed here whose marker has not come (earlier deliveries are in their lists); resumes
        # waiting for a session to be sealed; and clients an instance waits for us to park.
        self._parked: dict[str, _Connection] = {}
        self._parking: dict[str, _Connection] = {}
        self._resuming: set[str] = set()
        self._sealed: dict[str, anyio.Event] = {}
        self._takeovers: dict[str, str] = {}
        self._peers: set[str] = set()  # other instances alive at the last heartbeat
        # Registry.join/leave asked of other instances: request -> set when answered, and the outcome.
        self._memberships: dict[int, tuple[anyio.Event, list[int]]] = {}
        self._membership_requests = itertools.count()
        self._missing: set[str] = set()  # peers not registered again since Redis lost their state
        # Rooms whose instances Redis found all live, which made this instance a watcher of the room: the other
        # instances with members, none if they are all here.  Until it is told otherwise (_RoomShared) or loses
        # Redis, its members' frames stay here (none) or are published to those instances without a lookup.  Only
        # rooms with members here (forgotten as they leave).  ``_shares`` counts the rooms it was told of, so that
        # an answer from Redis that crossed such a message is not taken.
        self._rooms_at: dict[str, tuple[str, ...]] = {}
        self._shares = 0
        # Rooms this instance's joins made shared, while the watchers told of it have not all said they know:
        # how many still have to, and set when none has.  Joins to such a room wait for it (room_changed).
        self._sharing: dict[str, tuple[anyio.Event, list[int]]] = {}
        self._missing_until = 0.0  # time.monotonic() after which they count as dead
        # Clients of other instances -> their instance, learnt from the relay script's answers (which made this
        # instance one of the client's watchers): frames for them are published there without the script until
        # the directory says the client moved (_Moved), or the instance is not listening.  ``_moves`` counts the
        # _Moved messages (and Redis losses), so that an answer that crossed one is not learnt.
        self._where: dict[str, str] = {}
        self._moves = 0
        self.direct = 0  # frames sent on a cached entry (ws_micro_cluster_direct_total)
        # Clients fenced after a move: number of the fence, frames held for them (outbox entries, in order), and
        # the timer that releases them after FENCE_WAIT; ``_held`` counts the frames of all.
        self._fenced: dict[str, tuple[int, list[tuple[str, tuple[Any, ...], Callable[[Any], None]]],
                                      asyncio.TimerHandle]] = {}
        self._held = 0
        self._expired: list[tuple[str, int]] = []  # fences past FENCE_WAIT, for the flush task to release
        self._fences = itertools.count()
        # How a sender is told its frame was refused (the gateway's, from forward()): for _Undelivered.
        self._failed: Callable[..., None] | None = None
        # The run_id of the Redis server this instance last wrote its state to: another one (a replica promoted
        # by a failover, or the same address restarted) may lack the newest writes of every instance.
        self._server: str | None = None
        self.new_primaries = 0  # times that happened
        self.taken_for_dead = 0  # times this instance came back after the others had taken it for dead
        self._taken_mark: bytes | None = None  # the last mark it ended its connections for (see _taken_for_dead)
        self._to_mark: set[str] = set()  # peers counted dead after a resync, not yet marked taken for dead in Redis
        self._alive_until = 0.0  # time.monotonic() by which this instance's deadline in Redis passes, at the earliest

    # Running

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Keep this instance in the cluster while the app runs; leave it cleanly at shutdown."""
        self.started = True
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            self._outbox_ready, self._outbox_drained = anyio.Event(), anyio.Event()
            tasks.start_soon(self._supervise)
            tasks.start_soon(self._flush)
            try:
                yield
            finally:
                # Sessions parked as the server closed their connections (recovery): onto Redis first.
                with anyio.move_on_after(self.settings.redis_timeout):
                    while self._outbox and self.available:
                        await self._outbox_drained.wait()
                tasks.cancel_scope.cancel()
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.redis_timeout):
                    with contextlib.suppress(BackendUnavailable):  # then the others reap us by deadline
                        await self._script("reap", self.instance)
                    await self.redis.aclose()
                    await self._subscriber.aclose()
                    for sentinel in self._sentinel.sentinels if self._sentinel is not None else ():
                        await sentinel.aclose()
                self._tasks = None

    async def _supervise(self) -> None:
        delay = 0.1
        while True:
            self._session = anyio.CancelScope()
            with self._session:
                try:
                    async with self._subscriber.pubsub() as pubsub:
                        await pubsub.subscribe(self._channel)
                        await self._sync()
                        if not self.available:
                            logger.info("cluster: instance %s joined over Redis", self.instance)
                        self.available, delay, self._said_unreachable = True, 0.1, False
                        async with anyio.create_task_group() as tasks:
                            tasks.start_soon(self._heartbeat)
                            await self._listen(pubsub)
                except* (*self._errors, BackendUnavailable) as failure:
                    if self.available:
                        logger.warning("cluster: Redis unavailable (%s); retrying", failure.exceptions[0])
                    elif not self._said_unreachable:  # at startup, or after the outage said above: once
                        logger.warning("cluster: cannot reach Redis (%s); retrying, and meanwhile only clients "
                                       "on this instance can be reached", failure.exceptions[0])
                    self._said_unreachable = True
            self._forget_cached()
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)

    @property
    def resyncing(self) -> bool:
        """Whether peers that Redis lost may still be registering again (docs/cluster.md: the resync window)."""
        return bool(self._missing) and time.monotonic() < self._missing_until

    @property
    def instances(self) -> int:
        """The live instances this one saw at its last heartbeat, itself included."""
        return len(self._peers) + 1

    def _lost(self) -> None:
        """A command failed: stop the session, so the supervisor reconnects and writes our state again."""
        self._forget_cached()
        if self._session is not None:
            self._session.cancel()

    def _forget_cached(self) -> None:
        """Redis is lost: no room's instances and no client's instance are known (see _forget_routes)."""
        self.available = False
        self._forget_routes()

    def _forget_routes(self) -> None:
        """Redis is lost, or its state may be (writing ours again): a watcher's _RoomShared, or _Moved, may have
        been lost with it, so no room's instances and no client's instance are known; an answer from before is not
        taken."""
        self._rooms_at.clear()
        self._shares += 1
        self._where.clear()
        self._moves += 1

    async def _heartbeat(self) -> None:
        while True:
            # While peers are registering again, frames for them are refused: look for them often.
            await anyio.sleep(min(self.settings.heartbeat_interval, RESYNC_POLL) if self._missing
                              else self.settings.heartbeat_interval)
            sent = time.monotonic()
            added, live, taken = await self._script("heartbeat", self.instance, self.settings.instance_ttl, 1)
            self._alive_until = sent + self.settings.instance_ttl
            if added:
                logger.warning("cluster: instance %s had been dropped from Redis; registering again",
                               self.instance)
                await self._sync()  # before _saw(): the peers we knew are those Redis may have lost; reads the mark
                continue
            if taken:
                await self._taken_for_dead(taken)
            self._to_mark |= self._saw(live, await self._synced(self._missing))
            if self._to_mark:  # kept until written: a failure here ends the session, and the next one writes them
                await self._script("taken", *self._to_mark)
                self._to_mark.clear()

    async def _synced(self, peers: Collection[str]) -> set[str]:
        """Those of these peers that have written their state to the Redis server this instance wrote its own to."""
        if not peers:
            return set()
        names = sorted(peers)
        servers = await self._call(self.redis.hmget(f"{self.settings.redis_prefix}:synced", names))
        return {peer for peer, server in zip(names, servers, strict=True)
                if server is not None and server.decode() == self._server}

    def _saw(self, live: Sequence[bytes], back: Collection[str] = ()) -> set[str]:
        """Note the instances alive now, and the peers ``back``: once every missing peer is, the resynchronising
        window ends.  The missing peers counted as dead from now on (not back within instance_ttl)."""
        self._peers = {instance.decode() for instance in live if not instance.startswith(b"~")} - {self.instance}
        for dead in set(self._where.values()) - self._peers:  # its clients are elsewhere now, or nowhere
            self._forget_instance(dead)
        if self._missing:
            self._missing -= set(back)
            if not self._missing:
                logger.info("cluster: every instance is registered again")
            elif time.monotonic() >= self._missing_until:
                logger.warning("cluster: instance(s) %s did not register again within instance_ttl; "
                               "counting them as dead", ", ".join(sorted(self._missing)))
                gone, self._missing = self._missing, set()
                return gone
        return set()

    async def _taken_for_dead(self, mark: bytes) -> None:
        """The others took this instance for dead (``mark``, read from p:taken:<id>: it stopped, or was cut off
        from Redis, for longer than instance_ttl, while they could reach Redis), and dropped the frames for its
        clients meanwhile: a room's frames missed its members here, unseen.  Its connections end, as if it had
        died (1012: clients connect again; sessions end, so that a resume says ``recovered: false``), and nothing
        was lost unseen.  Once a mark: it stays in Redis until "untaken" has run."""
        if mark != self._taken_mark:
            self._taken_mark = mark
            self._kick_taken()
        # Not through _call: in _sync, this instance is not available yet; a failure ends the session as there.
        await self._scripts["untaken"](args=(self.settings.redis_prefix, self.instance, mark))

    def _kick_taken(self) -> None:
        registry = self.registry
        self.taken_for_dead += 1
        logger.warning("cluster: instance %s had been taken for dead by the others (stopped, or cut off from Redis, "
                       "for longer than instance_ttl, %gs), which dropped the frames for its clients meanwhile; "
                       "closing its %d connection(s) with 1012 so that they connect again",
                       self.instance, self.settings.instance_ttl, len(registry._connections))
        registry._kick(list(registry._connections), 1012, TAKEN_FOR_DEAD, label="taken_for_dead")

    async def _sync(self) -> None:
        """Write this instance's whole state (its clients and rooms), replacing whatever Redis had.

        The same whether Redis restarted empty, was flushed, or is another server (a replica Sentinel promoted,
        which may lack the newest writes): every instance writes its state again, and until the peers seen
        alive have (each notes in ``p:synced`` the server it wrote to, by its run_id), frames that may be for
        them are refused (the resynchronising window)."""
        prefix = self.settings.redis_prefix
        server = str((await self.redis.info("server"))["run_id"])
        known = sorted(self._peers | (self._missing if self.resyncing else set()))
        self._forget_routes()
        async with self.redis.pipeline(transaction=True) as pipe:
            await self._scripts["reap"](args=(prefix, self.instance), client=pipe)
            sent = time.monotonic()
            vouch = int(sent < self._alive_until)  # see the heartbeat script: whether it may mark those it reaps
            await self._scripts["heartbeat"](args=(prefix, self.instance, self.settings.instance_ttl, vouch),
                                             client=pipe)
            connections = list(self.registry._connections.values())
            if connections:
                pipe.hset(f"{prefix}:directory", mapping={c.id: self.instance for c in connections})
                pipe.zadd(f"{prefix}:clients", dict.fromkeys((c.id for c in connections), 0))
                pipe.hset(self._clients_key, mapping={c.id: self._entry(c) for c in connections})
            if self.registry._rooms:
                pipe.zadd(f"{prefix}:rooms", dict.fromkeys(self.registry._rooms, 0))
            for kind, groups in (("room", self.registry._rooms), ("user", self.registry._users)):
                for name, members in groups.items():
                    pipe.hset(f"{prefix}:{kind}:{name}", self.instance, len(members))
                    pipe.zadd(f"{prefix}:{kind}-ids:{name}", dict.fromkeys(members, 0))
                    pipe.sadd(f"{prefix}:instance:{self.instance}:{kind}s", name)
            if self.registry._rooms:  # instances that found them alone since Redis lost our state: not now
                await self._scripts["shared"](args=(prefix, self.instance, *self.registry._rooms), client=pipe)
            pipe.hset(f"{prefix}:synced", self.instance, server)
            if known:
                pipe.hmget(f"{prefix}:synced", known)
            results = await pipe.execute()
        self._alive_until = sent + self.settings.instance_ttl
        if self._server is not None and server != self._server:
            self.new_primaries += 1
            logger.warning("cluster: Redis is another server than before (a failover, or a restart); "
                           "instance %s wrote its state again", self.instance)
            await self._recheck_sessions()
        self._server = server
        # Peers we saw alive that have not written their state to this server may be reconnecting, as we did:
        # until they are back (or instance_ttl has passed), frames that may be for them are refused, not lost.
        await self._load_revocations()
        synced = dict(zip(known, results[-1], strict=True)) if known else {}
        missing = {peer for peer in known if synced[peer] is None or synced[peer].decode() != server}
        self._saw(results[1][1])
        if results[1][2]:
            await self._taken_for_dead(results[1][2])
        if missing:
            self._missing = missing
            self._missing_until = time.monotonic() + self.settings.instance_ttl
            logger.warning("cluster: waiting up to %gs for instance(s) %s to register again; "
                           "until then frames that may be for them fail with backend_unavailable",
                           self.settings.instance_ttl, ", ".join(sorted(self._missing)))

    async def _recheck_sessions(self) -> None:
        """On a new server: the sessions this instance parked that it lacks end (abnormal: the client's resume
        finds nothing, and the backend and the session's rooms are told), and those whose seal marker was on
        its way are sealed now, as at a shutdown: what was on its way to them is lost with the old server."""
        parked = list(self._parked)
        if not parked:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for client_id in parked:
                if client_id in self._parking:  # 0 if it has no session there
                    await self._scripts["seal"](args=(self.settings.redis_prefix, client_id, self.instance),
                                                client=pipe)
                else:
                    pipe.exists(f"{self.settings.redis_prefix}:session:{client_id}")
            found = await pipe.execute()
        for client_id, there in zip(parked, found, strict=True):
            self._parking.pop(client_id, None)
            if not there:
                self._session_over(client_id, "abnormal")

    async def _load_revocations(self) -> None:
        """Take the revocations other instances made (while this one was away, or before it started)."""
        prefix = f"{self.settings.redis_prefix}:revoked:"
        async for batch in _batches(self.redis.scan_iter(match=f"{prefix}*", count=1000), 1000):
            keys = [key.decode() for key in batch]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(key)
                    pipe.pexpiretime(key)
                results = await pipe.execute()
            for key, before, expires in zip(keys, results[::2], results[1::2], strict=True):
                if before is not None and expires > 0:  # else it expired meanwhile
                    self.registry._revoke_here(key[len(prefix):], float(before), expires / 1000)

    async def revoke(self, user: str, before: float, until: float) -> None:
        await self._request("revoke", user, before, until)

    async def membership(self, client_id: str, room: str, *, join: bool) -> bool:
        request = next(self._membership_requests)
        answered, outcome = self._memberships[request] = anyio.Event(), []
        try:
            # The send script finds the client's instance, as for a frame: -1 if it is connected nowhere, or
            # its session waits in Redis (away); 0 (BackendUnavailable) if that instance is not listening.
            asked = _Membership(client_id, room, join, self.instance, request)
            if await self._request("send", client_id, _encode_delivery(asked)) != 1:
                return False
            with anyio.move_on_after(self.settings.redis_timeout):
                await answered.wait()
        finally:
            del self._memberships[request]
        if not outcome:
            self.dropped["no_subscriber"] += 1
            raise BackendUnavailable(f"the instance of client {client_id!r} did not answer within redis_timeout; "
                                     f"it may or may not have {'joined' if join else 'left'} room {room!r}",
                                     "no_subscriber")
        if outcome[0] == -1:
            raise ValueError(_too_many_rooms(client_id, room, self.settings.max_rooms_per_connection))
        return outcome[0] == 1

    async def _answer_membership(self, asked: _Membership) -> None:
        """Do a join or leave another instance asked for one of our clients, and tell it how it went."""
        try:
            found = await self.registry._member_here(asked.client_id, asked.room, join=asked.join)
            outcome = 1 if found else 0
        except ValueError:
            outcome = -1
        except Exception:  # a bug: this task's failure must not end the cluster's task group
            logger.exception("cluster: failed to %s client %s to room %r for instance %s",
                             "join" if asked.join else "remove", asked.client_id, asked.room, asked.requester)
            outcome = 0
        self._enqueue("tell", (asked.requester, _encode_delivery(_MembershipDone(asked.request, outcome))), _ignore)

    async def _listen(self, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            try:
                deliveries = _decode_deliveries(message["data"])
            except msgspec.MsgspecError:
                logger.warning("cluster: ignored a message on %s that is not ws_micro's", self._channel)
                continue
            with self.registry._together():  # a connection's frames in this message: one write
                for delivery in deliveries:
                    if isinstance(delivery, _Direct):
                        self._direct(delivery)
                        continue
                    if isinstance(delivery, _Control):
                        self._control(delivery)
                        continue
                    self.received += 1
                    if self._parking and self._divert(delivery):
                        continue
                    if not self.registry._deliver_here(delivery, self._resuming):
                        self.dropped["gone"] += 1

    # Sessions (connection recovery; docs/recovery.md, "In cluster mode")

    def park(self, connection: _Connection) -> bool:
        """Move an away connection's session to Redis (see the "park" script), soon; False while Redis is
        away: then it waits here, and can be resumed here only."""
        if not self.available or self._outbox_ready is None:
            return False
        # Soon, not now: the delivery whose write found the connection dead queues its script first, so the
        # frame is in the session's kept frames once, not also sent on to it by that script.
        asyncio.get_running_loop().call_soon(self._park, connection)
        return True

    def _park(self, connection: _Connection) -> None:
        registry, session = self.registry, connection.session
        if registry._connections.get(connection.id) is not connection or not connection.away or session is None:
            return  # resumed here, or ended, meanwhile
        if not self.available:
            registry._wait_here(connection)
            return
        rooms_left, user_left = registry._forget(connection)  # the members left here of its rooms and user
        for room in rooms_left:  # a member waits in Redis now: the park script tells us too
            self._rooms_at.pop(room, None)
        left = {"rooms": rooms_left, "user": user_left}
        settings = self.settings
        client_id = connection.id

        def done(result: Any) -> None:
            if result != 1:  # not kept: the session is over
                self._session_over(client_id, "abnormal")

        # The server is stopping (a rolling restart): what is on its way here is lost anyway, and this
        # instance may not be listening for its marker; sealed now, the session can be resumed elsewhere.
        sealed = connection.close_reason == "shutdown"
        self._enqueue("park", (client_id, self._entry(connection), _encode(left), session.token_hash.hex(),
                               settings.recovery_window, session.sent - len(session.frames), session.away_at,
                               settings.recovery_max_frames, settings.recovery_max_bytes, session.characters(),
                               self._takeovers.pop(client_id, ""), int(sealed), settings.recovery_max_memory,
                               *session.texts(client_id)), done)
        self._parked[client_id] = connection
        if not sealed:
            self._parking[client_id] = connection
        if len(self._parked) > settings.recovery_max_sessions:
            self._enqueue("end", (next(iter(self._parked)), "evicted"), _ignore)

    def _divert(self, delivery: _Delivery) -> bool:
        """Keep in Redis what came here for sessions being parked (no longer in the registry's indexes);
        True if that was all it was for."""
        for connection in self._parking.values():
            if _addressed(delivery, connection):
                self._enqueue("keep", (connection.id, _encode_delivery(delivery)), _ignore)
                if isinstance(delivery, _ToClient | _Kick):  # for this one client only
                    return True
        return False

    def _control(self, message: _Control) -> None:
        match message:
            case _WasParked(client_id):
                if self._parking.pop(client_id, None) is not None:
                    self._enqueue("seal", (client_id,), _ignore)
            case _Sealed(client_id):
                if client_id in self._sealed:
                    self._sealed[client_id].set()
            case _WasResumed(client_id):
                self._resuming.discard(client_id)
            case _SessionEnded(client_id, reason):
                self._session_over(client_id, reason)
            case _RoomShared(room, by):
                self._shares += 1
                self._rooms_at.pop(room, None)
                if by:  # a room that gained instance ``by``, whose join waits for the answer (else one that lost one)
                    self._enqueue("tell", (by, _encode_delivery(_RoomSharedSeen(room))), _ignore)
            case _RoomSharedSeen(room):
                sharing = self._sharing.get(room)
                if sharing is not None:
                    sharing[1][0] -= 1
                    if sharing[1][0] <= 0:
                        del self._sharing[room]
                        sharing[0].set()
            case _Revoked(user, before, expires):
                self.registry._revoke_here(user, before, expires)
            case _Moved(client_id, was):
                self._moves += 1
                # Direct frames went there only if it was cached (to instances only, never to a session).
                if self._where.pop(client_id, None) is not None and not was.startswith("~"):
                    self._fence(client_id, was)
            case _Fence(client_id, origin, number):  # after the re-routes of the direct frames before it
                self._enqueue("notice", (origin, _encode_delivery(_FencePassed(client_id, number))), _ignore)
            case _FencePassed(client_id, number):
                self._unfence(client_id, number)
            case _Undelivered(client_id, text, code, why):
                self._undelivered(text, code, why)
            case _Membership():
                if self._tasks is not None:  # a task: the join waits for Redis, and the listener must not
                    self._tasks.start_soon(self._answer_membership, message)
            case _MembershipDone(request, outcome):
                waiting = self._memberships.get(request)
                if waiting is not None:
                    waiting[1].append(outcome)
                    waiting[0].set()
            case _TakeOver(client_id, token_hash, requester):
                self._takeovers[client_id] = requester  # _park() names it, for the seal to tell it
                if not self.registry._drop_for_takeover(client_id, token_hash):  # no such open connection here
                    del self._takeovers[client_id]
                    self._enqueue("tell", (requester, _encode_delivery(_Sealed(client_id))), _ignore)

    def _session_over(self, client_id: str, reason: str) -> None:
        """A session this instance parked ended: tell its rooms and the backend, unless it was resumed."""
        self._parking.pop(client_id, None)
        connection = self._parked.pop(client_id, None)
        if connection is not None and reason != "resumed":
            self.registry._session_over(connection, reason)

    async def claim(self, client_id: str, token_hash: str, user: str | None, *,
                    spend: bool) -> _Parked | Literal[False] | None:
        sealed = self._sealed[client_id] = anyio.Event()
        try:
            for attempt in range(2):
                kind, *found = await self._request("peek", client_id, token_hash, "claim" if spend else "look")
                if kind == b"reused":
                    return None
                if kind == b"parked":
                    entry = msgspec.json.decode(found[0])
                    return _Parked(client_id, token_hash, tuple(entry["rooms"])) if entry["user"] == user else False
                if kind == b"none" or not spend or attempt:
                    return False
                if kind == b"open":  # connected through another instance: ask it to let go
                    self._enqueue("tell", (found[0], _encode_delivery(_TakeOver(client_id, token_hash, self.instance))),
                                  _ignore)
                with anyio.move_on_after(self.settings.redis_timeout):
                    await sealed.wait()
        except BackendUnavailable:
            pass
        finally:
            if self._sealed.get(client_id) is sealed:
                del self._sealed[client_id]
        return False

    async def take(self, connection: _Connection, parked: _Parked) -> _Kept | None:
        # The registry holds the connection already, so that frames for it from now on are kept for after
        # the replay; those routed to it in Redis before the script runs are in its list, and until its
        # marker comes back, _deliver_here passes it over for those that arrive here meanwhile.
        self._resuming.add(connection.id)
        try:
            answer = await self._request("resume", connection.id, parked.token_hash, self._entry(connection),
                                         self.settings.recovery_window)
        except BackendUnavailable:
            answer = [b"gone"]
        if answer[0] != b"ok":
            self._resuming.discard(connection.id)
            return None
        return _Kept(int(answer[1]), int(answer[2]), [frame.decode() for frame in answer[3:]])

    # Reading

    def health(self) -> tuple[str, dict[str, Any]]:
        # Degraded, not down: clients on this instance are still served.
        redis = "unavailable" if not self.available else "resyncing" if self.resyncing else "ok"
        why = {} if self.started else {"reason": _NO_LIFESPAN}  # else Redis looks down when it is up
        return ("ok" if redis == "ok" else "degraded",
                {"instance": self.instance, "redis": redis, "instances": self.instances, **why})

    def _unavailable(self) -> BackendUnavailable:
        """Why Redis cannot be reached now, as the sender, or the API's caller, is told."""
        return BackendUnavailable(UNAVAILABLE if self.started else NOT_STARTED)

    def metrics(self) -> list[_MetricFamily]:
        return [("cluster_up", "gauge", "1 while Redis is reachable.", {"": int(self.available)}, ""),
                ("cluster_received_total", "counter", "Deliveries received from other instances.",
                 {"": self.received}, ""),
                ("cluster_dropped_total", "counter", "Cross-instance deliveries lost, by reason.",
                 self.dropped, "reason"),
                ("cluster_new_primaries_total", "counter",
                 "Times Redis turned out to be another server (a failover, or a restart); each a resync.",
                 {"": self.new_primaries}, ""),
                ("cluster_taken_for_dead_total", "counter",
                 "Times this instance came back after the others had taken it for dead, and closed its connections.",
                 {"": self.taken_for_dead}, ""),
                ("cluster_rooms_alone", "gauge", "Rooms whose members are all on this instance, relayed without Redis.",
                 {"": sum(1 for instances in self._rooms_at.values() if not instances)}, ""),
                ("cluster_rooms_cached", "gauge",
                 "Rooms with members on other instances too, whose instances this one caches (published to without a "
                 "lookup).",
                 {"": sum(1 for instances in self._rooms_at.values() if instances)}, ""),
                ("cluster_clients_cached", "gauge",
                 "Clients of other instances whose instance this one caches, sending to it without a lookup.",
                 {"": len(self._where)}, ""),
                ("cluster_direct_total", "counter",
                 "Frames sent without a lookup, on the cached instance of their client or of their room.",
                 {"": self.direct}, ""),
                ("sessions_parked", "gauge", "Sessions this instance moved to Redis to wait for their client.",
                 {"": len(self._parked)}, "")]

    def entry(self, connection: _Connection) -> dict[str, Any]:
        return {**connection.describe(), "instance": self.instance}

    # Membership

    def _entry(self, connection: _Connection) -> bytes:
        return _encode(self.entry(connection))

    async def register(self, connection: _Connection) -> None:
        """Put a new client in the directory; while Redis is away, the next sync does it."""
        with contextlib.suppress(BackendUnavailable):
            await self._call(self._register(connection))

    async def _register(self, connection: _Connection) -> None:
        user = connection.identity.user
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(f"{self.settings.redis_prefix}:directory", connection.id, self.instance)
            pipe.zadd(f"{self.settings.redis_prefix}:clients", {connection.id: 0})
            pipe.hset(self._clients_key, connection.id, self._entry(connection))
            if user is not None:
                await self._members(pipe, "user", user, len(self.registry._users.get(user, ())), connection.id, True)
            await pipe.execute()

    def unregister(self, connection: _Connection, rooms_left: Mapping[str, int], user_left: int) -> None:
        """Take a gone client out of the directory, its rooms and its user, in the background."""
        for room, members in rooms_left.items():
            if not members:
                self._rooms_at.pop(room, None)
        if self.available and self._tasks is not None:
            self._tasks.start_soon(self._unregister, connection.id, connection.identity.user, rooms_left, user_left)

    async def _unregister(self, client_id: str, user: str | None, rooms_left: Mapping[str, int],
                          user_left: int) -> None:
        prefix = self.settings.redis_prefix
        with contextlib.suppress(BackendUnavailable):
            async with self.redis.pipeline(transaction=False) as pipe:
                await self._scripts["gone"](args=(prefix, client_id, self.instance), client=pipe)
                pipe.zrem(f"{prefix}:clients", client_id)
                pipe.hdel(self._clients_key, client_id)
                for room, members in rooms_left.items():
                    await self._members(pipe, "room", room, members, client_id, False)
                if user is not None:
                    await self._members(pipe, "user", user, user_left, client_id, False)
                await self._call(pipe.execute())

    async def room_changed(self, connection: _Connection, room: str, members_here: int) -> int:
        """Record this instance's members of ``room``; the members on every instance."""
        if not members_here:
            self._rooms_at.pop(room, None)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self._clients_key, connection.id, self._entry(connection))
            await self._members(pipe, "room", room, members_here, connection.id, room in connection.rooms)
            results = await self._call(pipe.execute())
        members, notified = results[-1]
        if notified:
            self._sharing.setdefault(room, (anyio.Event(), [0]))[1][0] += int(notified)
        await self._shared_known(room)
        return int(members)

    async def _shared_known(self, room: str) -> None:
        """Wait until the instances that relayed ``room`` without Redis know it is shared now, or for at most
        SHARING_WAIT (one that died does not answer): the join's answer then means frames reach it."""
        sharing = self._sharing.get(room)
        if sharing is None:
            return
        with anyio.move_on_after(SHARING_WAIT):
            await sharing[0].wait()
        if self._sharing.get(room) is sharing and not sharing[0].is_set():
            del self._sharing[room]  # given up on: the next join does not wait for it again

    async def _members(self, pipe: Any, kind: str, name: str, members_here: int, client_id: str,
                       member: bool) -> None:
        await self._scripts["members"](args=(self.settings.redis_prefix, kind, name, self.instance, members_here,
                                             client_id, int(member)), client=pipe)

    # The clients' instances, cached on the sender (docs/cluster.md, "Design"): the relay script's answer for a
    # frame teaches where its client is; the directory says when that changes (_Moved), and the sender then
    # fences the client until its old instance has routed on what was sent to it there (_Fence).

    def _learn(self, client_id: str, instance: str) -> None:
        """Cache a send's answer.  One that names another instance than the entry cached (a later answer, read
        before the _Moved that came between them) is a move: fenced as one.  Past CACHE_LIMIT nothing more is
        learnt (not dropped whole: direct frames may be on their way on the entries dropped) until entries go
        as their clients move or leave."""
        cached = self._where.get(client_id)
        if cached is not None and cached != instance:
            del self._where[client_id]
            self._fence(client_id, cached)
        elif cached is None and len(self._where) < CACHE_LIMIT:
            self._where[client_id] = instance

    def _forget_instance(self, instance: str) -> None:
        """``instance`` is not listening, or dead: its cached clients are looked up again, after a fence (what
        was sent there may still be routed on by it, if it is only slow)."""
        for client_id in [client_id for client_id, where in self._where.items() if where == instance]:
            del self._where[client_id]
            self._fence(client_id, instance)
        for room in [room for room, instances in self._rooms_at.items() if instance in instances]:
            del self._rooms_at[room]

    def _fence(self, client_id: str, instance: str) -> None:
        """Hold new frames for ``client_id`` until ``instance``, where direct frames for it may be on their way,
        has routed them on (its _FencePassed), or for FENCE_WAIT; the fence goes there after them, in order."""
        if client_id in self._fenced or not self.available:  # fenced already, or nothing can be sent anyway
            return
        number = next(self._fences)
        timer = asyncio.get_running_loop().call_later(FENCE_WAIT, self._fence_expired, client_id, number)
        self._fenced[client_id] = (number, [], timer)

        def done(result: Any) -> None:
            if result != 1:  # not heard: nothing there is routed on, nothing need be waited for
                self._unfence(client_id, number)

        self._enqueue("fence", (instance, _encode_delivery(_Fence(client_id, self.instance, number))), done)

    def _fence_expired(self, client_id: str, number: int) -> None:
        """FENCE_WAIT passed: the flush task releases the fence.  Not here, a timer's callback outside any task:
        releasing it may refuse frames, whose error frames may close a slow connection, which wants a task."""
        self._expired.append((client_id, number))
        if self._outbox_ready is not None:
            self._outbox_ready.set()

    def _unfence(self, client_id: str, number: int) -> None:
        """Fence ``number`` of ``client_id`` is passed: its held frames go on, in order, through the script."""
        fence = self._fenced.get(client_id)
        if fence is None or fence[0] != number:  # an older fence's answer, or one released already
            return
        del self._fenced[client_id]
        fence[2].cancel()
        self._held -= len(fence[1])
        for name, args, done in fence[1]:
            if not self.available or self._outbox_ready is None:
                self._delivered(name, self._unavailable(), done)
            else:  # past OUTBOX_LIMIT if need be: bounded by FENCE_LIMIT
                self._enqueue(name, args, done)

    def _direct(self, direct: _Direct) -> None:
        """A frame another instance sent here on its cached entry: delivered if its client is here (or kept, if
        it is being parked), else routed on as the relay script would (to the client's new instance, or its
        waiting session), after what came before it; if that fails, its sender's instance is told."""
        self.received += 1
        connection = self.registry._connections.get(direct.client_id)
        if connection is not None and not self._parking:  # most often: no struct, no callback
            if not connection.send(direct.text):  # closing: refused, as a relay on one instance is
                self._not_delivered(direct, -1)
            return
        delivery = _ToClient(direct.client_id, direct.text)
        if self._parking and self._divert(delivery):
            return
        if connection is None:  # gone from here: on to where the directory says
            self._enqueue("send", (direct.client_id, _encode_delivery(delivery)),
                          functools.partial(self._not_delivered, direct))
        elif not connection.send(direct.text):
            self._not_delivered(direct, -1)

    def _not_delivered(self, direct: _Direct, result: Any) -> None:
        """Tell the instance a direct frame came from that it was refused (``result``: the send script's answer,
        or BackendUnavailable), unless it was delivered after all (1)."""
        if result == 1:
            return
        code, why = _not_sent(result, direct.client_id)
        self._enqueue("notice", (direct.origin, _encode_delivery(_Undelivered(direct.client_id, direct.text, code,
                                                                               why))), _ignore)

    def _undelivered(self, text: str, code: str, why: str) -> None:
        """Tell the sender of ``text``, a direct frame the instance it was sent to could not route on, that it
        was refused, as the relay script's answer would have."""
        try:
            event = ws_micro._decode_event(text)
        except msgspec.MsgspecError:  # ours, relayed unchanged: it was read before it was sent
            return
        connection = self.registry._connections.get(event.client_id)
        if connection is not None and self._failed is not None:
            self._failed(connection, event, code, why)

    # Sending: deliveries to other instances go through one outbox, flushed as one pipeline at a
    # time: a busy gateway pays a Redis round trip per batch, not per frame, and keeps their order.

    async def send(self, delivery: _ToClient | _Kick) -> bool:
        return bool(await self._request("send", delivery.client_id, _encode_delivery(delivery)) == 1)

    def forward(self, delivery: _ToClient, failed: Callable[..., None], *about: Any) -> Awaitable[None] | None:
        client_id = delivery.client_id
        instance = self._where.get(client_id)
        if instance is not None and self.available and len(self._outbox) < OUTBOX_LIMIT:
            # Cached: published there as it is, after what this instance sent before.  The most frequent cross-
            # instance frame: its entry holds what a refusal needs, not a closure (answered 1, it is not called).
            self._failed = failed
            self.direct += 1
            self._enqueue("direct", (instance, _encode_delivery(_Direct(client_id, delivery.text, self.instance))),
                          _Refusal(failed, about, client_id))
            return None
        done = _Refusal(failed, about, client_id)
        if not self.available or self._outbox_ready is None:
            self._delivered("send", self._unavailable(), done)
            return None
        if len(self._outbox) >= OUTBOX_LIMIT:
            return self._forward_later(delivery, failed, about)
        fence = self._fenced.get(client_id)
        if fence is None:
            self._enqueue("send", (client_id, _encode_delivery(delivery)), done)
        elif len(fence[1]) >= FENCE_FRAMES or self._held >= FENCE_LIMIT:
            self.dropped["moving"] += 1
            failed(*about, BACKEND_UNAVAILABLE, f"client {client_id!r} is moving to another instance, and more "
                                                f"frames wait for it than are held meanwhile; it missed this frame")
        else:
            fence[1].append(("send", (client_id, _encode_delivery(delivery)), done))
            self._held += 1
        return None

    async def _forward_later(self, delivery: _ToClient, failed: Callable[..., None], about: tuple[Any, ...]) -> None:
        while len(self._outbox) >= OUTBOX_LIMIT and self.available:  # Redis is slow: the sender waits
            await self._outbox_drained.wait()
        rest = self.forward(delivery, failed, *about)  # the cache and fences as they are now
        if rest is not None:
            await rest

    async def publish(self, delivery: _ToGroup, here: Callable[[], int] = lambda: 0) -> int:
        answer, reached = await self._request("group", _group_key(delivery), _encode_delivery(delivery), here=here)
        return int(answer[0]) + int(reached)

    def publish_soon(self, delivery: _ToRoom) -> None:
        def done(result: Any) -> None:
            pass

        if self._rooms_at.get(delivery.room) == ():  # its members are all here
            return
        if not self.available or self._outbox_ready is None or len(self._outbox) >= OUTBOX_LIMIT:
            self._delivered("group", self._unavailable(), done)  # counted as dropped
            return
        self._enqueue("group", (_group_key(delivery), _encode_delivery(delivery)), done)

    def forward_to_room(self, delivery: _ToRoom, failed: Callable[..., None], *about: Any) -> Awaitable[None] | None:
        room = delivery.room
        instances = self._rooms_at.get(room)
        if instances == ():  # its members are all here, and have it
            return None
        if instances is not None and self.available and len(self._outbox) < OUTBOX_LIMIT:
            # Cached: published to each of its other instances without a lookup, one refusal for them all.
            self.direct += 1
            message, refusal = _encode_delivery(delivery), _RoomRefusal(self, failed, about, room)
            for instance in instances:
                self._enqueue("room", (instance, message), refusal)
            return None
        shares = self._shares

        def done(result: Any) -> None:
            if isinstance(result, BackendUnavailable):
                failed(*about, BACKEND_UNAVAILABLE, _room_missed(result, room))
            elif result[1]:
                failed(*about, BACKEND_UNAVAILABLE, f"{result[1]} instance(s) with members of {room!r} "
                                                    f"{NOT_LISTENING}; their members missed this frame")
            elif result[2] and shares == self._shares and room in self.registry._rooms and self.available:
                # No _RoomShared came since the script ran, and it still has members here.
                self._rooms_at[room] = tuple(instance.decode() for instance in result[3])

        return self._submit("group", (_group_key(delivery), _encode_delivery(delivery)), done)

    async def broadcast(self, delivery: _ToEveryone, here: Callable[[], int] = lambda: 0) -> int:
        answer, reached = await self._request("all", _encode_delivery(delivery), here=here)
        return int(answer[0]) + int(reached)

    async def _request(self, name: str, *args: Any, here: Callable[[], int] | None = None) -> Any:
        """Run a script through the outbox; its answer, or with ``here``, its answer and what ``here()``
        returned, called as soon as the script is queued (not if it could not be: then nobody got it)."""
        reply: list[Any] = []
        answered = anyio.Event()

        def done(result: Any) -> None:
            reply.append(result)
            answered.set()

        rest = self._submit(name, args, done)
        if rest is not None:
            await rest
        if reply and isinstance(reply[0], BaseException):
            raise reply[0]
        if here is not None and self.resyncing:  # the outbox holds it back (_flush), and fails it
            raise BackendUnavailable(RESYNCING, "resyncing")
        reached = here() if here is not None else 0
        await answered.wait()
        if isinstance(reply[0], BaseException):
            raise reply[0]
        return reply[0] if here is None else (reply[0], reached)

    def _submit(self, name: str, args: tuple[Any, ...], done: Callable[[Any], None]) -> Awaitable[None] | None:
        """Queue a delivery script; ``done`` gets its result, or :class:`BackendUnavailable`.  None once it
        is queued, else (the outbox is full) an awaitable that queues it when there is room."""
        if not self.available or self._outbox_ready is None:
            self._delivered(name, self._unavailable(), done)
            return None
        if len(self._outbox) >= OUTBOX_LIMIT:
            return self._submit_later(name, args, done)
        self._enqueue(name, args, done)
        return None

    async def _submit_later(self, name: str, args: tuple[Any, ...], done: Callable[[Any], None]) -> None:
        while len(self._outbox) >= OUTBOX_LIMIT:  # Redis is slow: the sender waits, its socket fills
            await self._outbox_drained.wait()
        self._enqueue(name, args, done)

    def _enqueue(self, name: str, args: tuple[Any, ...], done: Callable[[Any], None]) -> None:
        assert self._outbox_ready is not None
        outbox = self._outbox
        outbox.append((name, args, done))  # the prefix and instance are added as a script is queued
        if len(outbox) == 1:  # the first since _flush took a batch and made a new event; the rest find it set
            self._outbox_ready.set()

    async def _flush(self) -> None:
        while True:
            assert self._outbox_ready is not None
            await self._outbox_ready.wait()
            self._outbox_ready = anyio.Event()
            expired, self._expired = self._expired, []
            for client_id, number in expired:  # their held frames join this batch
                self._unfence(client_id, number)
            batch, self._outbox = self._outbox, []
            # Judged before the scripts run: a peer seen back by now is in Redis when they run.
            resyncing = self.resyncing
            # A room or broadcast cannot tell which members the missing peers hold: while they are
            # missing it reaches no other instance, as when Redis is away.  A send finds its client or not (and
            # a direct frame's instance is one this instance learnt of since it wrote its state again).
            held = [resyncing and name not in _ROUTED for name, _, _ in batch]
            moves = self._moves  # an answer of the directory's that crossed a _Moved is not learnt
            try:
                if not self.available:
                    raise self._unavailable()
                results: list[Any] = []
                if not all(held):
                    queued = [(name, args) for (name, args, _), hold in zip(batch, held, strict=True) if not hold]
                    async with self.redis.pipeline(transaction=False) as pipe:
                        runs = await self._pipe(pipe, queued)
                        results = self._unrun(runs, await self._call(pipe.execute()))
                answers = iter(results)
                results = [BackendUnavailable(RESYNCING, "resyncing") if hold else next(answers) for hold in held]
            except BackendUnavailable as exc:
                results = [exc] * len(batch)
            deaf: set[str] = set()  # instances a direct frame found not listening
            for (name, args, done), result in zip(batch, results, strict=True):
                if result == 1 and (name == "direct" or name == "room"):  # heard: nothing to count, nobody to tell
                    continue
                if name == "send" and result.__class__ is bytes:  # the client's instance
                    if moves == self._moves and args[0] not in self._fenced:
                        self._learn(args[0], result.decode())
                    result = 1
                elif (name == "direct" or name == "room") and result == 0:
                    deaf.add(args[0])
                if name == "room":  # one frame for several instances: its _RoomRefusal counts and tells once
                    done(self._refusal(name, result, resyncing) or result)
                    continue
                self._delivered(name, result, done, resyncing)
            for instance in deaf:
                self._forget_instance(instance)
            self._outbox_drained.set()
            self._outbox_drained = anyio.Event()

    async def _pipe(self, pipe: Any, calls: list[tuple[str, tuple[Any, ...]]]) -> list[int | list[int]]:
        """Queue these scripts on ``pipe``: each run of deliveries (``_RUN``) cut at RUN_BYTES, as one "relay"
        script if it has any to look up (``_RELAYED``), else as one PUBLISH per instance of its messages
        (``_DIRECT``); each other script as itself.  What each command, or run of PUBLISHes, stands for: 0 a
        script that is not a run, n > 0 a relay script of n deliveries, or for a run of PUBLISHes, the position
        among them of each message's."""
        runs: list[int | list[int]] = []
        prefix, instance = self.settings.redis_prefix, self.instance
        position, count = 0, len(calls)
        while position < count:
            name, args = calls[position]
            if name not in _RUN:
                await self._scripts[name](args=(prefix, *args, instance), client=pipe)
                runs.append(0)
                position += 1
                continue
            end, size, scripted = position, 0, False  # args of a run: key (an instance if direct), message
            while end < count and calls[end][0] in _RUN and size < RUN_BYTES:
                size += len(calls[end][1][1])
                scripted = scripted or calls[end][0] in _RELAYED
                end += 1
            run = calls[position:end]
            position = end
            if scripted:
                kinds: list[Any] = []
                for name, args in run:
                    kinds += ("direct" if name in _DIRECT else name, args[0], len(args[1]))
                await self._scripts["relay"](args=(prefix, _encode_delivery(kinds),
                                                   b"".join([args[1] for _, args in run]), instance), client=pipe)
                runs.append(len(run))
                continue
            by_instance: dict[str, list[bytes]] = {}
            for _, (target, message) in run:
                by_instance.setdefault(target, []).append(message)
            for target, messages in by_instance.items():
                pipe.publish(f"{prefix}:deliveries:{target}", _array_head(len(messages)) + b"".join(messages))
            if len(by_instance) == 1:
                runs.append([0] * len(run))
            else:
                index = {target: n for n, target in enumerate(by_instance)}
                runs.append([index[target] for _, (target, _) in run])
        return runs

    @staticmethod
    def _unrun(runs: list[int | list[int]], results: list[Any]) -> list[Any]:
        """The answer of each script :meth:`_pipe` queued, from the pipe's: a run's answers spread out (all
        None if it found this instance unregistered); a PUBLISH's, 1 for each of its messages if an instance
        heard it, else 0."""
        answers: list[Any] = []
        at = 0
        for run in runs:
            if isinstance(run, list):
                heard = [1 if subscribers else 0 for subscribers in results[at:at + max(run) + 1]]
                answers += [heard[index] for index in run]
                at += len(heard)
                continue
            result = results[at]
            at += 1
            if not run:
                answers.append(result)
            else:
                answers += [None] * run if result is None else result
        return answers

    def _delivered(self, name: str, result: Any, done: Callable[[Any], None], resyncing: bool = False) -> None:
        """Count what may be lost, and hand ``done`` the script's answer or the error its sender must hear."""
        if not isinstance(result, BackendUnavailable):
            result = self._refusal(name, result, resyncing) or result
        if isinstance(result, BackendUnavailable):
            if name not in _UNCOUNTED:
                self.dropped[result.reason] += 1
        elif name in ("group", "all") and result[1]:  # sent to some instances; others were not listening
            self.dropped["no_subscriber"] += 1
        done(result)

    def _refusal(self, name: str, result: Any, resyncing: bool) -> BackendUnavailable | None:
        """What a delivery script's answer must be told as instead, if it may not have arrived."""
        if result is None:  # the script found this instance unregistered: Redis lost its state
            self._lost()  # reconnect and register again; meanwhile every cross-instance send fails
            return BackendUnavailable(RESYNCING, "resyncing")
        if (name == "send" or name == "direct") and result == 0:  # its instance is not listening
            return BackendUnavailable(f"the instance of this client is {NOT_LISTENING}", "no_subscriber")
        if name == "room" and result == 0:
            return BackendUnavailable(f"an instance with members of this room is {NOT_LISTENING}", "no_subscriber")
        if name == "send" and result == -1 and resyncing:  # unknown, or on a peer not registered again yet
            return BackendUnavailable(RESYNCING, "resyncing")
        return None

    async def clients(self, here: _Index[_Connection], paging: _Paging) -> _Page:
        if self.resyncing:  # the list would lack the clients of the peers not back yet
            raise BackendUnavailable(RESYNCING)
        count, last, *entries = await self._script("list", paging.after, paging.limit, paging.max_bytes)
        return _Page(int(count), [msgspec.Raw(entry) for entry in entries], last.decode() or None)

    async def client(self, client_id: str) -> dict[str, Any] | None:
        entry = await self._script("get", client_id)
        if entry is None and self.resyncing:  # unknown, or on a peer not back yet
            raise BackendUnavailable(RESYNCING)
        return None if entry is None else dict(msgspec.json.decode(entry))

    async def members(self, kind: str, name: str, here: _Index[_Connection], member_ids: Collection[str],
                      paging: _Paging) -> _Page:
        if self.resyncing:
            raise BackendUnavailable(RESYNCING)
        count, last, *entries = await self._script("group_members", kind, name, paging.after, paging.limit,
                                                   paging.max_bytes)
        if kind == "room":  # a room's members are listed by id and user only
            entries = [_encode(_decode_member(entry)) for entry in entries]
        return _Page(int(count), [msgspec.Raw(entry) for entry in entries], last.decode() or None)

    async def rooms(self, here: _Index[set[str]], paging: _Paging) -> _Page:
        if self.resyncing:
            raise BackendUnavailable(RESYNCING)
        count, last, *flat = await self._script("rooms", paging.after, paging.limit, paging.max_bytes)
        entries = [msgspec.Raw(_encode({"room": room.decode(), "members": int(members)}))
                   for room, members in zip(flat[::2], flat[1::2], strict=True)]
        return _Page(int(count), entries, last.decode() or None)

    async def _script(self, name: str, *args: Any) -> Any:
        return await self._call(self._scripts[name](args=(self.settings.redis_prefix, *args)))

    async def _call(self, command: Awaitable[Any]) -> Any:
        if not self.available:
            if inspect.iscoroutine(command):
                command.close()  # never awaited: no "coroutine was never awaited" warning
            raise self._unavailable()
        try:
            return await command
        except self._errors as exc:
            self._lost()
            raise BackendUnavailable(f"Redis is unavailable ({exc}); "
                                     "only clients on this instance can be reached") from None

