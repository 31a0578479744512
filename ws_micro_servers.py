"""ws_micro_servers: what the gateway does past ASGI, through the internals of the servers it runs under.

The core, ``ws_micro.py``, reaches its server only through ASGI.  Beside it, this module
does what ASGI cannot, for the servers it knows, at the versions it was tested with:

- under uvicorn's websockets-sansio engine: the fast path (frames written straight to the
  transport, framed once per fan-out), the engine held to the gateway's limits (its frame
  size, the control frames and fragments it handles alone, the close it starts), the
  request, response and headers let go of after the handshake, and a reset for a peer
  that reads nothing;
- under ``serve()``: uvicorn's HTTP protocol with a deadline on each request head and a bound
  on its size, a count of the sockets waiting for one against ``max_connections``, and an
  answer for the handshakes websockets refuses, which uvicorn never writes;
- under daphne: Twisted's flow control, so that a reader that stops reading waits instead
  of growing the server, and tokens redacted in its access log, which is not logging's;
- the lines any client can make uvicorn log, at most once per 10 s each.

On a server version it was not tested with, it turns itself off for that server, with
one WARNING line naming the version, and the gateway runs on ASGI alone
(``ws_micro_fast_path 0``).  docs/configuration.md says what a copy of the core keeps
without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import importlib.metadata
import logging
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio
from starlette.types import Receive, Scope, Send

import ws_micro
from ws_micro import (
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    Settings,
    _Connection,
    _encode,
    _Gateway,
    _Metrics,
    _Output,
    _redacted,
    _ServerSupport,
    _Throttle,
    _websocket_frame,
    logger,
)

_LIBRARY: contextvars.ContextVar[str | None] | None
try:  # how anyio tells which async library runs it, when sniffio is installed (older anyio requires it)
    from sniffio import current_async_library_cvar as _LIBRARY  # type: ignore[import-not-found, unused-ignore]
except ImportError:
    _LIBRARY = None

__version__ = "0.3.0"

_T = TypeVar("_T")

ws_micro._check_sibling(__file__, __version__)

# The versions of each server (and of the library under its engine) this module was tested with, from the
# first to the last minor release tested: [first, next).  .ci/run tests the newest on the registry, and
# the oldest of uvicorn's, so a release past the range is noticed the week it ships.
TESTED = {
    "uvicorn": ((0, 52, 1), (0, 56)),  # 0.52.1: the websockets-sansio engine's write backpressure
    "websockets": ((15, 0), (18,)),  # under uvicorn's engine, and the same classes for its bounds
    "daphne": ((4, 2), (4, 3)),
}


def _untested(*packages: str) -> str | None:
    """Why this module must not reach into these packages: one of them is not a version it was tested
    with; None if every one is (or is not installed: then nothing runs on it)."""
    for package in packages:
        why = _untested_version(package)
        if why is not None:
            return why
    return None


@functools.cache
def _untested_version(package: str) -> str | None:
    """``_untested`` for one package, said once in the log as a WARNING: what turns itself off for it."""
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    release = tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())
    first, after = TESTED[package]
    if first <= release < after:
        return None
    why = (f"{package} {text} is not a version ws_micro_servers.py was tested with "
           f"({'.'.join(map(str, first))} up to, not including, {'.'.join(map(str, after))})")
    off = _TURNED_OFF[package]
    logger.warning("%s: %s turned off, as if ws_micro_servers.py were not there (docs/configuration.md)", why, off)
    return why


_TURNED_OFF = {
    "uvicorn": "the fast path, the engine's bounds and the deadline on request heads are",
    "websockets": "the fast path and the engine's bounds are",
    "daphne": "its flow control for readers that stop reading is",
}


# --------------------------------------------------------------------------
# Under uvicorn's websockets-sansio engine
# --------------------------------------------------------------------------


def _sansio_engine(receive: Receive, send: Send, settings: Settings,
                   served: bool) -> tuple[Any, str | None, int]:
    """uvicorn's websockets-sansio protocol object behind ``receive``, if any; why frames may not go
    past it (None: they may), and how loudly to say so: a WARNING when the operator can turn it on
    (``served``: under ``ws-micro``, whose compression is off unless asked for)."""
    engine = getattr(receive, "__self__", None)
    if not type(engine).__module__.startswith("uvicorn."):
        if _uvicorns_beneath(receive):
            return None, (f"receive is wrapped by {getattr(receive, '__qualname__', receive)!r} (a middleware?), "
                          "which hides uvicorn's engine, so its bounds are off too (to keep both, let WebSocket "
                          "scopes through the middleware unwrapped: docs/embedding.md)"), logging.WARNING
        source = getattr(receive, "__module__", None) or type(receive).__module__
        return None, f"receive is not uvicorn's (it comes from {source})", logging.INFO
    untested = _untested("uvicorn", "websockets")
    if untested is not None:  # said once already, as a WARNING
        return None, untested, logging.INFO
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    if not isinstance(engine, WebSocketsSansIOProtocol):  # another engine of uvicorn's
        why_not = f"receive is not uvicorn's websockets-sansio engine's (it comes from {type(engine).__module__})"
        max_size, limit = getattr(getattr(engine, "config", None), "ws_max_size", None), settings.max_message_size
        if not isinstance(max_size, int) or max_size <= limit:
            return None, why_not, logging.INFO
        # uvicorn's other engines: the gateway cannot lower their frame limit.
        return None, (f"{why_not}, which takes frames up to {max_size} bytes (--ws-max-size), inflated if "
                      f"compressed, before ws_micro refuses those over max_message_size ({limit}): run uvicorn "
                      f"with --ws websockets-sansio, or pass --ws-max-size {limit} --ws-per-message-deflate false"
                      ), logging.WARNING
    wrapper = _unwrapped(send)
    if wrapper != engine.send:  # under this engine the fast path should engage: say loudly why not
        return engine, (f"send is wrapped by {getattr(wrapper, '__qualname__', wrapper)!r} (a middleware?), "
                        "which direct writes would bypass"), logging.WARNING
    if engine.conn.extensions:
        if served:  # the operator turned compression on (--per-message-deflate), knowing what it costs
            return engine, "permessage-deflate was negotiated, and it rewrites every frame", logging.INFO
        # uvicorn's own default: on, unless it is told otherwise
        return engine, ("permessage-deflate was negotiated, and it rewrites every frame (to keep the fast path, "
                        "run uvicorn with --ws-per-message-deflate false: docs/embedding.md)"), logging.WARNING
    return engine, None, logging.INFO


WRAPPERS_LOOKED_THROUGH = 4  # middleware deep: more is rare, and each level costs a look at every closure cell


def _uvicorns_beneath(receive: Receive) -> bool:
    """Whether ``receive`` wraps uvicorn's own, a few functions deep: a middleware that wraps ``receive``
    keeps the one it was given in its closure, as most do."""
    functions: list[Any] = [receive]
    for _ in range(WRAPPERS_LOOKED_THROUGH):
        inner = []
        for function in functions:
            for cell in getattr(function, "__closure__", None) or ():
                try:
                    value = cell.cell_contents
                except ValueError:  # a cell not filled yet
                    continue
                if type(getattr(value, "__self__", None)).__module__.startswith("uvicorn."):
                    return True
                if callable(value):
                    inner.append(getattr(value, "__func__", value))
        functions = inner
    return False


def _unwrapped(send: Send) -> Send:
    """``send`` without Starlette's exception wrappers (a host app's), which pass WebSocket messages unchanged."""
    while getattr(send, "__module__", None) == "starlette._exception_handler" and send.__name__ == "sender":
        cells = dict(zip(send.__code__.co_freevars, send.__closure__ or (), strict=True))
        if "send" not in cells:  # another Starlette than the one this was written against
            break
        send = cells["send"].cell_contents
    return send


def _fit_engine(engine: Any, settings: Settings) -> None:
    """Hold the engine to the gateway's limits: its frame size (it inflates compressed frames before we
    see them) to ``max_message_size``, and a close it starts to ``close_timeout``."""
    conn = engine.conn
    limit = settings.max_message_size
    if hasattr(conn, "max_message_size"):  # websockets >= 16
        conn.max_message_size = min(conn.max_message_size or limit, limit)
    else:
        conn.max_size = min(conn.max_size or limit, limit)
    engine.close_timeout = settings.close_timeout  # uvicorn waits 10 s for the peer's close frame


class _Messages:
    """What uvicorn's engine uses of the asyncio.Queue it keeps per connection for the app's ``receive()``:
    ``put_nowait``, ``get`` and ``empty``.  That queue holds three deques and an Event (with a fourth) from its
    start: 3 KiB of an idle connection's 15, measured with tracemalloc.  This one holds an empty list and
    at most one waiter.  Messages stay in the list until ``get`` takes them, as asyncio.Queue's do: a reader
    cancelled as it is woken loses none.

    The read fast path (:meth:`_UvicornOutput._message`) also puts here the rest of a frame it handled, when
    that must wait (:class:`_Rest`): ``get`` awaits it, on the reader's task, before it hands over the
    messages put after it, so a connection's frames are handled in the order they came."""

    __slots__ = ("_head", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._head = 0  # the next message's index: taking from the front is O(1); emptied, the list is cleared
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, message: Any) -> None:
        self._items.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def waited_on(self) -> bool:
        """Whether its reader waits for a message, with none to take: it handles nothing now."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def empty(self) -> bool:
        return self._head == len(self._items)

    def qsize(self) -> int:
        return len(self._items) - self._head

    def get_nowait(self) -> Any:
        if self.empty():
            raise asyncio.QueueEmpty
        message = self._items[self._head]
        self._head += 1
        if self._head == len(self._items):
            self._items.clear()  # which frees its storage: an idle connection keeps an empty list
            self._head = 0
        else:
            self._items[self._head - 1] = None
        return message

    async def get(self) -> Any:
        while True:
            while self.empty():
                if self._waiter is not None and not self._waiter.done():
                    raise RuntimeError("one reader at a time")  # the engine has one: the app's receive()
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            message = self.get_nowait()
            if type(message) is not _Rest:
                return message
            await message.awaitable  # the gateway's, which handles its own errors


class _Rest:
    """The rest of a frame's handling, waiting in :class:`_Messages` for the connection's task."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Awaitable[None]) -> None:
        self.awaitable = awaitable


class _Flag:
    """What uvicorn's engine uses of the asyncio.Event that says whether its transport takes writes: ``is_set``,
    ``set``, ``clear`` and ``wait``, without the deque an Event makes at once (760 bytes per connection)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self, value: bool) -> None:
        self._set = value
        self._waiters: list[asyncio.Future[None]] | None = None  # only while a write waits for the transport

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


def _lighten(engine: Any) -> None:
    """Give the engine a :class:`_Messages` for its queue and a :class:`_Flag` for ``writable``, if they are
    what this module was written against, and no one waits on them (the app, accepted, reads nothing yet)."""
    queue, writable = getattr(engine, "queue", None), getattr(engine, "writable", None)
    if type(queue) is not asyncio.Queue or type(writable) is not asyncio.Event:
        return
    if any(getattr(waiting, name, None) for waiting, name in ((queue, "_getters"), (queue, "_putters"),
                                                                 (writable, "_waiters"))):
        return  # never, once accepted
    messages = _Messages()
    while not queue.empty():  # frames that came right after the handshake
        messages.put_nowait(queue.get_nowait())
    engine.queue, engine.writable = messages, _Flag(writable.is_set())


def _trim_handshake(engine: Any, scope: Scope) -> None:
    """Let go of the request, the response and the headers, kept for the connection's life, read no more."""
    request = getattr(engine, "request", None)
    if request is not None:
        request.headers.clear()  # websockets' parser holds on to the request too
        del engine.request, engine.response
    scope["headers"] = []


class _UvicornOutput(_Output):
    """Frames written straight to the transport under uvicorn's websockets-sansio engine, framed once
    per fan-out, when the engine would write at once; otherwise through ``send``, which waits as it does.
    And frames read past ASGI: see :meth:`_message`."""

    __slots__ = ("_conn", "_connection", "_corks", "_direct", "_engine", "_engine_transport", "_metrics", "_open",
                 "_received", "_settings", "_transport", "_writable")

    def __init__(self, engine: Any, send: Send, settings: Settings, metrics: _Metrics, corks: _Corks, *,
                 direct: bool) -> None:
        from websockets.protocol import OPEN

        super().__init__(send)
        self._engine = engine  # uvicorn's protocol object
        self._conn = engine.conn  # websockets' ServerProtocol: its state says whether frames may go out
        self._transport = engine.transport
        self._writable = engine.writable  # cleared while the transport is paused
        self._open = OPEN
        self._direct = direct
        self._settings = settings
        self._metrics = metrics
        self._corks = corks
        self._connection: _Connection | None = None  # the guarded connection, from guard() to release()
        self._received: Callable[[_Connection, str], Awaitable[None] | None] | None = None  # the read fast path's
        # What the engine writes through from now on (its own frames, and ``send``'s): see _ResettingTransport.
        self._engine_transport = engine.transport = _ResettingTransport(engine.transport, settings.close_timeout)

    def write_now(self, text: str, wire: bytes | None = None) -> Awaitable[None] | None:
        if (self._direct and self._conn.state is self._open and self._writable.is_set()
                and not self._transport.is_closing()):
            data = wire or _websocket_frame(text.encode())
            transport, corks = self._engine_transport, self._corks
            if corks.round and transport.round == corks.round:  # its second frame of this round: corked
                transport.cork(data, corks)
            else:
                transport.round = corks.round
                self._transport.write(data)
            return None
        return super().write_now(text)

    def abort(self) -> None:
        _reset(self._transport)

    def guard(self, connection: _Connection,
              received: Callable[[_Connection, str], Awaitable[None] | None]) -> None:
        """Bound the frames the engine handles unseen by the app: each spends a rate-limit token, the
        pongs it writes count against ``max_queue_bytes``, and a message has ``rate_burst`` fragments at most.
        And, with its queue lightened (:func:`_lighten`), take the messages it parses (:meth:`_message`)."""
        self._connection = connection
        # This output's own methods, bound: three closures over the engine held 670 bytes per connection.
        engine = self._engine
        engine.handle_ping, engine.handle_pong, engine.handle_cont = self._ping, self._pong, self._cont
        if self._settings.fast_path and type(engine.queue) is _Messages:
            self._received = received
            engine.send_receive_event_to_app = self._message
            if self._direct:
                engine.handle_events = self._events

    def _events(self) -> None:
        """The engine's ``handle_events``, which handles the frames one read brought: a round (see _Corks)."""
        engine, corks = self._engine, self._corks
        if corks.round:  # never, as handlers do not read
            type(engine).handle_events(engine)
            return
        corks.begin()
        try:
            type(engine).handle_events(engine)
        finally:
            corks.end()

    def _message(self) -> None:
        """The engine's ``send_receive_event_to_app``, called by its parser with each complete message, in the
        same call as the bytes that complete it were read: the read fast path.  A text message that comes while
        the connection's task waits for one, with nothing before it, goes straight to the gateway, with no
        message, queue, task switch or ``receive()`` between (nor the pause and resume of reading the engine
        does around each queued message: two system calls).  What the gateway cannot finish at once goes to
        the task, ahead of whatever comes next (:class:`_Rest`).  Anything else takes the engine's way: the
        gateway's read loop (``_Gateway._read``) gets it through ``receive()``, as without this module.

        The engine has checked the frame (masking, size, control frames, fragments) as always; the text is
        decoded as the engine does, and invalid UTF-8 left to it (1007)."""
        engine, connection, received = self._engine, self._connection, self._received
        if (received is None or connection is None or engine.curr_msg_data_type != "text" or engine.close_sent
                or not connection.open or not engine.queue.waited_on()):
            type(engine).send_receive_event_to_app(engine)
            return
        frames = engine.frames
        try:
            text = (frames[0] if len(frames) == 1 else b"".join(frames)).decode()
        except UnicodeDecodeError:
            type(engine).send_receive_event_to_app(engine)
            return
        engine.frames = []
        self._metrics.fast_reads += 1
        rest = received(connection, text) if _LIBRARY is None else _in_asyncio(received, connection, text)
        if rest is not None:
            engine.queue.put_nowait(_Rest(rest))

    def _ping(self) -> None:
        type(self._engine).handle_ping(self._engine)
        if self._connection is not None:
            _in_asyncio(self._handled, self._connection)

    def _pong(self, frame: Any) -> None:
        type(self._engine).handle_pong(self._engine, frame)
        if self._connection is not None:
            _in_asyncio(self._handled, self._connection)

    def _cont(self, frame: Any) -> None:
        type(self._engine).handle_cont(self._engine, frame)
        if self._connection is not None:
            _in_asyncio(self._handled, self._connection)

    def _handled(self, connection: _Connection) -> None:
        settings = self._settings
        if self._transport.get_write_buffer_size() > settings.max_queue_bytes:
            connection.close(CLOSE_POLICY_VIOLATION, "slow consumer", label="slow_consumer", flush=False)
            self.abort()  # it reads nothing: a close frame would wait behind what it never took
        elif connection.take_token() < -settings.rate_burst:
            self._transport.pause_reading()  # the engine would go on answering and keeping what it floods
            connection.close(CLOSE_POLICY_VIOLATION, "rate limit exceeded", label="rate_limited", flush=False)
        elif len(self._engine.frames) > settings.rate_burst:
            self._transport.pause_reading()
            connection.close(CLOSE_MESSAGE_TOO_BIG, f"message in more than {settings.rate_burst} fragments",
                             label="message_too_big", flush=False)

    def release(self) -> None:
        """Undo :meth:`guard`: it ties the engine to the connection."""
        for name in ("handle_ping", "handle_pong", "handle_cont", "send_receive_event_to_app", "handle_events"):
            self._engine.__dict__.pop(name, None)
        self._connection = self._received = None


def _in_asyncio(function: Callable[..., _T], *args: Any) -> _T:
    """Call ``function`` from one of the engine's callbacks, where the gateway's code runs outside any task: anyio
    asks sniffio, when it is installed, which library runs it, and sniffio finds none there but by this variable."""
    if _LIBRARY is None:
        return function(*args)
    token = _LIBRARY.set("asyncio")
    try:
        return function(*args)
    finally:
        _LIBRARY.reset(token)


# Bytes of frames held back (corked) for one connection in a round, after which they are written at once: one
# write past uvicorn's own high-water mark (64 KiB), so that its backpressure still sees them.
CORK_LIMIT = 64 * 1024


class _Corks:
    """Frames held back to be written together.  A round is the engine's handling of what one read brought
    (:meth:`_UvicornOutput._events`), or the deliveries of one message from another instance in cluster mode
    (:meth:`ServerSupport.together`): most bring one frame, but a client with several in flight sends several,
    and each may make frames for its own connection (answers) or others' (relays); a message from another
    instance carries what it relayed at one moment, often several frames for one connection.  A connection's
    first frame of a round is written at once; those after it are held back (corked) and written in one system
    call as the round ends.  A fan-out's receivers, each written once, pay one comparison each."""

    __slots__ = ("corked", "round", "rounds")

    def __init__(self) -> None:
        self.round = 0  # the round under way; 0 between rounds
        self.rounds = 0  # rounds begun
        self.corked: list[_ResettingTransport] = []  # the transports holding frames back in this round

    def begin(self) -> None:
        self.rounds += 1
        self.round = self.rounds

    def end(self) -> None:
        """Write what the round held back."""
        self.round = 0
        for transport in self.corked:
            transport.uncork()
        self.corked.clear()


class _ResettingTransport:
    """uvicorn's transport for one WebSocket, whose ``close()`` cannot wait forever for a peer that
    reads nothing: unfinished after ``timeout`` it becomes a reset, and the kernel gives up as soon.

    It also holds back the frames corked in a round (see :class:`_Corks`).  Whatever else writes (the engine's
    pongs and closes, ``send``) writes those first: frames keep their order."""

    __slots__ = ("_timeout", "_transport", "corked", "corked_bytes", "round")

    def __init__(self, transport: Any, timeout: float) -> None:
        self._transport = transport
        self._timeout = timeout
        self.round = 0  # the round of the last frame the fast path wrote to it
        self.corked: list[bytes] | None = None
        self.corked_bytes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        if self.corked:
            self.uncork()
        self._transport.write(data)

    def cork(self, data: bytes, corks: _Corks) -> None:
        corked = self.corked
        if corked is None:
            self.corked = corked = []
            corks.corked.append(self)
        corked.append(data)
        self.corked_bytes += len(data)
        if self.corked_bytes > CORK_LIMIT:
            self.uncork()

    def uncork(self) -> None:
        """Write the frames held back, if it still can."""
        corked, self.corked, self.corked_bytes = self.corked, None, 0
        if corked and not self._transport.is_closing():
            self._transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def close(self) -> None:
        if self.corked:
            self.uncork()
        transport = self._transport
        if not transport.is_closing() and hasattr(socket, "TCP_USER_TIMEOUT"):  # the first close: still open
            with contextlib.suppress(OSError, AttributeError):
                transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                                              max(int(self._timeout * 1000), 1))
        transport.close()
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(self._timeout, _reset, transport)


def _reset(transport: Any) -> None:
    """Drop a connection with a TCP reset (zero linger: the kernel frees its unsent data at once)."""
    if not transport.is_closing() or transport.get_write_buffer_size():  # its descriptor is still open
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# --------------------------------------------------------------------------
# Under daphne
# --------------------------------------------------------------------------


class _DaphneOutput(_Output):
    """ASGI's ``send`` under daphne, made to wait while the socket's buffer is full, as uvicorn's does.

    daphne's ``send`` never waits: it hands the frame to Twisted, which buffers it, so a
    reader that stops reading would grow the server without end.  Registered as the
    transport's producer (Twisted's own flow control), this output is paused while the
    buffer is over its limit, and a frame written meanwhile waits: the connection then
    queues, and is cut off by ``max_queue_*`` or ``send_timeout`` as under any server.
    """

    __slots__ = ("_lost", "_protocol", "_room")

    def __init__(self, send: Send, protocol: Any) -> None:
        super().__init__(send)
        self._protocol = protocol
        self._room = anyio.Event()
        self._room.set()
        self._lost = False
        # The transport's producer is daphne's HTTP channel, which passes its pauses on to one of its own.
        channel: Any = getattr(protocol.transport, "producer", None)
        consumer: Any = channel if hasattr(channel, "registerProducer") else protocol
        consumer.registerProducer(self, True)

    @staticmethod
    def protocol(send: Send) -> Any:
        """daphne's protocol object behind ``send`` (a partial of its server's ``handle_reply``), if it is one."""
        protocol = next(iter(getattr(send, "args", ())), None)
        if type(protocol).__module__.startswith("daphne.") and hasattr(protocol, "registerProducer"):
            return protocol
        return None

    # Twisted's IPushProducer
    def pauseProducing(self) -> None:
        if self._room.is_set():
            self._room = anyio.Event()

    def resumeProducing(self) -> None:
        self._room.set()

    def stopProducing(self) -> None:
        self._lost = True
        self._room.set()

    def write_now(self, text: str, wire: bytes | None = None) -> Awaitable[None] | None:
        if self._room.is_set():
            return super().write_now(text)
        return self._write_later(text)

    async def _write_later(self, text: str) -> None:
        await self._room.wait()
        if self._lost:
            raise OSError("the connection was lost")
        await self._send({"type": "websocket.send", "text": text})

    def abort(self) -> None:
        with contextlib.suppress(AttributeError):
            self._protocol.transport.abortConnection()


def _redact_daphne_access_log() -> None:
    """daphne writes its access log itself, to a stream, not through logging: the core's redaction of log
    records does not see it, and its HTTP lines carry the URL's query, a token with it.  Redact its entries."""
    access = sys.modules.get("daphne.access")  # imported by daphne's command before it loads the app
    if access is None or _untested("daphne") is not None:
        return
    generator = access.AccessLogGenerator
    write_entry = generator.write_entry
    if getattr(write_entry, "redacts_tokens", False):
        return

    @functools.wraps(write_entry)
    def redacting(self: Any, *args: Any, **kwargs: Any) -> Any:
        args = tuple(_redacted(arg) if isinstance(arg, str) else arg for arg in args)
        kwargs = {name: _redacted(arg) if isinstance(arg, str) else arg for name, arg in kwargs.items()}
        return write_entry(self, *args, **kwargs)

    redacting.redacts_tokens = True  # type: ignore[attr-defined]
    generator.write_entry = redacting


# --------------------------------------------------------------------------
# Under serve(): uvicorn's HTTP protocol, with a deadline and a size limit on request heads
# --------------------------------------------------------------------------

_PHRASES = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


def _raw_response(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response with the API's JSON body, for a connection that gets no further."""
    body = _encode({"error": {"code": code, "message": message}})
    return (f"HTTP/1.1 {status} {_PHRASES[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def _refused_upgrade(exc: BaseException | None, method: bytes, target: bytes,
                     headers: list[tuple[bytes, bytes]]) -> tuple[int, str, str]:
    """Why websockets refused the head of a handshake uvicorn handed it: the status, the
    ``rejected_handshakes_total`` label, and a message naming the value (the line, the header)."""
    from websockets.exceptions import SecurityError
    from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS

    cause = exc.__cause__ if exc is not None and exc.__cause__ is not None else exc  # as websockets < 17 wrap it
    if not isinstance(cause, SecurityError):  # a body, a transfer coding, a header value it refuses...
        return 400, "invalid_request", f"not a WebSocket handshake this server can read: {cause}"[:300]
    # websockets counts each line with its CRLF, as uvicorn hands it over: "GET <target> HTTP/1.1", "name: value".
    line = len(method) + len(target) + len(b"  HTTP/1.1\r\n")
    if line > MAX_LINE_LENGTH:
        return 414, "too_large", (f"the request line is {line} bytes long; a WebSocket handshake's may be "
                                  f"{MAX_LINE_LENGTH} bytes")
    for name, value in headers:
        if len(name) + len(value) + len(b": \r\n") > MAX_LINE_LENGTH:
            return 431, "too_large", (f"header {name.decode('latin-1')!r} is {len(value)} bytes long; a WebSocket "
                                      f"handshake's header lines may be {MAX_LINE_LENGTH} bytes")
    return 431, "too_large", (f"the request has {len(headers)} headers; a WebSocket handshake may have "
                              f"{MAX_NUM_HEADERS}")


def _guarded_http_protocol(gateway: _Gateway, head_timeout: float, max_open: int,
                           max_head: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, which times nothing before a first request, with a deadline and a size limit for
    each head, and an answer for the handshakes websockets refuses, which uvicorn never writes.

    A connection waiting for its head counts against ``max_connections`` and gets 408
    after ``head_timeout``; one beyond ``max_open`` open connections gets 503.  A head
    that has not ended within ``max_head`` bytes gets 431 before it is parsed further:
    httptools would keep all of it.
    """
    import h11
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    settings, metrics = gateway.settings, gateway.registry._metrics
    timed_out = _raw_response(408, "timeout", f"no request within {head_timeout:g} seconds")
    full = _raw_response(503, "full", f"server is full ({settings.max_connections} connections)")
    too_large = _raw_response(431, "too_large", f"the request head is larger than {max_head} bytes (max_head_size)")
    httptools = hasattr(AutoHTTPProtocol, "on_headers_complete")  # else uvicorn's h11 protocol

    class GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        _waiting = False  # counted in gateway.waiting: the connection's first head has not arrived
        _head_timer: asyncio.TimerHandle | None = None
        _cycle: object = None  # the request cycle before the awaited head (a new one means it arrived)
        _head_bytes = 0  # bytes received of the head being parsed
        _in_body = False  # httptools: between a head and the end of its message
        _tail = b""  # the last bytes received of the head, where its end may have begun
        _refused = False  # answered with an error, and closing

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_open or gateway.waiting >= settings.max_connections:
                metrics.rejected_handshakes["full"] += 1
                self.transport.write(full)
                self.transport.close()
                return
            self._waiting = True
            gateway.waiting += 1
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # kept alive: the next request's head gets as long
                self._await_head()

        def data_received(self, data: bytes) -> None:
            if self._refused:  # answered: what it still sends is dropped, up to as much as a head again
                self._head_bytes += len(data)
                if self._head_bytes > 2 * max_head:
                    self.transport.close()
                return
            if self._head_too_large(data):
                metrics.rejected_handshakes["too_large"] += 1
                self._refuse(too_large)
                return
            super().data_received(data)
            upgraded = self.transport.get_protocol()
            if upgraded is not self:
                self._answer_refused_upgrade(upgraded)
            if self._head_timer is not None and self._head_arrived():
                self._stop_waiting()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        # httptools' callbacks (h11's protocol has none): where each head ends, and its message
        def on_headers_complete(self) -> None:
            self._in_body, self._head_bytes = True, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_body, self._head_bytes = False, 0
            super().on_message_complete()

        def _head_too_large(self, data: bytes) -> bool:
            """Whether ``data`` takes the head being received past ``max_head`` bytes without ending it."""
            if self._in_body if httptools else self.conn.their_state is not h11.IDLE:  # a body, or its response
                self._head_bytes = 0
                return False
            received, tail = self._head_bytes, self._tail
            self._head_bytes += len(data)
            self._tail = data[-3:]
            if self._head_bytes <= max_head:
                return False
            return (tail + data).find(b"\r\n\r\n", 0, len(tail) + max_head - received) < 0

        def _answer_refused_upgrade(self, engine: asyncio.BaseProtocol) -> None:
            """websockets refuses some heads uvicorn passed (a line over its limit, too many headers, a body)
            without an event; uvicorn before 0.55 waits for one, and writes nothing: answer, and close.  (0.55
            answers with websockets' own text and closes at once: then only count it.)"""
            if (not isinstance(engine, WebSocketsSansIOProtocol) or engine.handshake_initiated
                    or engine.conn.handshake_exc is None):
                return
            target = self.url if httptools else self.scope["raw_path"] + (
                b"?" + self.scope["query_string"] if self.scope["query_string"] else b"")
            status, code, message = _refused_upgrade(engine.conn.handshake_exc, self.scope["method"].encode(),
                                                     target, self.headers)
            metrics.rejected_handshakes[code] += 1
            if self.transport.is_closing():  # uvicorn answered it itself
                self._stop_waiting()
                return
            engine.conn.data_to_send()  # websockets' own answer, when it has one (websockets 17): ours instead
            self.connections.discard(engine)  # a plain HTTP connection again, which closes as the others do
            self.connections.add(self)
            self.transport.set_protocol(self)
            self._refuse(_raw_response(status, code, message))

        def _refuse(self, response: bytes) -> None:
            """Answer, and close once the client has read the answer and closed, or after ``close_timeout``, or
            once it sent as much as a head more: closing with its data unread would reset the connection, and the
            answer could be lost with it (nginx's lingering close).  Until then it still counts as waiting."""
            self._refused, self._head_bytes = True, max_head
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            self.transport.write(response)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(settings.close_timeout, self.transport.close)

        def _await_head(self) -> None:
            self._cycle, self._head_bytes = self.cycle, 0
            if head_timeout and self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _head_arrived(self) -> bool:
            """A new request cycle began, or the connection became a WebSocket."""
            return self.cycle is not self._cycle or self.transport.get_protocol() is not self

        def _stop_waiting(self) -> None:
            if self._waiting:
                self._waiting = False
                gateway.waiting -= 1
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            busy = self.cycle is not None and not self.cycle.response_complete  # a pipelined request runs
            if busy or self._head_arrived() or self.transport.is_closing():
                return
            if self._waiting:  # a first request that never came: say so
                metrics.rejected_handshakes["timeout"] += 1
                self.transport.write(timed_out)
            self._stop_waiting()
            self.transport.close()  # a later one: close as uvicorn closes an idle keep-alive connection

    return GuardedHTTPProtocol


# --------------------------------------------------------------------------
# uvicorn's log lines that any client can cause
# --------------------------------------------------------------------------

# What each becomes; each is written once per connection or request that causes it.
_CLIENT_CAUSED = {
    "Invalid UTF-8 sequence received from client.":  # the engine, with a traceback; then it closes with 1007
        (logging.INFO, "Invalid UTF-8 sequence received from a client; closed with 1007"),
    "Invalid HTTP request received.": (logging.WARNING, "Invalid HTTP request received"),
    "Unsupported upgrade request.": (logging.WARNING, "Unsupported upgrade request"),
    "ASGI callable returned without completing handshake.":  # after each refused handshake (uvicorn PR #3138)
        (logging.ERROR, "ASGI callable returned without completing handshake"),
}


class _ClientCausedFilter(logging.Filter):
    """uvicorn's lines that a client causes: no traceback, and each at most once per 10 s, with a count."""

    def __init__(self) -> None:
        super().__init__()
        self._throttle = _Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        rewrite = _CLIENT_CAUSED.get(record.msg) if isinstance(record.msg, str) else None
        if rewrite is None:
            return True
        held = self._throttle(record.msg)
        if held is None:
            return False
        record.levelno, text = rewrite
        record.levelname = logging.getLevelName(record.levelno)
        record.msg = text + (f" ({held} more since the last report)" if held else "")
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(record.levelno)  # the level it passed at may differ


# --------------------------------------------------------------------------
# The seam's implementation
# --------------------------------------------------------------------------


class ServerSupport(_ServerSupport):
    """The core's :class:`ws_micro._ServerSupport`, for uvicorn and daphne."""

    def __init__(self) -> None:
        super().__init__()
        self._reported: set[str | None] = set()  # each reason the fast path is on or off, said once
        self._corks = _Corks()  # shared by the connections of the process's event loop, which runs one round at a time
        self._served = False  # under serve() (ws-micro), which chose the server's options
        _redact_daphne_access_log()  # now, as the app is made: daphne runs no lifespan, where harden() would

    def output(self, scope: Scope, receive: Receive, send: Send, settings: Settings, metrics: _Metrics) -> _Output:
        """:class:`_UvicornOutput` under uvicorn's websockets-sansio engine, :class:`_DaphneOutput` under daphne,
        ASGI's ``send`` elsewhere.  Whether it writes past ASGI is ``ws_micro_fast_path`` in /metrics; the log
        says why not, once per reason."""
        engine, why_not, level = _sansio_engine(receive, send, settings, self._served)
        if engine is not None and why_not is None and not settings.fast_path:
            why_not = "the fast_path setting is off"
        if engine is not None:  # the engine's bounds hold whether or not frames may go past ASGI
            _lighten(engine)  # before the output takes the engine's flag
            output: _Output = _UvicornOutput(engine, send, settings, metrics, self._corks, direct=why_not is None)
            _fit_engine(engine, settings)
            _trim_handshake(engine, scope)
        elif (protocol := _DaphneOutput.protocol(send)) is None:
            output = _Output(send)
        elif (untested := _untested("daphne")) is not None:  # said once already, as a WARNING
            output = _Output(send)
            why_not = untested
        else:
            output = _DaphneOutput(send, protocol)
        metrics.fast_path = int(why_not is None)
        if why_not not in self._reported:
            self._reported.add(why_not)
            if why_not is None:
                logger.info("fast path on: frames are written straight to uvicorn's transport")
            else:
                logger.log(level, "fast path off: %s; frames go through ASGI", why_not)
        return output

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """A round (see :class:`_Corks`) for the frames written inside, unless one is under way."""
        corks = self._corks
        if corks.round:
            yield
            return
        corks.begin()
        try:
            yield
        finally:
            corks.end()

    def harden(self) -> None:
        server_log = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _ClientCausedFilter) for f in server_log.filters):
            server_log.addFilter(_ClientCausedFilter())

    def http_protocol(self, gateway: _Gateway, head_timeout: float, max_open: int,
                      max_head: int) -> type[asyncio.Protocol] | None:
        self._served = True
        if _untested("uvicorn") is not None:  # said once, as a WARNING
            return None
        return _guarded_http_protocol(gateway, head_timeout, max_open, max_head)
