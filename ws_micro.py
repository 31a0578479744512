# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "starlette>=0.44",
#     "uvicorn>=0.52.1",
#     "websockets>=15.0",
#     "msgspec>=0.19",
#     "anyio>=4.4",
# ]
# ///
"""ws_micro: a WebSocket gateway in one module.

Browsers and programs hold WebSocket connections at ``/ws/py_client``; each gets
an id, and JSON events move between them, their rooms and the backends beside
the gateway (through a small sidecar HTTP API).  The wire protocol is the one of
the FastAPI tutorial this project grew from, so its clients work unchanged::

    {"event": "ping", "client_id": "<id>", "data": {"data": {...}}, "to": ..., "room": ...}

Run it::

    uvicorn ws_micro:app                  # configured from WS_MICRO_* variables
    python ws_micro.py --port 8000        # or `ws-micro`; `--help` lists every setting
    python ws_micro.py config             # a config file of every setting, for --config
    python ws_micro.py client [URL]       # a line-oriented client: JSON in, JSON out

or mount ``create_app(registry=...)`` in a Starlette or FastAPI app.  Every field
of :class:`Settings` and :class:`ServerSettings` is a keyword argument, a flag
(``--max-message-size``), a variable (``WS_MICRO_MAX_MESSAGE_SIZE``) and a key of
the TOML file that ``--config`` or ``WS_MICRO_CONFIG`` names (``max_message_size``).

This module is the whole gateway for one instance, and reaches its server and its
libraries through their public APIs only (it also reads two texts they keep stable without
promising to: uvicorn's ``LOGGING_CONFIG``, and asyncio's message for one error; it degrades
quietly if they change): copied alone, it runs.  It reads top to
bottom: settings, the protocol, access, metrics, the output seam, a connection,
recovery, the backend seam, the registry, authentication, forwarding, the endpoint,
the sidecar API and ``create_app``; then ``serve()``, the Python client and the
command line.  Two sibling modules add what it cannot do alone, each loaded only
when it sits beside this one, at the same version: ``ws_micro_redis.py`` (cluster
mode, when ``redis_url`` is set) and ``ws_micro_servers.py`` (what needs a
server's internals: uvicorn's fast path and engine bounds, a deadline on request
heads, daphne's flow control).

Naming: the names in ``__all__`` are the public API; everything else has a leading
underscore and may change.  Upper-case constants without one are values a client or
an operator sees (error codes, close codes, header names, metric labels, fixed
bounds), each documented in docs/; a metric's label values are a tuple beside the
code that counts them, and every label starts at 0.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import base64
import bisect
import collections
import contextlib
import dataclasses
import datetime
import difflib
import enum
import errno
import fnmatch
import functools
import hashlib
import heapq
import hmac
import importlib
import importlib.util
import inspect
import ipaddress
import itertools
import linecache
import logging
import logging.config
import math
import os
import re
import secrets
import shutil
import signal
import struct
import sys
import textwrap
import threading
import time
import tomllib
import traceback
import types
import typing
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self, TypeVar, get_type_hints
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlsplit

import anyio
import anyio.from_thread
import anyio.lowlevel
import msgspec
from starlette.applications import Starlette
from starlette.datastructures import URLPath
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Match, Mount, NoMatchFound, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

if typing.TYPE_CHECKING:  # imported where used: only a backend URL needs it (_BackendClient)
    import h11

__version__ = "0.3.0"

__all__ = [
    "BackendUnavailable",
    "Client",
    "Event",
    "HandshakeRefused",
    "Payload",
    "Refuse",
    "Registry",
    "RequestError",
    "ServerSettings",
    "SessionLost",
    "Settings",
    "app",
    "create_app",
    "main",
    "options_from_env",
    "serve",
]

logger = logging.getLogger("ws_micro")

# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------

ENV_PREFIX = "WS_MICRO_"
CONFIG_VARIABLE = ENV_PREFIX + "CONFIG"  # names the TOML file of settings, as ``--config`` does


# Each field's docstring is its one-line description, and the comment after a blank line names its group: they are
# what --help, ``ws-micro config`` and docs/configuration.md's tables say (read from this source by _described).
@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """What the application does; each field is a ``create_app()`` keyword."""

    # Endpoint
    path: str = "/ws/py_client"
    """Path of the WebSocket endpoint; it must start with ``/``."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed besides the page's own; ``*`` allows any."""
    fast_path: bool = True
    """Under uvicorn, read and write frames past ASGI (ws_micro_servers.py)."""

    # Limits
    max_message_size: int = 64 * 1024
    """Largest frame a client may send, in bytes: 1009 past it (API pushes: 413)."""
    max_connections: int = 10_000
    """Open connections, handshakes included; past this, handshakes get 503."""
    rate_limit: float = 5000.0
    """Frames per second a connection may send (a token bucket); 0: no limit."""
    rate_burst: int = 1000
    """Frames a connection may send at once; after as many more refused: 1008."""
    max_queue_messages: int = 1000
    """Frames waiting for one slow reader before it is closed with 1008."""
    max_queue_bytes: int = 1024 * 1024
    """Characters of JSON waiting for one slow reader before it is closed (1008)."""
    max_rooms_per_connection: int = 100
    """Rooms one connection may be in at once."""
    max_room_name_length: int = 128
    """Longest room name, in characters."""
    send_timeout: float = 10.0
    """Seconds a frame may wait for a client's socket before it is closed (1008)."""
    close_timeout: float = 5.0
    """Seconds to flush a client's queue before a close, and for the close frame."""

    # Browser page
    static_dir: str = "auto"
    """Folder of the page at / and /static/; "auto": the one shipped; "": none."""

    # Sidecar API (docs/api.md)
    api_token: str | None = None
    """Bearer token for ``/api/*``; without one, the API answers loopback peers only."""
    api_body_timeout: float = 10.0
    """Seconds a push body may take to arrive; a slower one gets 408."""
    api_page_size: int = 100
    """Entries in a page of a listing (GET /api/clients, ...) asking no limit."""
    api_max_page_size: int = 1000
    """Largest limit a listing takes; a larger one gets 400."""
    api_max_page_bytes: int = 1024 * 1024
    """Bytes of JSON entries after which a page of a listing ends early."""

    # Authentication (docs/auth.md): on when a jwt_* key or connect_hook_url is set
    jwt_secret: str | None = None
    """Key of the HS256 tokens clients bring (pip install 'pyjwt[crypto]')."""
    jwt_public_key: str | None = None
    """Public key of RS256 or ES256 tokens: PEM text, or a PEM file's path."""
    jwt_audience: str | None = None
    """The ``aud`` every token must name; unset, tokens that name one are refused."""
    jwt_issuer: str | None = None
    """The ``iss`` every token must name, if set."""
    connect_hook_url: str | None = None
    """Backend URL that vets handshakes without a token (docs/auth.md)."""
    connect_hook_timeout: float = 3.0
    """Seconds the connect hook may take to answer; then the handshake gets 503."""
    connect_hook_max_pending_per_address: int = 10
    """One address's handshakes waiting on the hook; more get 503; 0: no share."""
    connect_hook_headers: tuple[str, ...] = ()
    """Headers for the hook besides Cookie, Authorization, Origin and User-Agent."""
    backend_secret: str | None = None
    """Key signing the gateway's requests to the backend (HMAC-SHA256)."""
    # Permissions with authentication on; without it, any client may join, publish and relay anywhere.
    default_join: tuple[str, ...] = ()
    """Room patterns (``chat:*``) any authenticated connection may join."""
    default_publish: tuple[str, ...] = ()
    """Room patterns any authenticated connection may send to."""
    default_relay: bool = False
    """Whether any authenticated connection may send to a client by id (``to``)."""
    presence_events: bool = False
    """Tell a room's members (a ``presence`` event) when someone joins or leaves."""
    revocation_ttl: float = 24 * 3600.0
    """Seconds a user's tokens stay revoked: more than their longest lifetime."""

    # Forwarding (docs/backend.md): client events, connects and disconnects
    forward_url: str | None = None
    """Backend URL the events no handler takes are sent to (docs/backend.md)."""
    forward_events: tuple[str, ...] = ("*",)
    """Event names or patterns (``chat``, ``game:*``) to forward; others: unknown_event."""
    forward_timeout: float = 5.0
    """Seconds the backend may take to answer an event; then backend_unavailable."""
    forward_max_pending: int = 1000
    """Events waiting for the backend at once; more get backend_unavailable."""
    forward_max_pending_per_user: int = 10
    """Of those, the most one user (or address) may have; 0: no share."""
    forward_batch: int = 1
    """Events one request may carry, as a JSON array (docs/backend.md); 1: none."""
    forward_batch_bytes: int = 64 * 1024
    """Bytes of events one batch may carry; an event larger than this goes alone."""
    lifecycle_url: str = "auto"
    """URL told of connects and disconnects; "auto": forward_url; "": none."""
    lifecycle_retries: int = 3
    """Tries more for a notice the backend did not take, before it is dropped."""
    lifecycle_max_queued_per_user: int = 100
    """Notices of one user (or address) waiting; more are dropped; 0: no share."""

    # Connection recovery (docs/recovery.md): off unless recovery_window is set
    recovery_window: float = 0.0
    """Seconds a dropped client may resume, with the frames it missed; 0: off."""
    recovery_max_frames: int = 100
    """Frames kept for a session: the last sent to it, and those sent while away."""
    recovery_max_bytes: int = 256 * 1024
    """Characters of JSON kept for one session, likewise."""
    recovery_max_sessions: int = 10_000
    """Sessions waiting for their client at once; past this, the oldest ends."""
    recovery_max_sessions_per_user: int = 1000
    """Of those, the most one user (or address) may have; 0: no share."""
    recovery_max_memory: int = 64 * 1024 * 1024
    """Bytes all waiting sessions' frames may take; past this, the oldest end."""

    # Cluster over Redis (docs/cluster.md; pip install 'redis[hiredis]')
    redis_url: str | None = None
    """The Redis the instances share: redis://host:port/db, redis+sentinel://..."""
    redis_prefix: str = "ws_micro"
    """Prefix of every Redis key and channel, for clusters sharing one Redis."""
    redis_timeout: float = 2.0
    """Seconds a Redis command may take before Redis counts as unavailable."""
    heartbeat_interval: float = 2.0
    """Seconds between an instance's heartbeats."""
    instance_ttl: float = 10.0
    """Seconds without a heartbeat before an instance and its clients are gone."""

    @property
    def lifecycle_target(self) -> str | None:
        """The URL connects and disconnects are POSTed to, if any."""
        return self.forward_url if self.lifecycle_url == "auto" else self.lifecycle_url or None

    @property
    def authenticating(self) -> bool:
        """Whether handshakes must be authenticated (by a token or the connect hook)."""
        return bool(self.jwt_secret or self.jwt_public_key or self.connect_hook_url)

    def __post_init__(self) -> None:
        # Each error starts with the setting's name: the command line puts where the value came from in its place.
        _refuse_infinities(self)
        for name in ("max_message_size", "max_connections", "rate_burst", "max_queue_messages",
                     "max_queue_bytes", "max_rooms_per_connection", "max_room_name_length", "forward_max_pending",
                     "forward_batch", "forward_batch_bytes",
                     "recovery_max_frames", "recovery_max_bytes", "recovery_max_sessions", "recovery_max_memory",
                     "api_page_size", "api_max_page_size", "api_max_page_bytes"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be at least 1, but got {value!r}")
        for name in ("rate_limit", "recovery_window", "forward_max_pending_per_user",
                     "connect_hook_max_pending_per_address", "lifecycle_max_queued_per_user",
                     "recovery_max_sessions_per_user"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off) or more, but got {getattr(self, name)!r}")
        for name in ("send_timeout", "close_timeout", "api_body_timeout", "redis_timeout", "heartbeat_interval",
                     "instance_ttl", "connect_hook_timeout", "forward_timeout", "revocation_ttl"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be more than 0, but got {getattr(self, name)!r}")
        if self.api_page_size > self.api_max_page_size:
            raise ValueError(f"api_page_size must be at most api_max_page_size ({self.api_max_page_size!r}), "
                             f"but got {self.api_page_size!r}")
        if self.instance_ttl <= self.heartbeat_interval:
            raise ValueError(f"instance_ttl must be longer than heartbeat_interval ({self.heartbeat_interval!r}), "
                             f"but got {self.instance_ttl!r}")
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', but got {self.path!r}")
        if self.lifecycle_retries < 0:
            raise ValueError(f"lifecycle_retries must be 0 or more, but got {self.lifecycle_retries!r}")
        for name in ("connect_hook_url", "forward_url", "lifecycle_url"):
            url = getattr(self, name)
            if url in (None, "", "auto"):
                continue
            if _url_scheme(url) not in ("http", "https"):
                raise ValueError(f"{name} must be an http:// or https:// URL, but got {_without_password(url)!r}")
            if not self.backend_secret:
                raise ValueError(f"{name} needs backend_secret, the key the backend checks the gateway's requests "
                                 "with (python -c 'import secrets; print(secrets.token_hex(32))')")
        if self.redis_url and _url_scheme(self.redis_url) not in ("redis", "rediss", "unix", "redis+sentinel",
                                                                  "rediss+sentinel"):
            raise ValueError("redis_url must be a redis://, rediss://, unix://, redis+sentinel:// or "
                             f"rediss+sentinel:// URL, but got {_without_password(self.redis_url)!r}")
        if self.static_dir not in ("auto", "") and not (Path(self.static_dir) / "index.html").is_file():
            raise ValueError(f"static_dir must be a folder with an index.html, but got {self.static_dir!r}")


_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's; trace is its own, below debug


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """How :func:`serve` runs uvicorn; under ``uvicorn ws_micro:app`` use uvicorn's own flags."""

    # Server (ws-micro and serve() only; under uvicorn ws_micro:app, its flags)
    host: str = "localhost"
    """Interface to listen on."""
    port: int = 8000
    """TCP port to listen on."""
    log_level: str = "info"
    """Level of the log: critical, error, warning, info, debug or trace."""
    max_head_size: int = 32768
    """Largest request head (request line and headers), in bytes; past it: 431."""
    per_message_deflate: bool = False
    """Compression (permessage-deflate): it costs tens of KiB per connection."""

    # Server timeouts
    ping_interval: float = 20.0
    """Seconds between protocol pings; 0 turns keepalive off."""
    ping_timeout: float = 20.0
    """Seconds to wait for a pong before closing with 1011; 0: no limit."""
    graceful_timeout: int = 10
    """Seconds open work may take after SIGTERM; every client first gets 1012."""
    handshake_timeout: float = 5.0
    """Seconds a connection may take to send its request head; then 408; 0: off."""

    def __post_init__(self) -> None:
        _refuse_infinities(self)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, but got {self.port!r}")
        for name in ("ping_interval", "ping_timeout", "graceful_timeout", "handshake_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, but got {getattr(self, name)!r}")
        if self.max_head_size < 1:
            raise ValueError(f"max_head_size must be at least 1, but got {self.max_head_size!r}")
        if self.log_level.lower() not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(_LOG_LEVELS)}, but got {self.log_level!r}")


def _refuse_infinities(settings: Settings | ServerSettings) -> None:
    """NaN would pass every bound (``nan < 0`` is False: a rate limit of nan limits nothing), and an infinite
    timeout is a limit turned off where 0 does not say so: refuse both, for every number."""
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{field.name} must be a finite number, but got {value!r}")


def _without_password(url: str) -> str:
    """``url`` as an error may quote it: its password (``user:password@``, ``?password=``) starred out."""
    return re.sub(r"((?:^|[?&_])password=)[^&#]*", r"\1***", re.sub(r"(//[^/?#@]*?:)[^/?#@]*@", r"\1***@", url))


def _url_scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme
    except ValueError:  # not a URL: an unclosed [ in its host
        return ""


def options_from_env(cls: type[Settings | ServerSettings],
                     environ: Mapping[str, str]) -> dict[str, Any]:
    """The fields of ``cls`` that ``environ`` sets, converted to their types: its ``WS_MICRO_<FIELD>`` variables,
    over the keys of the TOML file that ``WS_MICRO_CONFIG`` names, if any."""
    names = [field.name for field in dataclasses.fields(cls)]
    return {name: given.value for name, given in _given(environ, names).items()}


class _Given(typing.NamedTuple):
    """A setting's value, and where it was given, as an error about it says."""

    value: Any
    source: str  # "--max-connections", "WS_MICRO_MAX_CONNECTIONS" or "gateway.toml: max_connections"


def _given(environ: Mapping[str, str], names: Collection[str], config: str | None = None,
           flags: Mapping[str, str | bool] | None = None) -> dict[str, _Given]:
    """The settings among ``names`` that are given: by ``flags`` (their text, or a bool), over ``environ``'s
    variables, over the config file (``config``, else the one ``WS_MICRO_CONFIG`` names), each of its type."""
    kinds = _setting_types()
    path, source = (config, "--config") if config is not None else (environ.get(CONFIG_VARIABLE), CONFIG_VARIABLE)
    given = _read_config(path, source, names) if path else {}
    for name in names:
        variable = ENV_PREFIX + name.upper()
        if variable in environ:
            given[name] = _Given(_converted(kinds[name], environ[variable], variable), variable)
    for name, value in (flags or {}).items():
        flag = _option(name)
        given[name] = _Given(value if isinstance(value, bool) else _converted(kinds[name], value, flag), flag)
    return given


@functools.cache
def _setting_types() -> dict[str, Any]:
    """The type of every setting, by name: the fields of Settings and ServerSettings."""
    return {**get_type_hints(Settings), **get_type_hints(ServerSettings)}


def _converted(kind: Any, text: str, source: str) -> Any:
    try:
        return _convert(kind, text)
    except ValueError as exc:
        raise ValueError(f"{source} {exc}") from None


def _convert(kind: Any, text: str) -> Any:
    """Parse an environment variable or flag value into the type its setting declares."""
    if kind is bool:
        if text.lower() in {"1", "true", "yes", "on"}:
            return True
        if text.lower() in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"must be true or false, but got {text!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}, but got {text!r}") from None
    if kind == tuple[str, ...]:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    if isinstance(kind, types.UnionType):  # str | None: an empty value means unset
        return text or None
    return text


_SECRETS = ("api_token", "jwt_secret", "backend_secret")  # ws-micro config makes fresh ones
_CONFIG_MAX_BYTES = 1024 * 1024  # every setting at its longest is a few KiB; /dev/zero would fill the memory


def _read_config(path: str, source: str, names: Collection[str]) -> dict[str, _Given]:
    """The settings among ``names`` in the TOML file at ``path`` (named by ``source``), each of its type.  Its keys
    are the settings' names, at the top level: any other key is refused, with the closest setting's name."""
    try:
        with open(path, "rb") as file:
            data = file.read(_CONFIG_MAX_BYTES + 1)
            shared = os.name == "posix" and os.fstat(file.fileno()).st_mode & 0o044  # readable by group or others
    except OSError as exc:
        raise ValueError(f"{source} names {path!r}, which cannot be read: {exc.strerror}") from None
    if len(data) > _CONFIG_MAX_BYTES:
        raise ValueError(f"{path}: not a config file: larger than {_CONFIG_MAX_BYTES} bytes")
    try:
        table = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a TOML file: {exc}") from None
    kinds = _setting_types()
    for key, value in table.items():
        if key not in kinds:
            close = difflib.get_close_matches(key, kinds, n=1)
            hint = ("settings are top-level keys, not tables" if isinstance(value, dict) else
                    f"did you mean {close[0]!r}?" if close else "the keys are the settings' names (ws-micro config)")
            raise ValueError(f"{path}: {key!r} is not a setting; {hint}")
    given = {name: _Given(_from_toml(kinds[name], table[name], f"{path}: {name}"), f"{path}: {name}")
             for name in names if name in table}
    # ssh refuses a private key others can read; a config file may be a mounted secret (Kubernetes mounts
    # them 0644, owned by root): say so, once, and go on.
    secret = [name for name, value in given.items() if value.value and (
        name in _SECRETS or (name == "redis_url" and ("@" in value.value or "password=" in value.value)))]
    if secret and shared:
        logger.warning("%s holds %s, but other users can read it: chmod 600 %s", path, " and ".join(secret), path)
    return given


def _from_toml(kind: Any, value: Any, source: str) -> Any:
    """A config file's value as its setting's type: TOML's own types, checked as _convert checks a variable."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and number and isinstance(value, int):
        return value
    if kind is float and number:
        with contextlib.suppress(OverflowError):  # an integer too large for a float
            return float(value)
    if kind == tuple[str, ...] and isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    if kind is str and isinstance(value, str):
        return value
    if kind == str | None and isinstance(value, str):  # an empty string means unset, as for a variable
        return value or None
    accepted = {bool: "true or false", int: "an integer", float: "a number", tuple[str, ...]: "a list of strings"}
    raise ValueError(f"{source} must be {accepted.get(kind, 'a string')}, but got {value!r}")


# --------------------------------------------------------------------------
# Protocol: events, error codes and close codes
# --------------------------------------------------------------------------

# Error codes carried by {"event": "error"} frames (and by API error bodies).
INVALID_JSON = "invalid_json"
INVALID_EVENT = "invalid_event"
CLIENT_ID_MISMATCH = "client_id_mismatch"
UNKNOWN_CLIENT = "unknown_client"
NOT_IN_ROOM = "not_in_room"
UNKNOWN_EVENT = "unknown_event"
RATE_LIMITED = "rate_limited"
INTERNAL_ERROR = "internal_error"
BACKEND_UNAVAILABLE = "backend_unavailable"  # cluster mode: the instance of the recipients cannot be reached
FORBIDDEN = "forbidden"  # outside the connection's permissions (and, from the API, a request it refuses)
BACKEND_ERROR = "backend_error"  # a forwarded event's backend answered with an error status, or garbage
# Sidecar API only.
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
INVALID_PARAMETER = "invalid_parameter"  # a name in the path, or a query parameter, that the API cannot take
ERROR_CODES = (INVALID_JSON, INVALID_EVENT, CLIENT_ID_MISMATCH, UNKNOWN_CLIENT, NOT_IN_ROOM,
               UNKNOWN_EVENT, RATE_LIMITED, INTERNAL_ERROR, BACKEND_UNAVAILABLE, FORBIDDEN, BACKEND_ERROR)

# Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
MAX_CLOSE_REASON = 123  # bytes of a close reason: a close frame's payload is at most 125, the code taking 2


class Payload(msgspec.Struct):
    """The tutorial's ``WebsocketData``: an event's content sits one level down, in ``data.data``."""

    data: dict[str, Any]


class Event(msgspec.Struct, omit_defaults=True):
    """The envelope of every frame, both ways (the tutorial's ``WebsocketEvent``)."""

    event: str
    client_id: str
    data: Payload
    # Routing: a client id, or a room the sender has joined; absent from server frames.
    to: str | None = None
    room: str | None = None
    # A request's id (docs/protocol.md, Requests and replies), back on every answer to the frame; its bounds
    # are checked by the gateway (_bad_request_id), so that a client still reads any frame an older one relays.
    id: str | int | None = None


# The bounds of a request's id.  A string: room for a UUID, or a ULID with a prefix, and small, since every
# answer carries it back.  An integer: one a JavaScript number holds exactly (Number.MAX_SAFE_INTEGER), so
# that a browser gets back the id it sent.
MAX_REQUEST_ID_LENGTH = 128
MAX_SAFE_INTEGER = 2**53 - 1
_REQUEST_ID_RULE = (f"id must be a string of 1 to {MAX_REQUEST_ID_LENGTH} characters or an integer from "
                    f"{-MAX_SAFE_INTEGER} to {MAX_SAFE_INTEGER}")


def _bad_request_id(value: object) -> str | None:
    """Why ``value`` (decoded JSON) cannot be a request's id, naming it; None if it can, or is None (no id)."""
    if value is None:
        return None
    if isinstance(value, str):
        if 0 < len(value) <= MAX_REQUEST_ID_LENGTH:
            return None
        shown = _clipped(value, 40)
    elif isinstance(value, int) and not isinstance(value, bool):
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return None
        shown = str(value) if abs(value) < 10**40 else "an integer of more than 40 digits"
    else:
        try:
            text = _encode(value).decode()
        except RecursionError:  # read near the interpreter's limit, it may not be written back
            text = f"a {type(value).__name__} nested too deeply to show"
        shown = text if len(text) <= 100 else f"{text[:100]}... ({len(text)} characters)"
    return f"{_REQUEST_ID_RULE}, but got {shown}"


class _Push(msgspec.Struct):
    """The body of a sidecar API push: an event without its recipient."""

    event: str
    data: Payload


class _RoomRequest(msgspec.Struct):
    """``data.data`` of a join or leave."""

    room: str


class _Grant(msgspec.Struct):
    """Who a connection is and what it may do: a token's claims (``sub`` is the user), or the connect hook's
    answer.  Room patterns are globs (``chat:*``), added to the settings' defaults."""

    user: str | None = None
    rooms: list[str] = []  # joined at connect, and joinable again
    join: list[str] = []  # room patterns it may join
    publish: list[str] = []  # room patterns it may send to
    relay: bool | None = None  # may send to other clients by id; None: as default_relay says
    meta: dict[str, Any] | None = None  # kept on the connection, shown by the sidecar API


# What a handler may return: None (no reply), the reply's ``data.data`` (a frame of the event's own name), or
# its event name and ``data.data``.  The reply goes to the sender, with the frame's ``id`` if it had one.
_HandlerReply = Mapping[str, Any] | tuple[str, Mapping[str, Any]] | None
_Handler = Callable[[str, Event], Awaitable[_HandlerReply]]
# The registry's lifecycle hooks: on_connect(client_id, user, meta), which may refuse (False, or raising
# Refuse); on_disconnect(client_id, user, reason).
_OnConnect = Callable[[str, str | None, dict[str, Any] | None], Awaitable[bool | None]]
_OnDisconnect = Callable[[str, str | None, str], Awaitable[None]]

_decode_event = msgspec.json.Decoder(Event).decode
_decode_push = msgspec.json.Decoder(_Push).decode
_encode = msgspec.json.Encoder().encode

_T = TypeVar("_T")


def _decode(decode: Callable[[Any], _T], text: str | bytes) -> _T:
    """``decode(text)``, raising ``msgspec.DecodeError`` for every kind of bad JSON, too deeply nested too.
    Every parser of JSON that another party sends (a client, a token's header, the backend) goes through it."""
    try:
        return decode(text)
    except RecursionError:
        raise msgspec.DecodeError("JSON is nested too deeply") from None
    except msgspec.DecodeError as exc:
        # msgspec reports a lone surrogate (a "\ud800" escape not followed by its pair) as
        # "Input data was truncated", which sends the reader looking for a cut-off frame.
        truncated = str(exc) == "Input data was truncated" or "surrogate" in str(exc)
        lone = _lone_surrogate(text if isinstance(text, str) else text.decode(errors="replace")) if truncated else None
        if lone is None:
            raise
        escape, position = lone
        raise msgspec.DecodeError(f"JSON is malformed: {escape} (character {position}) is a lone UTF-16 "
                                  "surrogate; a string may hold one only as half of a pair") from None


def _clipped_bytes(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, between characters: what a close reason can hold."""
    return text.encode()[:limit].decode(errors="ignore")


def _clipped(text: str, limit: int = 100) -> str:
    """``text`` as ``repr`` shows it, cut to ``limit`` characters: an error names a bad value, whatever its size."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


_SURROGATE_ESCAPE = re.compile(r"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})")


def _lone_surrogate(text: str) -> tuple[str, int] | None:
    """The first ``\\uD800``-``\\uDFFF`` escape in ``text`` that is not half of a pair, and where it is."""
    lone: re.Match[str] | None = None
    pending: re.Match[str] | None = None  # a high surrogate, whose low half must come right after it
    for match in _SURROGATE_ESCAPE.finditer(text):
        if len(match[1]) % 2 == 0:  # an escaped backslash, then a plain "u"
            continue
        is_low = int(match[2], 16) >= 0xDC00
        if pending is not None and is_low and len(match[1]) == 1 and match.start() == pending.end():
            pending = None  # a pair: one character
        elif pending is not None or is_low:
            lone = pending or match
            break
        else:
            pending = match
    lone = lone or pending
    return None if lone is None else (lone[0][-6:], lone.end() - 6)


class _Frame:
    """A server frame encoded once and addressed to each recipient by splicing in its ``client_id`` (a UUID)."""

    __slots__ = ("head", "length", "tail")
    length: int  # of its text for any client id (a UUID), set once fanned out: what receivers' sessions count

    def __init__(self, event: str, data: Mapping[str, Any] | None) -> None:
        self.head = '{"event":' + _encode(event).decode() + ',"client_id":"'
        self.tail = '","data":{"data":' + _encode(data or {}).decode() + "}}"

    def to(self, client_id: str) -> str:
        return self.head + client_id + self.tail

    def reply(self, client_id: str, request_id: str | int | None) -> str:
        """The frame for the client whose frame it answers: with that frame's ``id`` after ``client_id``, if it
        had one.  Only the answer pays for it: fan-outs call :meth:`to`."""
        if request_id is None:
            return self.head + client_id + self.tail
        return f'{self.head}{client_id}","id":{_encode(request_id).decode()},{self.tail[2:]}'

    @classmethod
    def parts(cls, head: str, tail: str) -> _Frame:
        """The frame another instance encoded, from its ``head`` and ``tail``."""
        frame = cls.__new__(cls)
        frame.head, frame.tail = head, tail
        return frame


# Event names the protocol gives a meaning: those clients send the server (each handled by the
# endpoint's method of that name: _Gateway._ping, ...), and those only the server sends.  Neither
# kind can have a handler.  Clients may not send the server's: relayed, a forged "connect" would
# replace the receiver's id and a forged "pong" would keep a dead connection's keepalive content.
BUILTIN_EVENTS = ("ping", "echo", "join", "leave")
SERVER_EVENTS = frozenset({"connect", "error", "pong", "joined", "left", "presence"})


def _websocket_frame(payload: bytes) -> bytes:
    """``payload`` as one final, unmasked text frame (RFC 6455, 5.2): the same bytes for every receiver."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


# --------------------------------------------------------------------------
# Access: who a connection is, and what it may do
# --------------------------------------------------------------------------

# Bounds on what a token or the connect hook grants a connection.
MAX_USER_LENGTH = 256
MAX_PATTERNS = 100  # room patterns in each of join and publish
MAX_PATTERN_LENGTH = 256
MAX_META_BYTES = 4096  # the meta object, as JSON


class _Refused(Exception):
    """A handshake refused before accept: its HTTP status, error code (a rejected_handshakes_total label)
    and why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _matches(patterns: tuple[str, ...], room: str) -> bool:
    return any(pattern == "*" or fnmatch.fnmatchcase(room, pattern) for pattern in patterns)


@dataclasses.dataclass(frozen=True, slots=True)
class _Identity:
    """Who a connection is and what it may do.  ``ANONYMOUS``, shared by every connection when
    authentication is off, may do anything: the tutorial's protocol, unchanged."""

    user: str | None = None
    meta: dict[str, Any] | None = None
    rooms: tuple[str, ...] = ()  # joined at connect
    join: tuple[str, ...] = ("*",)  # room patterns it may join
    publish: tuple[str, ...] = ("*",)  # room patterns it may send to
    relay: bool = True  # may send to other clients by id
    authenticated: bool = False  # its connect frame names its user and rooms

    def may_join(self, room: str) -> bool:
        return room in self.rooms or _matches(self.join, room)

    def may_publish(self, room: str) -> bool:
        return _matches(self.publish, room)


ANONYMOUS = _Identity()


def _bad_room_name(room: str, settings: Settings) -> str | None:
    """Why ``room`` cannot be a room's name; None if it can."""
    if 0 < len(room) <= settings.max_room_name_length:
        return None
    return f"room names have 1 to {settings.max_room_name_length} characters, but got {len(room)}"


def _identity(grant: _Grant, settings: Settings) -> _Identity:
    """The identity a grant gives, with the settings' defaults; ValueError says what in it is out of bounds."""
    if grant.user is not None and not 0 < len(grant.user) <= MAX_USER_LENGTH:
        raise ValueError(f"the user must have 1 to {MAX_USER_LENGTH} characters, but got {len(grant.user)}")
    rooms = tuple(dict.fromkeys(grant.rooms))
    if len(rooms) > settings.max_rooms_per_connection:
        raise ValueError(f"at most {settings.max_rooms_per_connection} rooms, but got {len(rooms)}")
    for room in rooms:
        problem = _bad_room_name(room, settings)
        if problem is not None:
            raise ValueError(problem)
    for name, patterns in (("join", grant.join), ("publish", grant.publish)):
        if len(patterns) > MAX_PATTERNS:
            raise ValueError(f"at most {MAX_PATTERNS} {name} patterns, but got {len(patterns)}")
        if any(not 0 < len(pattern) <= MAX_PATTERN_LENGTH for pattern in patterns):
            raise ValueError(f"{name} patterns have 1 to {MAX_PATTERN_LENGTH} characters")
    if grant.meta is not None and len(_encode(grant.meta)) > MAX_META_BYTES:
        raise ValueError(f"meta must be at most {MAX_META_BYTES} bytes of JSON")
    return _Identity(user=grant.user, meta=grant.meta, rooms=rooms,
                     join=(*settings.default_join, *grant.join), publish=(*settings.default_publish, *grant.publish),
                     relay=settings.default_relay if grant.relay is None else grant.relay, authenticated=True)


def _share_key(user: str | None, host: str | None) -> str | None:
    """Whose share of a pool (the backend's, the waiting sessions') something counts against, in words
    for a message: its user's, if it has one; else its address's (an IPv6 address's /64, which one
    subscriber holds whole as it would one IPv4 address); None when the server gives no address (a Unix
    socket)."""
    if user is not None:
        return f"user {user!r}"
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # not an IP address: a name some server gave, counted as it is
        return f"address {host}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is None:
            return f"addresses {ipaddress.IPv6Network((address, 64), strict=False)}"
        address = address.ipv4_mapped  # an IPv4 client of a dual-stack listener
    return f"address {address}"


MAX_REVOCATIONS = 100_000  # users whose tokens are revoked at once (about 10 MB); each expires after revocation_ttl


class _Revocations:
    """Users whose tokens issued before a time are refused, as Centrifugo's token invalidation does: a client
    cannot get back in with the token it has, even one the gateway remembers.  Each revocation lasts until
    its expiry (longer than the tokens live); in cluster mode the backend shares them.  A token without
    ``iat`` is refused while its user's revocation stands: when it was issued cannot be told."""

    def __init__(self) -> None:
        self._revoked: dict[str, tuple[float, float]] = {}  # user -> (tokens issued up to then are refused, until)

    def add(self, user: str, before: float, until: float) -> None:
        """Refuse ``user``'s tokens issued up to ``before`` until ``until`` (Unix times); ValueError past
        MAX_REVOCATIONS."""
        if user in self._revoked:
            before, until = max(before, self._revoked[user][0]), max(until, self._revoked[user][1])
        elif len(self._revoked) >= MAX_REVOCATIONS:
            now = time.time()
            self._revoked = {name: entry for name, entry in self._revoked.items() if entry[1] > now}
            if len(self._revoked) >= MAX_REVOCATIONS:
                raise ValueError(f"{MAX_REVOCATIONS} revocations are kept already; they expire after revocation_ttl")
        self._revoked[user] = (before, until)

    def revoked(self, user: str | None, issued_at: float | None) -> float | None:
        """The time up to which ``user``'s tokens are refused, if a token issued at ``issued_at`` is one."""
        if user is None or (entry := self._revoked.get(user)) is None:
            return None
        before, until = entry
        if time.time() >= until:
            del self._revoked[user]
            return None
        return before if issued_at is None or issued_at <= before else None


# --------------------------------------------------------------------------
# Metrics and the log
# --------------------------------------------------------------------------

# Why handshakes are refused (the rejected_handshakes_total labels): a disallowed origin, a full
# server, a request head that did not arrive within handshake_timeout; no valid credentials (401),
# credentials the connect hook refused (403), a connect hook that did not answer (503), an address
# with connect_hook_max_pending_per_address handshakes waiting for the hook already (503); under serve(),
# a head over max_head_size or over websockets' line limits (431, 414), or one websockets cannot read (400);
# a path that is not the endpoint (404); the registry's on_connect hook refused it (403), or raised or took too
# long (503).
HANDSHAKE_REFUSALS = ("origin", "full", "timeout", "unauthorized", "forbidden", "auth_unavailable",
                      "invalid_resume", "resume_token_used", "over_share", "too_large", "invalid_request", "not_found",
                      "refused", "hook_failed")

# Why connections end (the disconnects_total labels); "refused": on_connect refused (or failed for) a
# session that began after its handshake was accepted (a resume that found its session gone).
# "taken_for_dead": in cluster mode, its instance came back after the others had taken it for dead (stopped, or
# cut off from Redis, for longer than instance_ttl), so frames for it may have been lost meanwhile.
DISCONNECT_REASONS = ("closed", "abnormal", "shutdown", "peer_error", "kicked", "slow_consumer",
                      "rate_limited", "message_too_big", "binary_frame", "internal_error", "refused", "taken_for_dead")

# Who asked for an event only the gateway sends (SERVER_EVENTS), refused (the server_events_refused_total
# labels): a forwarding backend's answer, a push through the sidecar API, the registry's send methods
# called from Python (a handler, a route of the host app).
EVENT_SOURCES = ("backend", "api", "python")

# name, type, help, samples by label value, label name ("": no label)
_MetricFamily = tuple[str, str, str, Mapping[str, int], str]


class _Histogram:
    """A Prometheus histogram of durations, in seconds."""

    BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self.counts = [0] * (len(self.BOUNDS) + 1)  # the last: over every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.sum += seconds

    def lines(self) -> list[str]:
        name = f"ws_micro_{self.name}"
        lines = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        for bound, count in zip((*map(str, self.BOUNDS), "+Inf"), itertools.accumulate(self.counts), strict=True):
            lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
        return [*lines, f"{name}_sum {self.sum}", f"{name}_count {sum(self.counts)}"]


class _Metrics:
    """Counters behind ``/metrics`` (Prometheus text format)."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.messages_received = 0
        self.messages_sent = 0
        # Every known label starts at 0, so rate() sees a counter before its first increment.
        self.errors = collections.Counter(dict.fromkeys(ERROR_CODES, 0))
        self.disconnects = collections.Counter(dict.fromkeys(DISCONNECT_REASONS, 0))
        self.rejected_handshakes = collections.Counter(dict.fromkeys(HANDSHAKE_REFUSALS, 0))
        self.server_events_refused = collections.Counter(dict.fromkeys(EVENT_SOURCES, 0))
        self.fast_path = 0  # 1 while the newest connection writes past ASGI (ws_micro_servers.py)
        self.fast_reads = 0  # frames ws_micro_servers.py handed from the server's parser straight to the gateway

    def render(self, connections: int, extra: Sequence[_MetricFamily | _Histogram] = ()) -> str:
        families: list[_MetricFamily | _Histogram] = [
            ("open_connections", "gauge", "WebSocket connections open now.", {"": connections}, ""),
            ("connections_total", "counter", "WebSocket connections accepted.", {"": self.connections_total}, ""),
            ("messages_received_total", "counter", "Frames received from clients.", {"": self.messages_received}, ""),
            ("messages_sent_total", "counter", "Frames written to clients.", {"": self.messages_sent}, ""),
            ("errors_total", "counter", "Error events sent, by code.", self.errors, "code"),
            ("disconnects_total", "counter", "Closed connections, by reason.", self.disconnects, "reason"),
            ("rejected_handshakes_total", "counter", "Handshakes refused before accept, by reason.",
             self.rejected_handshakes, "reason"),
            ("server_events_refused_total", "counter", "Events only the gateway sends, refused, by who asked.",
             self.server_events_refused, "source"),
            ("fast_path", "gauge", "1 while the newest connection's frames are written past ASGI.",
             {"": self.fast_path}, ""),
            ("fast_reads_total", "counter", "Frames handed from the server's parser to the gateway past ASGI.",
             {"": self.fast_reads}, ""),
            *extra,
        ]
        lines: list[str] = []
        for family in families:
            if isinstance(family, _Histogram):
                lines += family.lines()
                continue
            name, kind, help, samples, label = family
            lines += [f"# HELP ws_micro_{name} {help}", f"# TYPE ws_micro_{name} {kind}"]
            lines += [f'ws_micro_{name}{{{label}="{key}"}} {value}' if label else f"ws_micro_{name} {value}"
                      for key, value in sorted(samples.items())]
        return "\n".join(lines) + "\n"


class _Throttle:
    """At most one report per ``interval`` seconds for each key: whatever a client can make happen
    as often as it connects or sends must not write a log line each time."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._reported_at: dict[str, float] = {}
        self._held: collections.Counter[str] = collections.Counter()

    def __call__(self, key: str) -> int | None:
        """None: hold this one back; else report it, with how many were held back since the last."""
        now = time.monotonic()
        if key in self._reported_at and now - self._reported_at[key] < self.interval:
            self._held[key] += 1
            return None
        self._reported_at[key] = now
        return self._held.pop(key, 0)

    def warn(self, key: str, message: str, level: int = logging.WARNING) -> None:
        """Log ``message`` (a warning, unless ``level`` says), unless one for ``key`` was logged within ``interval``."""
        held = self(key)
        if held is not None:
            logger.log(level, "%s%s", message, f" ({held} more since the last report)" if held else "")


# --------------------------------------------------------------------------
# Output: where a connection's frames go (the server seam)
# --------------------------------------------------------------------------


def _start_now(awaitable: Awaitable[None]) -> Awaitable[None] | None:
    """Run ``awaitable`` up to its first suspension: None if it finished, else an awaitable of the rest
    (which behaves as ``await awaitable`` would have).  An ASGI ``send`` usually finishes at once."""
    steps = awaitable.__await__()  # an iterator; not always a generator (granian's is not)
    try:
        first = steps.send(None) if hasattr(steps, "send") else next(steps)
    except StopIteration:
        return None
    return _rest_of(steps, first)


@types.coroutine
def _rest_of(steps: Any, yielded: Any) -> Generator[Any, Any, None]:
    while True:
        try:
            try:
                value = yield yielded
            except BaseException as exc:  # thrown in by the event loop (cancellation): pass it on
                if not hasattr(steps, "throw"):
                    raise
                yielded = steps.throw(exc)
            else:
                yielded = steps.send(value) if hasattr(steps, "send") else next(steps)
        except StopIteration:
            return


class _Output:
    """Where a connection's frames go, chosen once per connection (by :class:`_ServerSupport`): here, the
    WebSocket's ASGI ``send``.  ws_micro_servers.py's outputs write past ASGI where their server allows."""

    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        self._send = send

    def write_now(self, text: str, wire: bytes | None = None) -> Awaitable[None] | None:
        """Write ``text`` (``wire``: as :func:`_websocket_frame` frames it) without waiting: None if it
        went out, else an awaitable of the rest of the write."""
        return _start_now(self._send({"type": "websocket.send", "text": text}))

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except Exception:
            if not 1000 < code < 3000:
                raise
            # Some servers (daphne, through autobahn) take only 1000 and 3000-4999 from an app: the same
            # code in the private range, 4000 + its last three digits (1009: 4009), says what 1011 would not.
            await self._send({"type": "websocket.close", "code": 4000 + code % 1000, "reason": reason})

    def abort(self) -> None:
        """Drop the connection and what it buffers, if the server lets us: ASGI has no way to."""

    def guard(self, connection: _Connection,
              received: Callable[[_Connection, str], Awaitable[None] | None]) -> None:
        """Hold what the server does on the connection's behalf to its limits, and maybe hand it the text frames
        it parses for the connection straight to ``received`` (see _Gateway.received): neither, through ASGI."""

    def release(self) -> None:
        """Let go of the server's objects once the connection has ended."""


async def _send_nothing(message: Message) -> None:
    raise OSError("the connection is gone")


_NO_OUTPUT = _Output(_send_nothing)  # a waiting session's: its socket is gone


class _ServerSupport:
    """What the gateway can do for the server it runs under beyond ASGI.  This module alone: nothing, and
    everything still works under any ASGI server, within what ASGI lets an app bound (docs/configuration.md
    lists what that leaves out).  ``ws_micro_servers.py``, when it sits beside this module, does more."""

    def __init__(self, why: str = "", level: int = logging.INFO) -> None:
        self._why, self._level = why, level  # why ws_micro_servers.py is not in use, said at the first connection

    def output(self, scope: Scope, receive: Receive, send: Send, settings: Settings, metrics: _Metrics) -> _Output:
        """The output of a connection just accepted."""
        if self._why:
            logger.log(self._level, "fast path off: %s; frames go through ASGI", self._why)
            self._why = ""
        return _Output(send)

    def together(self) -> contextlib.AbstractContextManager[None]:
        """Frames written inside, from outside a read (what a pub/sub message of cluster mode brings), go out
        together when it exits: one write per connection, where the server's support can hold them back."""
        return contextlib.nullcontext()

    def harden(self) -> None:
        """At startup: keep the lines the server logs for whatever a client does to a few."""

    def http_protocol(self, gateway: _Gateway, head_timeout: float, max_open: int,
                      max_head: int) -> type[asyncio.Protocol] | None:
        """For :func:`serve`: uvicorn's HTTP protocol with a deadline on each request head and a bound on its size,
        counting the sockets waiting for one in ``gateway.waiting``; None: uvicorn's own."""
        return None


# --------------------------------------------------------------------------
# Connection
# --------------------------------------------------------------------------

def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


class _State(enum.Enum):
    """Where a connection is in its life; each value says how :meth:`_Connection.send` treats a frame.
    The one record of it: with recovery on, whether a session waits for its client is its state too."""

    OPEN = "open"  # written at once
    BACKLOGGED = "backlogged"  # queued: a writer task waits for the socket, then drains the queue in order
    CLOSING = "closing"  # refused: the writer sends what is owed (the queue, if flushed), then the close frame
    CLOSED = "closed"  # refused: the close frame went out, or the peer closed or was cut off; its session ends
    # With recovery on (see _Session), a session can outlive its connection:
    DROPPED = "dropped"  # refused: the peer vanished without a close frame (or left with 1001): its session waits
    AWAY = "away"  # kept in its session, which waits for its client to come back within the window
    RESUMING = "resuming"  # kept in its session, which is being handed to it from elsewhere (cluster mode)
    ENDED = "ended"  # refused: its session ended while it was away (expired, overflowed, kicked, evicted, or
    # not_recovered: its client came back further behind than the frames kept)
    MOVED = "moved"  # refused: its session went on in a newer connection

    # Enum's own hash is a Python call (hash of the name): every lookup in the sets below paid for it.  Members
    # are compared by identity, so identity's hash is as good.
    __hash__ = object.__hash__


# The states every frame checks, as plain names: ``_State.OPEN`` is a lookup on the enum's class, 90 ns measured
# (Python 3.11) against 20 for a module name, and a frame read and echoed made five of them.
_OPEN, _BACKLOGGED = _State.OPEN, _State.BACKLOGGED
_WRITING = frozenset({_State.OPEN, _State.BACKLOGGED, _State.CLOSING})  # the writer has something to do
_KEEPING = frozenset({_State.AWAY, _State.RESUMING})  # frames go into the session, not out
_SESSION_GOES_ON = frozenset({_State.AWAY, _State.MOVED, _State.ENDED})  # its end is not its connection's


# The rooms of a connection in none: most never join one, and an empty set of their own costs 216 bytes each.
_NO_ROOMS: frozenset[str] = frozenset()


class _Connection:
    """One accepted WebSocket: its id, its rooms and its bounded outgoing queue.

    :meth:`send` never waits.  A frame the socket cannot take at once starts a writer
    task that finishes it, drains the frames queued behind it, and ends: an idle
    connection holds no task.  A peer that stops reading fills only its own queue,
    and is closed with 1008 past ``max_queue_messages``, ``max_queue_bytes`` or
    ``send_timeout``.  It leaves the registry (``on_close``) as soon as it starts closing.
    With recovery on, ``session`` keeps what it is sent (see :class:`_Session`).
    """

    __slots__ = ("_close_frame", "_flush_scope", "_in_flight", "_metrics", "_on_close", "_output", "_queue",
                 "_queued_bytes", "_refilled_at", "_settings", "_tokens", "_writer", "away_since", "close_reason",
                 "connected_at", "id", "identity", "remote", "rooms", "session", "state")

    def __init__(self, output: _Output, *, remote: str | None, settings: Settings, metrics: _Metrics,
                 on_close: Callable[[_Connection], None], client_id: str | None = None,
                 identity: _Identity = ANONYMOUS, session: _Session | None = None) -> None:
        self.id = client_id or str(uuid.uuid4())
        self.identity = identity
        self.remote = remote  # "host:port" of the peer, when the server knows it
        self.connected_at = time.time()
        self.rooms: set[str] | frozenset[str] = _NO_ROOMS  # a set of its own from its first join
        self.state = _State.OPEN
        self.close_reason = ""  # the disconnects_total label, once known
        self.session = session
        self.away_since = 0.0
        self._output = output
        self._settings = settings
        self._metrics = metrics
        self._on_close = on_close
        # While BACKLOGGED or CLOSING only; None otherwise, so that an idle connection stays small.
        self._writer: asyncio.Task[None] | None = None
        self._in_flight: Awaitable[None] | None = None  # the write that could not finish at once
        self._queue: collections.deque[str] | None = None
        self._queued_bytes = 0
        self._flush_scope: anyio.CancelScope | None = None
        self._close_frame = (CLOSE_NORMAL, "")
        # Token bucket: refills at rate_limit, holds rate_burst; may go rate_burst into debt.
        self._tokens = float(settings.rate_burst)
        self._refilled_at = time.monotonic()

    @property
    def open(self) -> bool:
        state = self.state
        return state is _OPEN or state is _BACKLOGGED

    @property
    def away(self) -> bool:
        """Whether its peer is gone and its session waits for it (recovery)."""
        return self.state is _State.AWAY

    def send(self, text: str, wire: bytes | None = None, shared: _Frame | None = None, *, keep: bool = True) -> bool:
        """Send or queue a text frame; False when the connection is closing or was just cut off.

        With recovery on, the frame is also kept in the session (only kept, while the peer is away),
        unless ``keep`` is False: the connect frame, and frames replayed from the session.  A fan-out's
        frame is ``shared.to(self.id)``: the session keeps ``shared``, whose body every receiver's shares.
        """
        session = self.session
        if session is not None and keep:
            state, kept = self.state, text if shared is None else shared
            if state is _OPEN or state is _BACKLOGGED:  # connected: kept, the oldest making room
                if session.long or len(text) > session.share:  # its characters are counted (_Session.keep)
                    session.keep(kept, len(text))
                else:  # _Session.keep's common case, inline: it runs for every receiver of every frame
                    session.frames.append(kept)  # the oldest makes room (maxlen)
                    session.sent += 1
            elif state in _KEEPING:
                if not session.keep(kept, len(text)):
                    self.end("overflowed")
                    return False
                return True
            else:
                return False
        if self.state is _OPEN:
            try:
                rest = self._output.write_now(text, wire)
            except (OSError, RuntimeError):  # the peer is gone; the read loop hears it too
                self.gone("abnormal")
                return self.away  # kept, for when it comes back
            if rest is None:
                self._metrics.messages_sent += 1
            else:
                self._in_flight = rest
                self._start_writer(_BACKLOGGED)
            return True
        if self.state is not _BACKLOGGED:
            return False
        assert self._queue is not None
        self._queue.append(text)
        self._queued_bytes += len(text)
        if (len(self._queue) > self._settings.max_queue_messages
                or self._queued_bytes > self._settings.max_queue_bytes):
            self.close(CLOSE_POLICY_VIOLATION, "slow consumer", label="slow_consumer", flush=False)
            return False
        return True

    def close(self, code: int, reason: str, *, label: str, flush: bool = True) -> None:
        """Close with ``code`` after the queued frames (``flush``) or at once, dropping them; with recovery on,
        its session ends too.  Flushing and the close frame each get ``close_timeout`` seconds."""
        if not self.open:
            self.end(label)  # away: its session ends
            return
        backlogged = self.state is _State.BACKLOGGED
        self.close_reason = label
        self._close_frame = (code, reason)
        if not backlogged:
            self._start_writer(_State.CLOSING)
        else:
            self.state = _State.CLOSING
            assert self._flush_scope is not None and self._queue is not None
            if flush:
                self._flush_scope.deadline = anyio.current_time() + self._settings.close_timeout
            else:
                self._queue.clear()
                self._flush_scope.cancel()  # stop waiting on a socket that does not drain
        self._on_close(self)

    def gone(self, reason: str, *, final: bool = False) -> None:
        """The peer is gone (it closed, or the server failed to write to it): nothing more goes out.  Its
        session, with recovery on, waits for it (DROPPED, see Registry._remove) unless ``final``, or unless the
        server was closing it."""
        if self.state in _WRITING:
            self.state = _State.CLOSED if final or self.state is _State.CLOSING else _State.DROPPED
            self.close_reason = self.close_reason or reason
            self._on_close(self)

    def hold(self) -> None:
        """Keep the frames sent to it, and write none, while its session is handed to it (RESUMING)."""
        self._keep_instead(_State.RESUMING)

    def go_on(self, session: _Session) -> None:
        """Its session, handed to it: write frames again."""
        self.session, self.state = session, _State.OPEN

    def wait_away(self) -> None:
        """Keep the session of a connection whose peer vanished, for it to come back; let go of the
        server's objects for the socket (most of what a connection costs) at once."""
        assert self.session is not None
        self._keep_instead(_State.AWAY)
        self.session.away_at = self.session.sent
        self.away_since = time.time()
        self._output.release()
        self._output = _NO_OUTPUT

    def end(self, reason: str) -> None:
        """End the session of a connection whose peer is away (AWAY becomes ENDED), or that is being handed
        its session (RESUMING becomes CLOSED: it never waited here)."""
        if self.state in _KEEPING:
            self.state = _State.ENDED if self.state is _State.AWAY else _State.CLOSED
            self.close_reason = reason
            self._on_close(self)

    def renew(self, session: _Session | None) -> None:
        """Start afresh: a new client id, and a new session, for a connection that could not resume one."""
        self.id = str(uuid.uuid4())
        self.rooms, self.close_reason = _NO_ROOMS, ""
        self.session, self.state = session, _State.OPEN

    def drop(self, *, final: bool = False) -> None:
        """Cut the connection off, without a close frame (its peer is thought gone)."""
        self._output.abort()
        self.gone("abnormal", final=final)

    def supersede(self) -> None:
        """Its session goes on in a newer connection: drop this one, and send it nothing more."""
        self.state = _State.MOVED
        self.session = None
        if self._writer is not None:
            self._writer.cancel()
        self._output.abort()

    async def closed(self) -> None:
        """Wait for the writer, if one runs, to write what it owes: the queued frames, then the close frame."""
        if self._writer is not None and self.state in _WRITING:
            await self._writer

    def abandon(self) -> None:
        """Stop the writer, if one runs, and let go of the socket: the connection's end, however it came."""
        if self._writer is not None:
            self._writer.cancel()
        self._output.release()

    def take_token(self) -> float:
        """Spend one token for a received frame; the balance left (negative: over the limit)."""
        rate = self._settings.rate_limit
        if not rate:
            return 1.0
        now = time.monotonic()
        tokens = self._tokens + (now - self._refilled_at) * rate
        burst = self._settings.rate_burst
        self._tokens = tokens = (burst if tokens > burst else tokens) - 1  # min() would cost a call, every frame
        self._refilled_at = now
        return tokens

    def describe(self) -> dict[str, Any]:
        return {
            "client_id": self.id,
            "connected_at": _iso(self.connected_at),
            "rooms": sorted(self.rooms),
            "remote": self.remote,
            "user": self.identity.user,
            **({"meta": self.identity.meta} if self.identity.meta is not None else {}),
            **({"away_since": _iso(self.away_since)} if self.state is _State.AWAY else {}),
        }

    def _keep_instead(self, state: _State) -> None:
        """From now on keep the frames sent to it (AWAY, RESUMING) instead of writing them."""
        self.state = state
        if self._writer is not None:  # what it queued is kept in the session
            self._writer.cancel()

    def _start_writer(self, state: _State) -> None:
        self.state = state
        self._queue = collections.deque()
        self._flush_scope = anyio.CancelScope()
        # A plain task, not a task group's: an idle connection (most of them) then holds no task group.
        self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        """Finish the write in flight, drain the queue, then send the close frame if one is due."""
        assert self._flush_scope is not None and self._queue is not None
        try:
            with self._flush_scope:
                if self._in_flight is not None:
                    in_flight, self._in_flight = self._in_flight, None
                    await self._finish(in_flight)
                while self._queue and self.state in _WRITING:
                    text = self._queue.popleft()
                    self._queued_bytes -= len(text)
                    rest = self._output.write_now(text)
                    if rest is None:
                        self._metrics.messages_sent += 1
                    else:
                        await self._finish(rest)
            self._queue = self._flush_scope = None  # no await since the queue was found empty: nothing is left
            if self.state is not _State.CLOSING:  # BACKLOGGED: drained; else the peer is gone
                if self.state is _State.BACKLOGGED:
                    self.state, self._writer = _State.OPEN, None  # idle again: it holds no task
                return
            with anyio.move_on_after(self._settings.close_timeout) as waited:
                # The server answers with a websocket.disconnect, which ends the read loop.
                await self._output.close(*self._close_frame)
            if waited.cancelled_caught:
                self._output.abort()  # the peer takes nothing: drop the connection and what it buffered
            self.state = _State.CLOSED
        except (OSError, RuntimeError):  # the server raises OSError, or RuntimeError once it saw a close
            self.gone("abnormal")

    async def _finish(self, rest: Awaitable[None]) -> None:
        """Wait for a write the server could not take at once; a client that stalls it is cut off."""
        with anyio.move_on_after(self._settings.send_timeout) as deadline:
            await rest
            self._metrics.messages_sent += 1
        if deadline.cancelled_caught:
            self.close(CLOSE_POLICY_VIOLATION, "slow consumer", label="slow_consumer", flush=False)


def _connection_key(connection: _Connection) -> str | None:
    """The :func:`_share_key` of a connection's requests."""
    return _share_key(connection.identity.user, connection.remote and connection.remote.rpartition(":")[0])


# --------------------------------------------------------------------------
# Connection recovery: sessions that outlive their connection
# --------------------------------------------------------------------------

# A session is what a client keeps across connections with recovery on: its id, its rooms, and the
# frames sent to it.  When its connection drops, its session waits for the client to come back with
# its resume token (docs/recovery.md): in this process, in the registry's store below; in cluster mode,
# in Redis, where any instance can resume it (the backend parks it there).

# What became of sessions (the sessions_total labels): resumed by their client; ended while it was
# away: the window passed, the frames kept for it passed the bounds, kicked, or pushed out by newer ones
# past recovery_max_sessions; or a resume that got a new session instead (its token unknown or not the
# session's, its frames no longer kept, or another user), or was refused (its token already used); or
# the server stopped while it waited here (its client cannot come back to a process that is gone); or, in
# cluster mode, its instance had been taken for dead (see DISCONNECT_REASONS), and the frames it kept may lack some.
SESSION_OUTCOMES = ("resumed", "expired", "overflowed", "kicked", "evicted", "not_recovered", "token_reused",
                    "shutdown", "taken_for_dead")

MAX_RESUME_TOKEN_LENGTH = 128
RESUME_TOKEN_HEADER = "X-WS-Micro-Resume-Token"
RESUME_OFFSET_HEADER = "X-WS-Micro-Resume-Offset"


def _resume_request(request: HTTPConnection) -> tuple[str, int | None] | None:
    """The resume token and offset a handshake brings (query parameters, or headers for programs), if any;
    raises :class:`_Refused` (400) for an offset that is not a count."""
    token = request.query_params.get("resume_token") or request.headers.get(RESUME_TOKEN_HEADER)
    if not token:
        return None
    text = request.query_params.get("resume_offset") or request.headers.get(RESUME_OFFSET_HEADER)
    if text is None:
        offset = None
    elif text.isascii() and text.isdigit() and len(text) < 16:
        offset = int(text)
    else:
        raise _Refused(400, "invalid_resume", f"resume_offset must be a count of frames, but got {text[:40]!r}")
    return token[:MAX_RESUME_TOKEN_LENGTH + 1], offset


def _token_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


# A client id's length: every one is a str(uuid.uuid4()), and a resumed session keeps its first.
_CLIENT_ID_LENGTH = 36
# Bytes of memory a kept frame costs its session beside the frame itself: its slot in the session's deque (a
# pointer).  For a frame the session shares with other receivers' (a fan-out), that is all it adds.
_SLOT = 8


def _memory(frame: str | _Frame) -> int:
    """The bytes of memory a kept frame takes, as sys.getsizeof counts its objects."""
    if isinstance(frame, str):
        return sys.getsizeof(frame)
    return sys.getsizeof(frame) + sys.getsizeof(frame.head) + sys.getsizeof(frame.tail)


def _length(frame: str | _Frame) -> int:
    """The characters of a kept frame as it is replayed (a shared frame's with a client id spliced in)."""
    return len(frame) if isinstance(frame, str) else frame.length


def _texts(frames: Iterable[str | _Frame], client_id: str) -> list[str]:
    """Kept frames as they were sent to ``client_id``: a shared frame with the id spliced in again."""
    return [frame if isinstance(frame, str) else frame.to(client_id) for frame in frames]


class _Session:
    """What connection recovery keeps of a connection's session: the last frames sent to it,
    numbered, and the hash of its one valid resume token.

    A frame's offset is how many frames the session was sent before it, after the connect frames;
    the client counts the same, and comes back with the count it got to.  Frames are kept while
    connected too, since those the dead socket had buffered were never read.  Connected, the
    oldest make room for new ones; away, only those the client had before it left do, and a
    session that would pass the bounds otherwise is lost.

    A frame the server made for many receivers (a fan-out: ``_Frame.to`` each receiver's id) is kept
    as its :class:`_Frame`, whose body every receiver's session shares; the session's client id is
    spliced in again when it is replayed (:meth:`back`, :meth:`texts`), giving the same text.
    """

    __slots__ = ("away_at", "frames", "long", "max_bytes", "max_frames", "sent", "share", "size", "store",
                 "token_hash", "used_hash")

    def __init__(self, settings: Settings) -> None:
        self.max_frames, self.max_bytes = settings.recovery_max_frames, settings.recovery_max_bytes
        # Its bound by count is the deque's own: the oldest frame makes room for a new one in C.  Its bound in
        # characters needs counting only while it keeps a frame longer than a ``share`` of it: max_frames
        # frames no longer than that cannot pass max_bytes.  So, most of the time, keeping a frame is an append.
        self.frames: collections.deque[str | _Frame] = collections.deque(maxlen=self.max_frames)
        self.share = self.max_bytes // self.max_frames
        self.long = 0  # frames kept longer than a share
        self.size = 0  # characters in frames (see characters()), counted while it keeps a long one
        self.sent = 0  # the offset after the last frame
        self.away_at = -1  # the offset when its connection dropped; -1 while connected
        self.token_hash = b""  # of the token the last connect frame gave; b"" once it was presented
        self.used_hash = b""  # of the one before it: presented again, refused unless the session waits (claim)
        self.store: _Sessions | None = None  # while it waits in the registry's store, which counts its frames

    @classmethod
    def restored(cls, settings: Settings, base: int, away_at: int, frames: list[str],
                 used_hash: bytes) -> _Session:
        """A session kept elsewhere (cluster mode): its frames, the first at offset ``base``.  It may hold
        more than its bounds (those kept while it was handed over), until :meth:`back`."""
        session = cls(settings)
        session.frames = collections.deque(frames, maxlen=max(session.max_frames, len(frames)))
        session.sent = base + len(frames)
        session._count()
        session.away_at, session.used_hash = away_at, used_hash
        return session

    def characters(self) -> int:
        """The characters of its frames, as replayed (a shared frame with a client id spliced in)."""
        if self.long:
            return self.size
        return sum(map(_length, self.frames))

    def keep(self, frame: str | _Frame, length: int) -> bool:
        """Keep a frame of ``length`` characters (as replayed); False if the session is away and the frame
        would pass its bounds.  (_Connection.send keeps a connected session's short frames itself.)"""
        frames, store, share = self.frames, self.store, self.share
        long = self.long  # the counts in locals: this runs for every receiver of every long frame
        if length > share:
            if not long:
                self.size = self.characters()  # counted from now on
            long += 1
        size = self.size + length if long else 0
        self.sent = sent = self.sent + 1
        # The oldest make room, before the append (the deque's maxlen would drop one unseen), for the count
        # and, the new frame counted already, for the characters.
        while frames and (len(frames) >= self.max_frames or (long and size > self.max_bytes)):
            if 0 <= self.away_at <= sent - 1 - len(frames):  # the oldest was sent while away
                self.long, self.size = long, size
                return False  # the session ends, and leaves the store with what it holds
            oldest = frames.popleft()
            if long:
                dropped = _length(oldest)
                size -= dropped
                if dropped > share:
                    long -= 1
            if store is not None:
                store.release(oldest)
        if long and size > self.max_bytes:  # the frame alone passes the bound
            self.long, self.size = long - 1, size - length  # connected: it is not kept
            return self.away_at < 0
        self.long, self.size = long, size
        frames.append(frame)
        if store is not None:  # waiting in the store: its frames count against every waiting session's memory
            store.hold(frame)
            store.fit()
        return True

    def _drop_oldest(self) -> bool:
        """Let the oldest frame make room; False, keeping it, if the client had not had it (sent while away)."""
        frames = self.frames
        if 0 <= self.away_at <= self.sent - len(frames):
            return False
        oldest = frames.popleft()
        if self.long:
            length = _length(oldest)
            self.size -= length
            if length > self.share:
                self.long -= 1
        if self.store is not None:
            self.store.release(oldest)
        return True

    def _count(self) -> None:
        """Count its long frames, and its characters if it has any."""
        share = self.share
        lengths = [_length(frame) for frame in self.frames]
        self.long = sum(length > share for length in lengths)
        self.size = sum(lengths) if self.long else 0

    def back(self, offset: int | None, client_id: str) -> list[str] | None:
        """Its client is back: the frames after ``offset`` (None: after the connection dropped), or None if
        some are no longer kept, or the offset is past the last frame.  Connected again from now on."""
        start = self.away_at if offset is None else offset
        self.away_at = -1
        first = self.sent - len(self.frames)  # the offset of the oldest kept frame
        if not first <= start <= self.sent:
            return None
        missed = _texts(itertools.islice(self.frames, start - first, None), client_id)
        if self.frames.maxlen != self.max_frames:  # restored past its bounds: within them again
            self.frames = collections.deque(self.frames, maxlen=self.max_frames)
            self._count()
            while self.long and self.size > self.max_bytes:
                self._drop_oldest()
        return missed

    def texts(self, client_id: str) -> list[str]:
        """Its frames as they were sent (to the client ``client_id``)."""
        return _texts(self.frames, client_id)

    def issue_token(self, client_id: str) -> str:
        """A new resume token, the only one valid from now on: ``<client id>.<secret>``."""
        secret = secrets.token_urlsafe(32)
        self.token_hash = _token_hash(secret)
        return f"{client_id}.{secret}"

    def claim(self, secret: str, *, spend: bool = True, waiting: bool = False) -> bool | None:
        """Take the session with a presented token's secret: True, and the token is spent (if ``spend``);
        False if it is not the session's; None if it is the token spent last, unless the session is
        ``waiting`` for its client after a resume: its client may never have had the next one, then, and
        the one it has is as good (not while a resume with it is under way: token_hash is b"" then)."""
        presented = _token_hash(secret)
        if self.token_hash and hmac.compare_digest(presented, self.token_hash):
            if spend:
                self.used_hash, self.token_hash = self.token_hash, b""
            return True
        if self.used_hash and hmac.compare_digest(presented, self.used_hash):
            if not (waiting and self.token_hash):
                return None
            if spend:
                self.token_hash = b""
            return True
        return False

    def holds(self, token_hash: str) -> bool:
        """Whether ``token_hash`` (hex) is its token's."""
        return hmac.compare_digest(self.token_hash.hex(), token_hash)

    def unclaim(self) -> None:
        """The connection that spent the token never opened: the token is good again."""
        if not self.token_hash:
            self.token_hash = self.used_hash


@dataclasses.dataclass(frozen=True)
class _Parked:
    """A session the backend keeps for a client that is away, as a resume token found it."""

    client_id: str
    token_hash: str  # hex
    rooms: tuple[str, ...]


class _Kept(typing.NamedTuple):
    """The frames the backend kept for a session it handed back (see _Session.restored)."""

    base: int  # the offset of the first
    away_at: int  # the offset when its connection dropped
    frames: list[str]


class _Sessions:
    """The registry's store of the sessions waiting here for their client, oldest first, and the count of
    what became of sessions.  Each waits ``recovery_window`` seconds; past ``recovery_max_sessions`` (or
    ``recovery_max_memory``), the one waiting longest ends ("evicted"); past one user's (or address's)
    share, that user's."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.outcomes = collections.Counter(dict.fromkeys(SESSION_OUTCOMES, 0))
        self._waiting: dict[str, tuple[_Connection, asyncio.TimerHandle]] = {}  # client id -> it, its expiry
        self._shares: dict[str, dict[str, None]] = {}  # _share_key -> its waiting client ids, oldest first
        # Bytes of memory the frames of the waiting sessions take (as sys.getsizeof counts their objects, and
        # a _SLOT for each kept frame): a frame many of them share (a fan-out's _Frame, a room relay's string)
        # counts once, however many keep it; ``_kept`` counts how many keep each, by the object's id.
        self.memory = 0
        self._kept: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def new(self) -> _Session | None:
        """A new connection's session; None with recovery off."""
        return _Session(self.settings) if self.settings.recovery_window else None

    def wait(self, connection: _Connection) -> None:
        """Keep the session of an away connection here, for ``recovery_window`` seconds."""
        session = connection.session
        assert session is not None
        expiry = asyncio.get_running_loop().call_later(self.settings.recovery_window, connection.end, "expired")
        self._waiting[connection.id] = (connection, expiry)
        session.store = self
        for frame in session.frames:
            self.hold(frame)
        key, share = _connection_key(connection), self.settings.recovery_max_sessions_per_user
        if key is not None and share:
            waiting = self._shares.setdefault(key, {})
            waiting[connection.id] = None
            if len(waiting) > share:  # one user's drops push out its own sessions, not everyone's
                self._evict(self._waiting[next(iter(waiting))][0])
        if len(self._waiting) > self.settings.recovery_max_sessions:
            self._evict_oldest()
        self.fit()

    def end_all(self, reason: str) -> None:
        """End every session waiting here: the server stops, and their clients cannot come back to it."""
        for connection, _ in list(self._waiting.values()):
            self.stop_waiting(connection)
            connection.end(reason)

    def hold(self, frame: str | _Frame) -> None:
        """A waiting session keeps ``frame``: count the memory it adds, the frame's own only if no other
        waiting session keeps it (see :meth:`fit`)."""
        key = id(frame)  # the object's: it lives while a session keeps it
        keeping = self._kept.get(key, 0)
        self._kept[key] = keeping + 1
        self.memory += _SLOT if keeping else _SLOT + _memory(frame)

    def release(self, frame: str | _Frame) -> None:
        """A waiting session lets go of ``frame`` (the opposite of :meth:`hold`)."""
        key = id(frame)
        keeping = self._kept.pop(key) - 1
        if keeping:
            self._kept[key] = keeping
            self.memory -= _SLOT
        else:
            self.memory -= _SLOT + _memory(frame)

    def fit(self) -> None:
        """Past recovery_max_memory, end the sessions waiting longest until the rest fit."""
        while self.memory > self.settings.recovery_max_memory and self._waiting:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        self._evict(next(iter(self._waiting.values()))[0])

    def _evict(self, connection: _Connection) -> None:
        self.stop_waiting(connection)  # first: whatever its end does, it leaves the store
        connection.end("evicted")

    def stop_waiting(self, connection: _Connection) -> None:
        entry = self._waiting.pop(connection.id, None)
        if entry is not None:
            entry[1].cancel()
            key = _connection_key(connection)
            if key is not None and (waiting := self._shares.get(key)) is not None:
                waiting.pop(connection.id, None)
                if not waiting:
                    del self._shares[key]
            session = connection.session
            if session is not None and session.store is self:
                for frame in session.frames:
                    self.release(frame)
                session.store = None

    def claim(self, previous: _Connection, secret: str, user: str | None, *, spend: bool) -> bool | None:
        """Whether a resume token's ``secret`` is that of the session ``previous`` holds, for ``user`` (its
        token now spent, if ``spend``); None if it is the token spent last (see :meth:`_Session.claim`)."""
        session = previous.session
        if session is None or not (previous.open or previous.away) or previous.identity.user != user:
            return False
        return session.claim(secret, spend=spend, waiting=previous.away)

    def take(self, connection: _Connection, previous: _Connection, offset: int | None) -> list[str] | None:
        """Move the session ``previous`` holds (waiting, or still open: a client often notices a dead
        connection before the server does) to ``connection``; the frames after ``offset``, or None if they
        are not all kept any more (the session ends) or it is closing."""
        session = previous.session
        if session is None or not (previous.open or previous.away):
            return None
        if previous.open:
            session.away_at = session.sent
        missed = session.back(offset, previous.id)
        if missed is None:
            if previous.open:
                previous.drop(final=True)  # it never waited: its connection's end is its session's
            else:
                previous.end("not_recovered")
            return None
        self.stop_waiting(previous)
        connection.session, connection.rooms = session, previous.rooms
        previous.supersede()
        return missed

    def metrics(self) -> list[_MetricFamily]:
        return [("sessions_away", "gauge", "Sessions waiting here for their client to come back.",
                 {"": len(self._waiting)}, ""),
                ("sessions_kept_bytes", "gauge", "Bytes of memory the frames kept for the sessions waiting here take.",
                 {"": self.memory}, ""),
                ("sessions_total", "counter", "What became of sessions (connection recovery), by outcome.",
                 self.outcomes, "outcome")]


# --------------------------------------------------------------------------
# The backend seam: clients on other instances
# --------------------------------------------------------------------------

# What the registry hands its backend for clients it does not hold, tagged (one msgpack array each
# between instances): a frame for one client, a room's members, a user's connections or everyone
# (``text`` alone: a relayed frame, unchanged; with a ``tail``: a server frame, ``text + client id +
# tail``), or a kick of one client or of a user's every connection.


class _ToClient(msgspec.Struct, tag="client", array_like=True):
    client_id: str
    text: str


class _ToRoom(msgspec.Struct, tag="room", array_like=True):
    room: str
    text: str
    tail: str | None = None


class _ToUser(msgspec.Struct, tag="user", array_like=True):
    user: str
    text: str
    tail: str


class _ToEveryone(msgspec.Struct, tag="all", array_like=True):
    text: str
    tail: str | None = None


class _Kick(msgspec.Struct, tag="kick", array_like=True):
    client_id: str
    code: int
    reason: str


class _KickUser(msgspec.Struct, tag="kick_user", array_like=True):
    user: str
    code: int
    reason: str


_Delivery = _ToClient | _ToRoom | _ToUser | _ToEveryone | _Kick | _KickUser
_ToGroup = _ToRoom | _ToUser | _KickUser  # what goes to the instances holding a room's or a user's connections


def _addressed(delivery: _Delivery, connection: _Connection) -> bool:
    """Whether ``delivery`` is for ``connection``, by its id, its rooms or its user: what the registry finds
    through its indexes (Registry._deliver_here), asked of a connection it no longer indexes (cluster mode:
    a session on its way to Redis)."""
    match delivery:
        case _ToClient(client_id) | _Kick(client_id):
            return client_id == connection.id
        case _ToRoom(room):
            return room in connection.rooms
        case _ToUser(user) | _KickUser(user):
            return user == connection.identity.user
        case _ToEveryone():
            return True


@dataclasses.dataclass(frozen=True, slots=True)
class _Paging:
    """Which page of a listing the sidecar API asks for: the entries whose keys (client ids, room names) sort
    after ``after`` ("": from the first), at most ``limit`` of them, ending early past ``max_bytes`` of JSON."""

    after: str
    limit: int
    max_bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Page:
    """A page of a listing: ``count``, how many entries the whole listing has now; the page's entries,
    each its JSON; and the key of the last one looked at, for the next page to go on after (None: the
    listing ends here)."""

    count: int
    entries: list[msgspec.Raw]
    last: str | None


# Entries of a page built and encoded between two yields to the event loop: about 0.3 ms of work for
# clients in 20 rooms (measured), so that a listing, however large, delays other clients' frames little.
_PAGE_STEP = 25
# Keys compared between two yields while picking a page's keys from a room's or a user's unordered
# members (about a millisecond's work).
_PICK_STEP = 10_000


async def _page_of(keys: Sequence[str], more: bool, entry: Callable[[str], Any], paging: _Paging,
                   count: int) -> _Page:
    """The page of ``keys`` (those after ``paging.after``, in order, at most ``paging.limit``; ``more``: others
    follow them): ``entry(key)`` for each, but those that are None (gone meanwhile), until they pass
    ``paging.max_bytes`` (at least one is taken, for the next page to move on)."""
    entries: list[msgspec.Raw] = []
    size = 0
    for position, key in enumerate(keys):
        if entries and size >= paging.max_bytes:
            return _Page(count, entries, keys[position - 1])
        if position and position % _PAGE_STEP == 0:
            await anyio.lowlevel.checkpoint()  # let other tasks run
        value = entry(key)
        if value is not None:
            encoded = _encode(value)
            size += len(encoded)
            entries.append(msgspec.Raw(encoded))
    return _Page(count, entries, keys[-1] if more and keys else None)


async def _first_after(keys: Collection[str], after: str, count: int) -> list[str]:
    """The first ``count`` of ``keys`` (unordered) that sort after ``after``, in order.  A large collection
    is copied, then taken a step at a time, yielding to the event loop between steps."""
    if len(keys) <= _PICK_STEP:
        return heapq.nsmallest(count, [key for key in keys if key > after])
    snapshot = list(keys)
    found: list[str] = []
    for start in range(0, len(snapshot), _PICK_STEP):
        await anyio.lowlevel.checkpoint()
        step = [key for key in snapshot[start:start + _PICK_STEP] if key > after]
        found = heapq.nsmallest(count, [*found, *step])
    return found


class BackendUnavailable(Exception):
    """Other instances cannot be reached: cross-instance sends fail, local ones go on.
    ``reason`` is its label in ``ws_micro_cluster_dropped_total``."""

    def __init__(self, message: str, reason: str = "backend_unavailable") -> None:
        super().__init__(message)
        self.reason = reason


class _Backend:
    """What the registry asks about clients it does not hold.  Alone, there are none; in cluster mode,
    ws_micro_redis.py's backend reaches them over Redis, or raises :class:`BackendUnavailable`.

    A backend reads the registry, but changes a connection, a session or the registry only through the
    registry's methods meant for it (those that name the backend in their docstring)."""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        yield

    # Membership: told of each change, so that other instances can find this one's clients.

    async def register(self, connection: _Connection) -> None:
        pass

    def unregister(self, connection: _Connection, rooms_left: Mapping[str, int], user_left: int) -> None:
        """``connection`` is gone; it leaves rooms with these members here, and its user with ``user_left``."""

    async def room_changed(self, connection: _Connection, room: str, members_here: int) -> int:
        """The members of ``room`` everywhere, now that this instance has ``members_here``."""
        return members_here

    # Sending: how many were reached elsewhere.  The forward methods do not wait for the answer:
    # they return None once the frame is on its way (else an awaitable of the wait for room to queue
    # it), and ``failed(*about, code, message)`` is called if it may not have arrived.  A client's
    # frame is then handled without a suspension, in the same call as its read (the read fast path);
    # ``about`` (its sender and event) rather than a partial: making one cost a relayed frame 12%.

    async def send(self, delivery: _ToClient | _Kick) -> bool:
        return False

    def forward(self, delivery: _ToClient, failed: Callable[..., None], *about: Any) -> Awaitable[None] | None:
        failed(*about, UNKNOWN_CLIENT, f"no client with id {delivery.client_id!r}")
        return None

    async def publish(self, delivery: _ToGroup, here: Callable[[], int] = lambda: 0) -> int:
        """Deliver to the other instances, and ``here()`` (the fan-out on this one) as the delivery is
        queued for them: a client moving between this instance and the cluster (recovery) then gets
        it once.  The members reached in all."""
        return here()

    def publish_soon(self, delivery: _ToRoom) -> None:
        """``publish``, without waiting or telling anyone whether it arrived (presence events)."""

    def forward_to_room(self, delivery: _ToRoom, failed: Callable[..., None], *about: Any) -> Awaitable[None] | None:
        return None

    async def broadcast(self, delivery: _ToEveryone, here: Callable[[], int] = lambda: 0) -> int:
        """Like :meth:`publish`, to every client."""
        return here()

    async def revoke(self, user: str, before: float, until: float) -> None:
        """Tell the other instances, now and as they join, of a revocation (see Registry.revoke_user)."""

    async def membership(self, client_id: str, room: str, *, join: bool) -> bool:
        """Registry.join (or leave) of a client this instance does not hold, made by the instance that holds
        it before this returns, so that what is sent to the room next reaches it: whether it was found there
        (connected: not away); ValueError past max_rooms_per_connection."""
        return False

    # Reading, for the sidecar API, /healthz and /metrics.

    def entry(self, connection: _Connection) -> dict[str, Any]:
        """A client of this instance, as ``GET /api/clients`` lists it."""
        return connection.describe()

    # A listing is read a page at a time, in the order of its keys (client ids, room names): ``paging``
    # says which page, and the page's ``count`` is the whole listing's.

    async def clients(self, here: _Index[_Connection], paging: _Paging) -> _Page:
        """Every client (each as ``entry`` describes it), here and on other instances, by id."""
        keys = here.keys_in_order.after(paging.after, paging.limit + 1)

        def entry(client_id: str) -> dict[str, Any] | None:
            connection = here.get(client_id)
            return None if connection is None else self.entry(connection)

        return await _page_of(keys[:paging.limit], len(keys) > paging.limit, entry, paging, len(here))

    async def client(self, client_id: str) -> dict[str, Any] | None:
        """A client this instance does not hold."""
        return None

    async def members(self, kind: str, name: str, here: _Index[_Connection], member_ids: Collection[str],
                      paging: _Paging) -> _Page:
        """The clients in room ``name`` (``kind`` "room"; each as ``{"client_id", "user"}``) or of user ``name``
        ("user"; each as ``clients`` lists it), by id: ``member_ids`` of those ``here``, and those on other
        instances."""
        keys = await _first_after(member_ids, paging.after, paging.limit + 1)

        def entry(client_id: str) -> dict[str, Any] | None:
            connection = here.get(client_id)
            if connection is None or client_id not in member_ids:  # gone meanwhile
                return None
            return {"client_id": client_id, "user": connection.identity.user} if kind == "room" else \
                self.entry(connection)

        return await _page_of(keys[:paging.limit], len(keys) > paging.limit, entry, paging, len(member_ids))

    async def rooms(self, here: _Index[set[str]], paging: _Paging) -> _Page:
        """Every room with members (each as ``{"room", "members"}``, how many), here and on other instances,
        by name."""
        keys = here.keys_in_order.after(paging.after, paging.limit + 1)

        def entry(room: str) -> dict[str, Any] | None:
            members = here.get(room)
            return None if members is None else {"room": room, "members": len(members)}

        return await _page_of(keys[:paging.limit], len(keys) > paging.limit, entry, paging, len(here))

    def health(self) -> tuple[str, dict[str, Any]]:
        """``ok`` or ``degraded``, and what /healthz says besides."""
        return "ok", {}

    # Sessions (connection recovery): alone, they wait in the registry's store; in cluster mode, in Redis.

    def park(self, connection: _Connection) -> bool:
        """Keep the session of an away ``connection`` elsewhere; False: it waits here, in the registry's store."""
        return False

    async def claim(self, client_id: str, token_hash: str, user: str | None, *,
                    spend: bool) -> _Parked | Literal[False] | None:
        """A session kept elsewhere that a resume token (its client id and hash) names, if the token is its
        own and it is ``user``'s: False if there is none, None if the token was spent already."""
        return False

    async def take(self, connection: _Connection, parked: _Parked) -> _Kept | None:
        """Take a session kept elsewhere for ``connection``, which holds the frames sent to it meanwhile: what
        was kept of it; None if it is gone (ended, or taken by another connection)."""
        return None

    def metrics(self) -> list[_MetricFamily]:
        return []


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


class _SortedKeys:
    """Strings kept in order, for paging through them (the sidecar API's listings): sorted chunks of at
    most ``2 * CHUNK``, so that adding or removing one moves a chunk's pointers, not all of them."""

    CHUNK = 500  # 4 to 7 microseconds a change (measured), with a million keys as with ten thousand

    __slots__ = ("_chunks", "_firsts")

    def __init__(self) -> None:
        self._chunks: list[list[str]] = []
        self._firsts: list[str] = []  # each chunk's first key, to find a key's chunk by bisection

    def _chunk_of(self, key: str) -> int:
        return max(bisect.bisect_right(self._firsts, key) - 1, 0)

    def add(self, key: str) -> None:
        """Add ``key``, which is not there."""
        if not self._chunks:
            self._chunks, self._firsts = [[key]], [key]
            return
        at = self._chunk_of(key)
        chunk = self._chunks[at]
        bisect.insort(chunk, key)
        self._firsts[at] = chunk[0]
        if len(chunk) > 2 * self.CHUNK:
            self._chunks[at:at + 1] = [chunk[:self.CHUNK], chunk[self.CHUNK:]]
            self._firsts[at:at + 1] = [chunk[0], chunk[self.CHUNK]]

    def remove(self, key: str) -> None:
        """Remove ``key``, which is there."""
        at = self._chunk_of(key)
        chunk = self._chunks[at]
        del chunk[bisect.bisect_left(chunk, key)]
        if chunk:
            self._firsts[at] = chunk[0]
        else:
            del self._chunks[at], self._firsts[at]

    def after(self, key: str, count: int) -> list[str]:
        """The first ``count`` keys that sort after ``key``, in order."""
        found: list[str] = []
        at = self._chunk_of(key)
        while at < len(self._chunks) and len(found) < count:
            chunk = self._chunks[at]
            start = bisect.bisect_right(chunk, key)
            found += chunk[start:start + count - len(found)]
            at += 1
        return found


class _Index(dict[str, _T]):
    """The registry's dict of connections or of rooms, which also keeps its keys in order (``keys_in_order``)
    for the sidecar API's listings.  Changed only by ``[key] = value``, ``del`` and ``setdefault``."""

    __slots__ = ("keys_in_order",)

    def __init__(self) -> None:
        super().__init__()
        self.keys_in_order = _SortedKeys()

    def __setitem__(self, key: str, value: _T) -> None:
        if key not in self:
            self.keys_in_order.add(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.keys_in_order.remove(key)

    def setdefault(self, key: str, default: _T) -> _T:
        if key not in self:
            self[key] = default
        return self[key]


def _discard_member(groups: dict[str, set[str]], name: str, client_id: str) -> int:
    """Take a client out of a room or user in ``groups``; the members left."""
    members = groups.get(name)
    if members is None:
        return 0
    members.discard(client_id)
    if not members:
        del groups[name]
    return len(members)


# Lifecycle hooks: Python code told of each session's beginning and end, as socket.io's connect and
# disconnect handlers are (docs/embedding.md, "Lifecycle hooks").  on_connect runs inside the handshake,
# which waits for it; on_disconnect runs as a task of its own, since a session often ends in code that
# cannot wait (a timer, a kick, a message from another instance).
HOOK_TIMEOUT = 5.0  # seconds each hook may take: on_connect's handshake is then refused (503), on_disconnect
# cancelled.  Longer than a hook that reads a database needs; shorter than clients wait for a handshake
# (Client's open_timeout is 10 s), so that they hear 503 rather than give up.
HOOK_MAX_RUNNING = 10_000  # on_disconnect calls running at once; past this, more are dropped (counted, logged),
# so that a hook that hangs holds at most this many coroutines (a few KB each: tens of MB) for HOOK_TIMEOUT.

# What became of on_connect calls (the on_connect_total labels): it let the client in; it refused it
# (raised Refuse, or returned False: 403); it raised anything else, or returned what is not None, True or
# False; it took longer than HOOK_TIMEOUT (503).  And of on_disconnect calls (on_disconnect_total): it
# returned; it raised; it took longer than HOOK_TIMEOUT; it was never called, HOOK_MAX_RUNNING running.
ON_CONNECT_OUTCOMES = ("accepted", "refused", "failed", "timeout")
ON_DISCONNECT_OUTCOMES = ("done", "failed", "timeout", "dropped")


class Refuse(Exception):
    """Raised by an ``on_connect`` hook to refuse the connection: its handshake is answered with HTTP 403 and
    ``{"error": {"code": "refused", "message": message}}`` (the message cut to 123 bytes)."""

    def __init__(self, message: str = "this connection was refused") -> None:
        super().__init__(message)
        self.message = message


def _failure(exc: BaseException) -> str:
    """An exception in one line, with where it was raised: what a log line says of a hook that raised."""
    where = traceback.extract_tb(exc.__traceback__)[-1:]
    place = f" (at {Path(where[0].filename).name}:{where[0].lineno})" if where else ""
    described = repr(exc).replace("\n", " ")
    return (described if len(described) <= 200 else described[:200] + "...") + place


class _Lifecycle:
    """The registry's on_connect and on_disconnect hooks, each call bounded: by HOOK_TIMEOUT, and for
    on_disconnect, by HOOK_MAX_RUNNING calls at once.  A hook that fails is logged in one WARNING line
    (at most one per 10 s of each kind) and counted; it never breaks the gateway."""

    def __init__(self) -> None:
        self.on_connect: _OnConnect | None = None
        self.on_disconnect: _OnDisconnect | None = None
        self.connects = collections.Counter(dict.fromkeys(ON_CONNECT_OUTCOMES, 0))
        self.disconnects = collections.Counter(dict.fromkeys(ON_DISCONNECT_OUTCOMES, 0))
        self._running: dict[str, asyncio.Task[None]] = {}  # client id -> the on_disconnect call for it
        self._throttle = _Throttle()

    async def connecting(self, client_id: str, identity: _Identity) -> None:
        """Ask on_connect whether ``client_id`` may begin a session; :class:`_Refused` (403 if it refused,
        503 if it failed or took too long) if not."""
        hook = self.on_connect
        if hook is None:
            return
        with anyio.move_on_after(HOOK_TIMEOUT) as waited:
            try:
                answer = await hook(client_id, identity.user, identity.meta)
            except Refuse as refusal:
                self.connects["refused"] += 1
                raise _Refused(403, "refused", _clipped_bytes(str(refusal.message), MAX_CLOSE_REASON)) from None
            except Exception as exc:
                raise self._failed("failed", f"on_connect raised {_failure(exc)}, for client {client_id}") from None
        if waited.cancel_called:  # also when the hook swallowed the cancellation
            raise self._failed("timeout", f"on_connect did not return within {HOOK_TIMEOUT:g} seconds, "
                                          f"for client {client_id}")
        if answer is False:
            self.connects["refused"] += 1
            raise _Refused(403, "refused", "this connection was refused")
        if answer is not None and answer is not True:
            raise self._failed("failed", f"on_connect returned {_clipped(repr(answer), 100)}, for client "
                                         f"{client_id}; return None to let it in, and False (or raise "
                                         "ws_micro.Refuse(message)) to refuse it")
        self.connects["accepted"] += 1

    def _failed(self, outcome: str, message: str) -> _Refused:
        self.connects[outcome] += 1
        self._throttle.warn(f"on_connect {outcome}", f"{message}; its handshake was refused with 503 "
                                                     "(docs/embedding.md#lifecycle-hooks)")
        return _Refused(503, "hook_failed", "the server could not take this connection now; try again later")

    def ended(self, client_id: str, user: str | None, reason: str) -> None:
        """A session on_connect let in ended: call on_disconnect, in a task of its own."""
        hook = self.on_disconnect
        if hook is None:
            return
        if len(self._running) >= HOOK_MAX_RUNNING:
            self.disconnects["dropped"] += 1
            self._throttle.warn("on_disconnect dropped", f"on_disconnect was not called for client {client_id} "
                                                         f"({reason}): {HOOK_MAX_RUNNING} calls are running already")
            return
        task = asyncio.get_running_loop().create_task(self._disconnected(hook, client_id, user, reason))
        self._running[client_id] = task
        task.add_done_callback(functools.partial(self._done, client_id))

    def _done(self, client_id: str, task: asyncio.Task[None]) -> None:
        if self._running.get(client_id) is task:
            del self._running[client_id]

    async def finished(self, client_id: str) -> None:
        """In a connection's task that its server cancelled (daphne, as it stops, cancels them and waits for
        them, and runs no lifespan): wait for the on_disconnect call for ``client_id``, so that it runs before
        the server stops.  Otherwise the task ends at once: a slow hook must not hold the server's objects for
        the connection, which max_connections no longer counts."""
        current, task = asyncio.current_task(), self._running.get(client_id)
        if task is not None and current is not None and current.cancelling():
            await asyncio.wait({task}, timeout=HOOK_TIMEOUT)

    async def _disconnected(self, hook: _OnDisconnect, client_id: str, user: str | None, reason: str) -> None:
        with anyio.move_on_after(HOOK_TIMEOUT) as waited:
            try:
                await hook(client_id, user, reason)
            except Exception as exc:
                self.disconnects["failed"] += 1
                self._throttle.warn("on_disconnect failed", f"on_disconnect raised {_failure(exc)}, for client "
                                                            f"{client_id} ({reason})")
                return
        if waited.cancel_called:
            self.disconnects["timeout"] += 1
            self._throttle.warn("on_disconnect timeout", f"on_disconnect did not return within {HOOK_TIMEOUT:g} "
                                                         f"seconds, for client {client_id} ({reason}); cancelled")
            return
        self.disconnects["done"] += 1

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """At shutdown, let the on_disconnect calls still running (those of the connections the server closed)
        finish, for up to HOOK_TIMEOUT."""
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(HOOK_TIMEOUT):
                while self._running:
                    await asyncio.wait(set(self._running.values()))

    def metrics(self) -> list[_MetricFamily]:
        families: list[_MetricFamily] = []
        if self.on_connect is not None:
            families.append(("on_connect_total", "counter", "Calls of the registry's on_connect hook, by outcome.",
                             self.connects, "outcome"))
        if self.on_disconnect is not None:
            families.append(("on_disconnect_total", "counter", "Calls of the registry's on_disconnect hook, by "
                             "outcome.", self.disconnects, "outcome"))
        return families


_F = TypeVar("_F", bound=Callable[..., Any])


def _coroutine_function(name: str, hook: _F) -> _F:
    """``hook``, if it is an ``async def`` function; TypeError, at registration, if not."""
    if not inspect.iscoroutinefunction(hook) and not inspect.iscoroutinefunction(type(hook).__call__):
        raise TypeError(f"{name} takes an async function (async def ...), but got {hook!r}")
    return hook


def _too_many_rooms(client_id: str, room: str, limit: int) -> str:
    return (f"client {client_id!r} is in {limit} rooms already (max_rooms_per_connection); it cannot join "
            f"room {_clipped(room)}")


class Registry:
    """Who is connected, which rooms they are in, and which handler takes which event.

    The seed's connection manager.  Its sends queue frames and return how many
    recipients took them, never waiting for a socket, so handlers, HTTP routes and
    background tasks in the same event loop may call them.  They raise ValueError for an
    event only the gateway sends (``SERVER_EVENTS``), sending nothing.  In cluster mode they
    also reach other instances, and raise :class:`BackendUnavailable` when they cannot.

    Its public half is :meth:`on`, the lifecycle hooks :meth:`on_connect` and :meth:`on_disconnect`, the send
    methods, :meth:`join` and :meth:`leave`, and ``len()`` (docs/embedding.md).  Its internal half, for the
    endpoint, the sidecar API and the backend, has a leading underscore.
    """

    def __init__(self) -> None:
        self._connections: _Index[_Connection] = _Index()  # client id -> its connection here
        self._rooms: _Index[set[str]] = _Index()  # room name -> ids of its members here
        self._users: dict[str, set[str]] = {}  # user -> ids of their connections here
        self._handlers: dict[str, _Handler] = {}
        self._metrics = _Metrics()
        self._revocations = _Revocations()
        # What create_app(...) sets (see _use): its settings, the backend, the recovery store, and who
        # hears of a session that ended while its client was away.
        self._settings = Settings()
        self._backend = _Backend()
        self._sessions = _Sessions(self._settings)
        self._session_ended: Callable[[_Connection], None] = lambda connection: None
        self._together: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
        self._announcements: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._hooks = _Lifecycle()
        # Client id -> the rooms joined for it (join()) from when its handshake is checked (on_connect) to
        # when it is greeted, in order: joined then, after its connect frame.
        self._connecting: dict[str, dict[str, None]] = {}

    def __len__(self) -> int:
        """The connections open now: sessions waiting for their client are not."""
        return len(self._connections) - len(self._sessions)

    def on(self, event: str) -> Callable[[_Handler], _Handler]:
        """Register ``async def handler(client_id, event)`` for frames named ``event``.  What it returns, if not
        None, is its sender's reply: a mapping (the reply's ``data.data``, under the event's own name), or
        ``(event name, mapping)``."""
        if event in BUILTIN_EVENTS:
            raise ValueError(f"{event!r} is a built-in event and cannot have a handler")
        if event in SERVER_EVENTS:
            hint = "; for a hook run as each client connects, use @registry.on_connect" if event == "connect" else ""
            raise ValueError(f"{event!r} is sent by the server only and cannot have a handler{hint}")
        if event == "disconnect":  # socket.io's name for its handler of ends: a handler would never be called
            raise ValueError("'disconnect' cannot have a handler; for a hook run as each client disconnects, use "
                             "@registry.on_disconnect")

        def register(handler: _Handler) -> _Handler:
            self._handlers[event] = handler
            return handler

        return register

    def on_connect(self, hook: _OnConnect) -> _OnConnect:
        """Register ``async def hook(client_id, user, meta)``, called as each client's session begins, before its
        handshake is accepted.  It may refuse the client (raise :class:`Refuse`, or return False: HTTP 403)
        and join it to rooms (:meth:`join`: ``joined`` frames after its connect frame); one that raises
        anything else, or takes longer than HOOK_TIMEOUT, refuses it with 503 and is logged.  A resumed
        session (recovery) began already: the hook is not called again."""
        self._hooks.on_connect = _coroutine_function("on_connect", hook)
        return hook

    def on_disconnect(self, hook: _OnDisconnect) -> _OnDisconnect:
        """Register ``async def hook(client_id, user, reason)``, called once as each session ends (each that
        :meth:`on_connect` let in; ``reason``: a ``disconnects_total`` or ``sessions_total`` label), in a task
        of its own, for up to HOOK_TIMEOUT.  With recovery on, a session ends when its client is gone for
        good: the window passed, or it was kicked."""
        self._hooks.on_disconnect = _coroutine_function("on_disconnect", hook)
        return hook

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        """For create_app's lifespan: at shutdown, end the sessions waiting here (the server has closed every
        connection), so that each session's end is told once; then let the on_disconnect calls finish."""
        async with self._hooks.running():
            try:
                yield
            finally:
                self._sessions.end_all("shutdown")

    def _use(self, settings: Settings, backend: _Backend, session_ended: Callable[[_Connection], None],
             together: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext) -> None:
        """Serve the app ``create_app`` builds with these settings; a registry serves one app at a time.
        ``together``: what a backend wraps the deliveries of one message from another instance in
        (:meth:`_ServerSupport.together`)."""
        self._settings, self._backend, self._session_ended = settings, backend, session_ended
        self._together = together
        self._sessions = _Sessions(settings)

    # Membership

    def _add(self, connection: _Connection) -> None:
        self._connections[connection.id] = connection
        if connection.identity.user is not None:
            self._users.setdefault(connection.identity.user, set()).add(connection.id)
        self._metrics.connections_total += 1

    def _remove(self, connection: _Connection) -> None:
        """Forget a connection, its rooms and its user; safe to call twice.  With recovery on, the session
        of a connection whose peer vanished (DROPPED) waits for it instead."""
        state = connection.state
        if self._connections.get(connection.id) is not connection or state in _KEEPING:
            return  # gone already, or its session waits, or went on in a newer connection
        if state is _State.DROPPED and connection.session is not None:
            self._wait_for(connection)
            return
        self._sessions.stop_waiting(connection)
        rooms_left, user_left = self._forget(connection)
        self._backend.unregister(connection, rooms_left, user_left)
        for room in connection.rooms:
            self._announce(room, "left", connection)
        connection.rooms = _NO_ROOMS
        if state is _State.ENDED:  # its session waited, and ended
            self._sessions.outcomes[connection.close_reason] += 1
            self._session_ended(connection)

    def _forget(self, connection: _Connection) -> tuple[dict[str, int], int]:
        """Take a connection out of this instance's indexes; the members left here of its rooms and user.
        For the backend too: a session it parks elsewhere leaves this instance."""
        del self._connections[connection.id]
        rooms_left = {room: _discard_member(self._rooms, room, connection.id) for room in connection.rooms}
        user = connection.identity.user
        return rooms_left, 0 if user is None else _discard_member(self._users, user, connection.id)

    def _adopt(self, connection: _Connection) -> None:
        """Hold a connection resuming a session from elsewhere, with its rooms, while it is handed over."""
        self._connections[connection.id] = connection
        for room in connection.rooms:
            self._rooms.setdefault(room, set()).add(connection.id)
        if connection.identity.user is not None:
            self._users.setdefault(connection.identity.user, set()).add(connection.id)

    # Sessions (connection recovery): _claim() checks a resume token before the handshake is accepted;
    # _resume() hands the session to the new connection after.  In cluster mode, a session waits in Redis
    # (the backend parks it) and may come back through any instance.

    def _wait_for(self, connection: _Connection) -> None:
        """Keep the session of a connection whose peer vanished, for ``recovery_window`` seconds."""
        connection.wait_away()
        if not self._backend.park(connection):  # else it waits in the cluster, and leaves this instance
            self._sessions.wait(connection)

    def _wait_here(self, connection: _Connection) -> None:
        """For the backend: keep here the session of an away connection it could not park after all."""
        self._sessions.wait(connection)

    def _session_over(self, connection: _Connection, reason: str) -> None:
        """For the backend: a session it parked ended while its client was away (``reason``, a sessions_total
        label or a disconnects_total one): tell its rooms and whoever hears of ended sessions."""
        connection.close_reason = reason
        if reason in SESSION_OUTCOMES:
            self._sessions.outcomes[reason] += 1
        for room in connection.rooms:
            self._announce(room, "left", connection)
        self._session_ended(connection)

    def _drop_for_takeover(self, client_id: str, token_hash: str) -> bool:
        """For the backend: cut off the open connection holding the session a resume token (its hash, hex)
        names, for its client has come back elsewhere; False if there is none."""
        connection = self._connections.get(client_id)
        if connection is None or not connection.open or connection.session is None:
            return False
        if not connection.session.holds(token_hash):
            return False
        connection.drop()
        return True

    async def _claim(self, token: str, identity: _Identity, *, spend: bool = True) -> _Connection | _Parked | None:
        """The session ``token`` resumes, its token now spent (if ``spend``): the connection holding it, or
        where the backend keeps it; None if there is none (it ended, the token is not its own, or
        ``identity`` is another user's).

        Raises :class:`_Refused` (409) for the token spent last: a second connection presenting a token
        is refused, not given a new session the client might take for its own.
        """
        client_id, _, secret = token.partition(".")
        previous = self._connections.get(client_id)
        claimed: _Connection | _Parked | Literal[False] | None
        if previous is None or previous.session is None:
            claimed = await self._backend.claim(client_id, _token_hash(secret).hex(), identity.user, spend=spend)
        else:
            taken = self._sessions.claim(previous, secret, identity.user, spend=spend)
            claimed = previous if taken else taken
        if claimed is None:
            if spend:
                self._sessions.outcomes["token_reused"] += 1
            raise _Refused(409, "resume_token_used", "this resume token was used already; connect without it")
        return claimed or None

    async def _resume(self, connection: _Connection, claimed: _Connection | _Parked,
                      offset: int | None) -> list[str] | None:
        """Give the claimed session (its id, rooms and kept frames) to ``connection``, taking it over from
        a connection whose peer has not been seen to leave yet; the frames after ``offset`` that the client
        missed, or None if they are not all kept any more (the session ends) or it ended meanwhile."""
        if isinstance(claimed, _Parked):
            missed = await self._resume_parked(connection, claimed, offset)
        elif self._connections.get(claimed.id) is not claimed:  # it ended meanwhile
            missed = None
        else:
            missed = self._sessions.take(connection, claimed, offset)
            if missed is not None:
                self._connections[connection.id] = connection
        if missed is not None:
            self._metrics.connections_total += 1
            self._sessions.outcomes["resumed"] += 1
        return missed

    async def _resume_parked(self, connection: _Connection, parked: _Parked, offset: int | None) -> list[str] | None:
        """Take a session the backend keeps (see :meth:`_resume`).  The connection holds it here from the
        start, keeping the frames sent to it meanwhile for after the replay."""
        if connection.id in self._connections:  # another connection is resuming it here
            return None
        connection.rooms = set(parked.rooms)
        connection.hold()
        self._adopt(connection)
        taken = await self._backend.take(connection, parked)
        if self._connections.get(connection.id) is not connection or connection.state is not _State.RESUMING:
            if taken is not None:  # kicked meanwhile, once its session was ours: this instance tells of its end
                if connection.close_reason in SESSION_OUTCOMES:
                    self._sessions.outcomes[connection.close_reason] += 1
                self._session_ended(connection)
            return None
        if taken is None:  # gone from the backend meanwhile
            self._forget(connection)
            return None
        held = connection.session.texts(connection.id) if connection.session is not None else ()
        session = _Session.restored(self._settings, taken.base, taken.away_at, [*taken.frames, *held],
                                    bytes.fromhex(parked.token_hash))
        missed = session.back(offset, connection.id)
        connection.session = session
        if missed is None:  # the client is further behind than what was kept: the session ends here
            connection.end("not_recovered")
            self._sessions.outcomes["not_recovered"] += 1
            self._session_ended(connection)
            return None
        connection.go_on(session)
        return missed

    async def _join(self, connection: _Connection, room: str) -> int:
        """Add ``connection`` to ``room``; the room's members after it (on every instance), or 0 if the
        connection has left the registry (it is closing)."""
        if self._connections.get(connection.id) is not connection:  # it left as it started closing
            return 0
        if isinstance(connection.rooms, frozenset):  # its first room
            connection.rooms = set()
        connection.rooms.add(room)
        members = self._rooms.setdefault(room, set())
        members.add(connection.id)
        count = await self._members(connection, room, len(members))
        if self._connections.get(connection.id) is not connection:
            # It left while the backend wrote its membership, maybe after the backend had already removed
            # it: remove it again, now that the write is done.
            user = connection.identity.user
            self._backend.unregister(connection, {room: len(self._rooms.get(room, ()))},
                                     0 if user is None else len(self._users.get(user, ())))
            return 0
        return count

    async def _leave(self, connection: _Connection, room: str) -> int:
        if isinstance(connection.rooms, set):
            connection.rooms.discard(room)
        return await self._members(connection, room, _discard_member(self._rooms, room, connection.id))

    def _announce(self, room: str, action: str, connection: _Connection) -> None:
        """With presence events on, tell the members of ``room`` (on every instance) that ``connection``
        ``"joined"`` or ``"left"`` it; a joiner hears of itself too, after its ``joined`` reply."""
        if not self._settings.presence_events:
            return
        self._announcements.append((room, {"room": room, "action": action, "client_id": connection.id,
                                           "user": connection.identity.user}))
        if len(self._announcements) > 1:  # sending one cut a slow member off: the loop below sends its leaving too
            return
        # A loop, not recursion: one announcement may close members whose leaving is announced in turn.
        try:
            while self._announcements:
                room, data = self._announcements[0]
                frame = _Frame("presence", data)
                self._fan_out(self._rooms.get(room, ()), frame)
                self._backend.publish_soon(_ToRoom(room, frame.head, frame.tail))
                self._announcements.popleft()
        finally:
            self._announcements.clear()

    async def _members(self, connection: _Connection, room: str, members_here: int) -> int:
        try:
            return await self._backend.room_changed(connection, room, members_here)
        except BackendUnavailable:
            return members_here  # the count we know; the next sync writes the membership

    # Sending

    def _refuse_server_event(self, event: str) -> None:
        """Raise ValueError for an event only the gateway sends: a client must never get one the gateway
        did not make itself (a forged ``connect`` would give it another id)."""
        if event in SERVER_EVENTS:
            self._metrics.server_events_refused["python"] += 1
            raise ValueError(f"{event!r} is an event only the gateway sends; send another name")

    async def send_to_client(self, client_id: str, event: str, data: Mapping[str, Any] | None = None) -> bool:
        """Send a server event to one client; False if no such client is connected."""
        self._refuse_server_event(event)
        text = _Frame(event, data).to(client_id)
        connection = self._connections.get(client_id)
        if connection is not None:
            return connection.send(text)
        return await self._backend.send(_ToClient(client_id, text))

    async def publish(self, room: str, event: str, data: Mapping[str, Any] | None = None) -> int:
        """Send a server event to every member of ``room``; how many took it."""
        self._refuse_server_event(event)
        frame = _Frame(event, data)
        # When other instances cannot be reached this raises before anyone got the frame.
        return await self._backend.publish(_ToRoom(room, frame.head, frame.tail),
                                          lambda: self._fan_out(self._rooms.get(room, ()), frame))

    async def broadcast(self, event: str, data: Mapping[str, Any] | None = None) -> int:
        """Send a server event to every connected client; how many took it."""
        self._refuse_server_event(event)
        frame = _Frame(event, data)
        return await self._backend.broadcast(_ToEveryone(frame.head, frame.tail),
                                            lambda: self._fan_out(list(self._connections), frame))

    async def send_to_user(self, user: str, event: str, data: Mapping[str, Any] | None = None) -> int:
        """Send a server event to every connection of ``user``; how many took it."""
        self._refuse_server_event(event)
        frame = _Frame(event, data)
        return await self._backend.publish(_ToUser(user, frame.head, frame.tail),
                                          lambda: self._fan_out(self._users.get(user, ()), frame))

    async def disconnect(self, client_id: str, code: int = CLOSE_NORMAL, reason: str = "") -> bool:
        """Close a client's connection after what is queued for it; False if it is unknown."""
        connection = self._connections.get(client_id)
        if connection is not None:
            connection.close(code, reason, label="kicked")
            return True
        return await self._backend.send(_Kick(client_id, code, reason))

    async def disconnect_user(self, user: str, code: int = CLOSE_NORMAL, reason: str = "") -> int:
        """Close every connection of ``user`` (log them out everywhere); how many there were."""
        return await self._backend.publish(_KickUser(user, code, reason),
                                          lambda: self._kick(self._users.get(user, ()), code, reason))

    async def revoke_user(self, user: str, issued_before: float | None = None) -> float:
        """Refuse ``user``'s tokens issued up to ``issued_before`` (a Unix time; now by default), cached or not,
        at every handshake and resume, on every instance, for ``revocation_ttl`` seconds; the time they are
        refused up to.  Connections open stay: :meth:`disconnect_user` closes them."""
        now = time.time()
        before = now if issued_before is None else issued_before
        until = now + self._settings.revocation_ttl
        self._revocations.add(user, before, until)  # refused here at once, even if other instances cannot be told
        await self._backend.revoke(user, before, until)
        return before

    def _revoke_here(self, user: str, before: float, until: float) -> None:
        """For the backend: a revocation made on another instance (see :meth:`revoke_user`)."""
        with contextlib.suppress(ValueError):  # full: the instance that made it said so to its caller
            self._revocations.add(user, before, until)

    async def _let_in(self, client_id: str, identity: _Identity) -> None:
        """For the endpoint: ask on_connect whether ``client_id`` may begin a session (:class:`_Refused` if not).
        The rooms its credentials grant, and those joined for it from now on, wait until it is greeted."""
        self._connecting[client_id] = dict.fromkeys(identity.rooms)
        try:
            await self._hooks.connecting(client_id, identity)
        except BaseException:
            del self._connecting[client_id]
            raise

    def _abandoned(self, client_id: str, identity: _Identity) -> None:
        """For the endpoint: a client let in left before its handshake was accepted; on_disconnect (if
        on_connect was called) hears of it, as of any end of a session on_connect let in."""
        self._connecting.pop(client_id, None)
        if self._hooks.on_connect is not None:
            self._hooks.ended(client_id, identity.user, "abnormal")

    async def join(self, client_id: str, room: str) -> bool:
        """Put a client in ``room``, on whichever instance it is connected, as if it had sent a join: it gets
        ``joined`` (after its connect frame, when called from on_connect) and the room's members a presence
        event; False if no such client is connected.  The server's decision: the connection's permissions
        do not apply, ``max_rooms_per_connection`` does (ValueError past it, or for a bad room name)."""
        problem = _bad_room_name(room, self._settings)
        if problem is not None:
            raise ValueError(f"room {_clipped(room)}: {problem}")
        found = await self._member_here(client_id, room, join=True)
        return await self._backend.membership(client_id, room, join=True) if found is None else found

    async def leave(self, client_id: str, room: str) -> bool:
        """Take a client out of ``room``, on whichever instance it is connected, as if it had sent a leave (it
        gets ``left``, the members a presence event; nothing if it was not in it); False if no such client
        is connected."""
        problem = _bad_room_name(room, self._settings)
        if problem is not None:
            raise ValueError(f"room {_clipped(room)}: {problem}")
        found = await self._member_here(client_id, room, join=False)
        return await self._backend.membership(client_id, room, join=False) if found is None else found

    async def _member_here(self, client_id: str, room: str, *, join: bool) -> bool | None:
        """Also for the backend: :meth:`join` (or :meth:`leave`) a client of this instance; None if it has none
        of that id, False if it is not open (closing, or away: its session waits for it)."""
        pending = self._connecting.get(client_id)
        if pending is not None:  # being let in: joined once it is greeted
            if not join:
                pending.pop(room, None)
            elif room not in pending and len(pending) >= self._settings.max_rooms_per_connection:
                raise ValueError(_too_many_rooms(client_id, room, self._settings.max_rooms_per_connection))
            else:
                pending[room] = None
            return True
        connection = self._connections.get(client_id)
        if connection is None:
            return None
        if not connection.open:
            return False
        if not join:
            if room in connection.rooms:
                await self._exit(connection, room)
            return True
        return await self._enter(connection, room)

    async def _enter(self, connection: _Connection, room: str, request_id: str | int | None = None) -> bool:
        """Join an open connection to ``room``, for its own join frame (whose ``request_id`` the answer carries)
        or for the server: ``joined``, then presence; False if it started closing meanwhile (no reply, and no
        one hears it joined).  ValueError past max_rooms_per_connection."""
        limit = self._settings.max_rooms_per_connection
        if room not in connection.rooms and len(connection.rooms) >= limit:
            raise ValueError(_too_many_rooms(connection.id, room, limit))
        members = await self._join(connection, room)
        if not members:
            return False
        connection.send(_Frame("joined", {"room": room, "members": members}).reply(connection.id, request_id))
        self._announce(room, "joined", connection)
        return True

    async def _exit(self, connection: _Connection, room: str, request_id: str | int | None = None) -> None:
        """Take a connection out of a room it is in, likewise: ``left``, then presence."""
        members = await self._leave(connection, room)
        connection.send(_Frame("left", {"room": room, "members": members}).reply(connection.id, request_id))
        self._announce(room, "left", connection)

    def _relay_to_client(self, client_id: str, text: str, failed: Callable[..., None],
                         *about: Any) -> Awaitable[None] | None:
        """Deliver a client's frame, unchanged, to one client; else ``failed(*about, code, message)``, maybe
        later.  None once done or on its way, else an awaitable of the rest (see _Backend.forward)."""
        connection = self._connections.get(client_id)
        if connection is None:
            return self._backend.forward(_ToClient(client_id, text), failed, *about)
        if not connection.send(text):
            failed(*about, UNKNOWN_CLIENT, f"no client with id {client_id!r}")
        return None

    def _relay_to_room(self, room: str, sender: str, text: str, failed: Callable[..., None],
                       *about: Any) -> Awaitable[None] | None:
        """Deliver a client's frame, unchanged, to the other members of ``room``, here and elsewhere;
        likewise."""
        self._relay([member for member in self._rooms.get(room, ()) if member != sender], text)
        # After the local members: they get it even when other instances cannot be reached.
        return self._backend.forward_to_room(_ToRoom(room, text), failed, *about)

    def _deliver_here(self, delivery: _Delivery, skip: Collection[str] = ()) -> bool:
        """Deliver what another instance sent this one, to any client but those in ``skip``; False if its
        client is gone."""
        match delivery:
            case _ToClient(client_id) | _Kick(client_id) if client_id not in self._connections:
                return False
            case _ToClient(client_id, text):
                self._connections[client_id].send(text)
            case _Kick(client_id, code, reason):
                self._connections[client_id].close(code, reason, label="kicked")
            case _ToRoom(room, text, tail):
                self._deliver(self._rooms.get(room, ()), text, tail, skip)
            case _ToUser(user, text, tail):
                self._deliver(self._users.get(user, ()), text, tail, skip)
            case _KickUser(user, code, reason):
                self._kick(self._users.get(user, ()), code, reason)
            case _ToEveryone(text, tail):
                self._deliver(self._connections, text, tail, skip)
        return True

    def _deliver(self, members: Iterable[str], text: str, tail: str | None, skip: Collection[str]) -> None:
        client_ids = [client_id for client_id in members if client_id not in skip] if skip else list(members)
        if tail is None:
            self._relay(client_ids, text)
        else:
            self._fan_out(client_ids, _Frame.parts(text, tail))

    def _kick(self, client_ids: Iterable[str], code: int, reason: str, label: str = "kicked") -> int:
        kicked = 0
        for client_id in list(client_ids):  # each close takes its connection out of the set
            connection = self._connections.get(client_id)
            if connection is not None:
                connection.close(code, reason, label=label)
                kicked += 1
        return kicked

    def _fan_out(self, client_ids: Iterable[str], frame: _Frame) -> int:
        frame.length = len(frame.head) + _CLIENT_ID_LENGTH + len(frame.tail)  # once for its every receiver
        # Each receiver's frame as bytes on the wire (for outputs that write bytes: ws_micro_servers.py's), framed
        # once: what comes before its id and what comes after, around each.  Framing and encoding every receiver's
        # text apart was a fifth of a delivery's instructions.
        tail = frame.tail.encode()
        wire = _websocket_frame(frame.head.encode() + bytes(_CLIENT_ID_LENGTH) + tail)
        head = wire[:len(wire) - _CLIENT_ID_LENGTH - len(tail)]
        delivered = 0
        for client_id in list(client_ids):  # a send may cut a slow member off and change the set
            connection = self._connections.get(client_id)
            if connection is not None and connection.send(frame.to(client_id), head + client_id.encode() + tail,
                                                          frame):  # positional: faster
                delivered += 1
        return delivered

    def _relay(self, client_ids: list[str], text: str) -> int:
        if not client_ids:  # a room with only its sender here: nothing to frame
            return 0
        wire = _websocket_frame(text.encode())  # the same bytes for every receiver
        delivered = 0
        for client_id in client_ids:
            connection = self._connections.get(client_id)
            if connection is not None and connection.send(text, wire):
                delivered += 1
        return delivered


# --------------------------------------------------------------------------
# Requests to the backend: signed, pooled (the connect hook, forwarding)
# --------------------------------------------------------------------------

SIGNATURE_HEADER = "X-WS-Micro-Signature"  # t=<unix time>,v1=<hex HMAC-SHA256>
BACKEND_POOL_SIZE = 100  # connections a pool keeps open to the backend: at most as many requests at once


class _Shares:
    """Requests waiting for the backend, in all and by user or address (:func:`_share_key`): like nginx's
    ``limit_conn`` by key, so that one user's slow requests cannot take every pooled connection."""

    def __init__(self, limit: int, share: int) -> None:
        self.limit, self.share = limit, share  # share 0: no share
        self.total = 0
        self._held: dict[str, int] = {}  # only keys with requests waiting: bounded by ``limit``

    def refusal(self, key: str | None) -> str | None:
        """None if one more request of ``key`` may wait; else which bound it is over: "total" or "share"."""
        if self.total >= self.limit:
            return "total"
        if key is not None and self.share and self._held.get(key, 0) >= self.share:
            return "share"
        return None

    def take(self, key: str | None) -> None:
        """Count a request of ``key``, until :meth:`give`; a forwarded event's path, where a generator-based
        context manager was a tenth of the gateway's work."""
        self.total += 1
        if key is not None:
            self._held[key] = self._held.get(key, 0) + 1

    def give(self, key: str | None) -> None:
        self.total -= 1
        if key is not None:
            if self._held[key] == 1:
                del self._held[key]
            else:
                self._held[key] -= 1

    @contextlib.contextmanager
    def holding(self, key: str | None) -> Generator[None]:
        """Count a request of ``key`` while the block runs."""
        self.take(key)
        try:
            yield
        finally:
            self.give(key)


def _signature(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``SIGNATURE_HEADER`` value: HMAC-SHA256 of ``b"<timestamp>." + body``, as payment webhooks sign."""
    return f"t={timestamp},v1={hmac.new(secret, b'%d.' % timestamp + body, hashlib.sha256).hexdigest()}"


_SIGNATURE_NAME = SIGNATURE_HEADER.encode()
# Seconds a pooled connection may stay idle and still be reused.  Under the 5 s after which uvicorn and Node
# close an idle connection: a request written as the backend closes its connection is lost (and, a POST, it is
# not sent again: it may have been taken), so the gateway opens a new one before the backend would close it.
BACKEND_KEEP_IDLE = 4.0
# What an answer's head (or a chunk's size line, or its trailer) may hold before it counts as no HTTP answer:
# h11's max_incomplete_event_size.  nginx reads a response's head into one proxy_buffer_size (4 or 8 KiB);
# 64 KiB leaves a backend's framework room for any headers it adds.
BACKEND_HEAD_LIMIT = 64 * 1024


class _BackendConnection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection to the backend.  It writes one request at a time; h11 (python-hyper's
    sans-I/O HTTP/1.1, which uvicorn requires) frames it and reads the answer as its bytes arrive: 1xx answers
    skipped, then the head, then a body by Content-Length, by chunks, or up to the close.  What the answer is,
    or why there is none, resolves ``answer``."""

    def __init__(self, client: _BackendClient | None, origin: str) -> None:
        import h11  # there: _BackendClient checked

        # The pool it is in, told when it closes; None while it opens, and once its slot is taken by another.
        self.client = client
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[tuple[int, bytes]] | None = None  # while a request waits for its answer
        self.idle_since = 0.0  # the event loop's time when its last answer was read
        self.closed = False
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=BACKEND_HEAD_LIMIT)
        self._limit = 0  # body bytes wanted: the caller's limit + 1, to tell an answer over it
        self._status = 0
        self._body = bytearray()
        self._keep = True  # False: the connection takes no other request once the answer is read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport's subclass

    def ask(self, told: h11.Request, request: bytes, limit: int) -> asyncio.Future[tuple[int, bytes]]:
        """Send ``request``, of which h11 is ``told``; the future of its answer's status and body (at most
        ``limit`` + 1 bytes)."""
        import h11

        assert self.transport is not None and self.answer is None
        answer = self.answer = asyncio.get_running_loop().create_future()
        if self.closed:  # closed by the backend since it was taken: never written
            self._fail("the backend closed the connection")
            return answer
        self._limit, self._keep = limit + 1, True
        # h11 is told of the request (its method and target: what frames the answer), and the request is written
        # as pre-built: h11 building and checking each request's head was a third of its cost per request.
        self.http.send(told)
        self.http.send(h11.EndOfMessage())
        self.transport.write(request)
        return answer

    def data_received(self, data: bytes) -> None:
        if self.answer is None:  # bytes nobody asked for: the connection cannot be trusted with another request
            self.close()
            return
        self.http.receive_data(data)
        self._read("its answer is not HTTP/1.1")

    def eof_received(self) -> bool:
        import h11

        if self.answer is not None and self.http.their_state is h11.SEND_BODY:  # a body may end with the close
            self.http.receive_data(b"")
            self._read("the backend closed the connection before its answer was complete")
        self.close()  # an answer still waiting fails in connection_lost
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.answer is not None:
            self._fail("the backend closed the connection before its answer was complete"
                       + (f" ({exc})" if exc else ""))
        if self.client is not None:
            self.client._lost(self)

    def close(self) -> None:
        """Close the connection; a request waiting gets ConnectionError, through connection_lost."""
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def _read(self, failure: str) -> None:
        """Take h11's events from what was received, until the answer is read or more bytes are needed;
        ``failure`` says what went wrong if h11 finds the bytes are no HTTP/1.1 answer."""
        import h11

        try:
            while self.answer is not None:
                event = self.http.next_event()
                if isinstance(event, h11.Data):
                    self._body += event.data[:self._limit - len(self._body)]
                    if len(self._body) >= self._limit:  # over the caller's limit: the rest is never read
                        self._keep = False
                        self._done()
                elif isinstance(event, h11.Response):
                    self._status = event.status_code
                    names = [name for name, _ in event.headers]
                    if b"transfer-encoding" in names and b"content-length" in names:
                        self._keep = False  # h11 reads it by its chunks; the connection goes (RFC 9112 6.3)
                elif isinstance(event, h11.EndOfMessage):
                    self._done()
                elif event is h11.NEED_DATA:
                    return
                elif not isinstance(event, h11.InformationalResponse):  # 103 Early Hints and the like: skipped
                    # ConnectionClosed (or PAUSED): the answer cannot end
                    self._fail("the backend closed the connection before its answer was complete")
        except h11.RemoteProtocolError as exc:
            why = str(exc) if exc.error_status_hint != 431 else (  # h11's "Receive buffer too long"
                f"its head, a chunk's size line or its trailer is longer than {BACKEND_HEAD_LIMIT} bytes")
            self._fail(f"{failure}: {why[:200]}{'...' if len(why) > 200 else ''}")  # h11 quotes the bad bytes

    def _fail(self, why: str) -> None:
        answer, self.answer = self.answer, None
        if answer is not None and not answer.done():
            answer.set_exception(ConnectionError(why))
        self.close()

    def _done(self) -> None:
        import h11

        answer, self.answer = self.answer, None
        body, self._body = bytes(self._body), bytearray()
        http = self.http
        # Reused only when both sides are done (not after Connection: close or an HTTP/1.0 answer) and nothing
        # came after the answer: more than the answer means the connection is out of step.
        if self._keep and http.our_state is h11.DONE and http.their_state is h11.DONE and not http.trailing_data[0]:
            http.start_next_cycle()
        else:
            self.close()
        if answer is not None and not answer.done():
            answer.set_result((self._status, body))
        self.idle_since = asyncio.get_running_loop().time()


class _Target(typing.NamedTuple):
    """Where a backend URL's requests go, and what each request's head starts with."""

    origin: str  # scheme://host:port: the pool's connections are reused for requests to the same
    host: str
    port: int
    tls: bool
    head: bytes  # the request line and the headers that never change, up to Content-Length's value
    told: h11.Request  # what h11 is told of each request


def _not_installed(what: str, library: str, install: str, extra: str, exc: ImportError) -> ValueError:
    """The one-line error for ``what`` (a setting) whose optional ``library`` cannot be imported: the pip command
    that installs it, which works beside a copied ws_micro.py as in a checkout (ws-micro is installed from a
    checkout, not from PyPI, so ``pip install 'ws-micro[hook]'`` would find nothing), and the checkout's extra."""
    return ValueError(f"{what} needs {library} ({exc}): pip install {install} (in a checkout, pip install "
                      f"'.[{extra}]' does too)")


class _BackendClient:
    """Signed JSON POSTs to the backend over a pool of at most BACKEND_POOL_SIZE kept-alive HTTP/1.1
    connections (:class:`_BackendConnection`), on asyncio's own transports, with h11 for the HTTP (imported
    only when a backend URL is set: a copied single file runs without it under a server that lacks it).
    aiohttp's client, used before, spent two thirds of a forwarded event's CPU in the gateway on machinery
    each request repeats (docs/performance.md, "Issue 25: forwarding").  A request that finds every
    connection taken waits for one, in the order they came.  No redirects, no cookies, no proxies, no
    compression: what the backend answers is what the caller reads.  The connect hook and forwarding each
    have their own client, so that a backend slow to take events cannot keep new clients out."""

    def __init__(self, settings: Settings, what: str) -> None:
        try:
            import h11  # noqa: F401 - there for _BackendConnection, which imports it where it is used
        except ImportError as exc:
            raise _not_installed(what, "h11", "h11", "hook", exc) from None
        assert settings.backend_secret is not None
        self._secret = settings.backend_secret.encode()
        self._targets: dict[str, _Target] = {}
        self._idle: dict[str, list[_BackendConnection]] = {}  # by origin, the last used last
        self._open = 0  # connections open or being opened: at most BACKEND_POOL_SIZE
        # Requests waiting for a connection, first come first served; each future gets a connection of
        # its origin, or None: a slot is free, open one.
        self._waiting: collections.deque[tuple[str, asyncio.Future[_BackendConnection | None]]] = \
            collections.deque()
        self._tls: Any = None  # ssl.SSLContext, made on the first https:// request
        self._stopped = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Close the pool when the app stops; a server that runs no lifespan (daphne) never closes it."""
        self._stopped = False
        try:
            yield
        finally:
            self._stopped = True
            for connections in self._idle.values():
                for connection in connections:
                    connection.close()
            self._idle.clear()

    # A timeout of its own (one timer on the answer's future), not anyio.fail_after's cancel scope: that
    # was a twelfth of a forwarded event's CPU in the gateway.
    async def post(self, url: str, body: bytes, limit: int,
                   timeout: float | None = None) -> tuple[int, bytes]:  # noqa: ASYNC109
        """The status and body (at most ``limit`` + 1 bytes) of a signed POST of ``body``; raise
        ``ConnectionError`` if the backend cannot be reached or its answer is not HTTP, and ``TimeoutError``
        past ``timeout`` seconds (None: the caller bounds its time, by cancelling)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        target = self._targets.get(url) or self._target(url)
        connection = await self._connection(target, deadline)
        signature = _signature(self._secret, body, int(time.time())).encode()
        request = b"%s%d\r\n%s: %s\r\n\r\n%s" % (target.head, len(body), _SIGNATURE_NAME, signature, body)
        answer = connection.ask(target.told, request, limit)
        timer = None if deadline is None else loop.call_at(deadline, _expire, answer)
        try:
            return await answer
        finally:
            if timer is not None:
                timer.cancel()
            if connection.answer is not None:  # cancelled or out of time: the answer would come on it later
                connection.answer = None
                connection.close()
            self._release(connection)

    def _target(self, url: str) -> _Target:
        import h11

        parts = urlsplit(url)
        tls = parts.scheme == "https"
        host, port = parts.hostname or "", parts.port or (443 if tls else 80)
        if not host:
            raise ConnectionError(f"{url!r} names no host")
        path = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe="/?=&%:@!$'()*+,;~")
        authority = f"[{host}]" if ":" in host else host
        authority += "" if parts.port is None else f":{port}"
        head = (f"POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n"
                "Content-Length: ").encode("ascii", "backslashreplace")
        try:  # h11 checks the request line and the Host header
            told = h11.Request(method=b"POST", target=path.encode("ascii", "backslashreplace"),
                               headers=[(b"Host", authority.encode("ascii", "backslashreplace"))])
        except h11.LocalProtocolError as exc:
            raise ConnectionError(f"{_clipped(url)} makes no HTTP request: {exc}") from None
        self._targets[url] = target = _Target(f"{parts.scheme}://{authority}", host, port, tls, head, told)
        return target

    async def _connection(self, target: _Target, deadline: float | None) -> _BackendConnection:
        """A kept-alive connection to ``target`` if one is idle, else a new one if the pool has room, else
        the next one given back (in turn with the other requests waiting)."""
        while True:
            now, idle = asyncio.get_running_loop().time(), self._idle.get(target.origin)
            while idle:
                connection = idle.pop()
                if connection.closed:
                    continue
                if now - connection.idle_since < BACKEND_KEEP_IDLE:
                    return connection
                connection.client = None  # idle too long, the backend may be closing it: its slot to a new one
                connection.close()
                break
            else:  # none idle: a slot for a new one
                if self._open < BACKEND_POOL_SIZE:
                    self._open += 1
                elif not self._close_an_idle_one():  # else the closed one's slot is taken over
                    given = await self._given(target.origin, deadline)
                    if given is not None and given.closed:
                        continue  # closed on its way here: its slot went on without it
                    if given is not None:
                        return given
            try:  # a slot is held: open a connection in it
                return await self._connect(target, deadline)
            except BaseException:
                self._pass_on(None)
                raise

    async def _given(self, origin: str, deadline: float | None) -> _BackendConnection | None:
        """Wait, after the requests waiting already, for a connection to ``origin`` given back, or (None) for the
        slot of one that closed."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_BackendConnection | None] = loop.create_future()
        self._waiting.append((origin, waiter))
        timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._pass_on(waiter.result())  # given just as it was cancelled: the next one's
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove((origin, waiter))
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def _connect(self, target: _Target, deadline: float | None) -> _BackendConnection:
        loop = asyncio.get_running_loop()
        if target.tls and self._tls is None:
            import ssl

            self._tls = ssl.create_default_context()
        # Not the pool's until it is open: while it opens, its slot is the caller's to give back if it fails, not
        # the connection's when it closes (as it may, made just as the time ran out).
        connection = _BackendConnection(None, target.origin)
        try:
            opening = loop.create_connection(lambda: connection, target.host, target.port,
                                             ssl=self._tls if target.tls else None)
            if deadline is None:
                await opening
            else:
                await asyncio.wait_for(opening, max(0.0, deadline - loop.time()))
        except BaseException as exc:
            connection.close()
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):  # out of time is no OSError here
                raise ConnectionError(str(exc) or type(exc).__name__) from None
            raise
        if connection.closed:
            raise ConnectionError("the backend closed the connection as it opened")
        connection.client = self
        return connection

    def _close_an_idle_one(self) -> bool:
        """Close a connection idle to another origin, making room for a new one; False if there is none."""
        for connections in self._idle.values():
            if connections:
                connection = connections.pop(0)
                connection.client = None  # its slot is taken over here, not given back when it closes
                connection.close()
                return True
        return False

    def _release(self, connection: _BackendConnection) -> None:
        """``connection`` finished a request: to the first request waiting, or kept idle."""
        if connection.closed:
            return  # its slot is passed on by _lost
        if self._stopped:
            connection.close()
            return
        waiting = self._next_waiting()
        if waiting is None:
            self._idle.setdefault(connection.origin, []).append(connection)
        elif waiting[0] != connection.origin:  # keep the slot, not the connection
            connection.client = None
            connection.close()
            waiting[1].set_result(None)
        else:
            waiting[1].set_result(connection)

    def _next_waiting(self) -> tuple[str, asyncio.Future[_BackendConnection | None]] | None:
        """The first request still waiting for a connection (its origin and future), taken from the queue."""
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting[1].done():  # else out of time or cancelled, and not yet gone from the queue
                return waiting
        return None

    def _lost(self, connection: _BackendConnection) -> None:
        """``connection`` closed: its slot to the first request waiting, or free."""
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
        self._pass_on(None)

    def _pass_on(self, connection: _BackendConnection | None) -> None:
        """Give a connection (or, None, the slot of one) to the first request waiting, or back to the pool."""
        if connection is not None:
            self._release(connection)
        elif (waiting := self._next_waiting()) is not None:
            waiting[1].set_result(None)
        else:
            self._open -= 1


def _expire(future: asyncio.Future[Any]) -> None:
    """A request's deadline passed: what it waits for fails with TimeoutError."""
    if not future.done():
        future.set_exception(TimeoutError())


# --------------------------------------------------------------------------
# Authentication: signed tokens and the connect hook
# --------------------------------------------------------------------------

TOKEN_CACHE_SIZE = 10_000  # verified tokens remembered until they expire
TOKEN_CACHE_TOKEN_SIZE = 4096  # characters of the longest token remembered
HOOK_HEADERS = ("cookie", "authorization", "origin", "user-agent")  # passed to the hook, with connect_hook_headers
HOOK_ANSWER_LIMIT = 64 * 1024  # bytes of a hook's answer read before it counts as garbage

# What became of each connect hook request (the connect_hook_total labels): it granted an identity; it
# refused (401, 403); it did not answer in time; it could not be reached; it answered another status;
# it answered what is not a grant.  Every outcome but the first two refuses the handshake with 503.
HOOK_OUTCOMES = ("accepted", "refused", "timeout", "unreachable", "bad_status", "bad_answer")


class _Authorizer:
    """Who a handshake is.  Without authentication, anyone: every connection is ``ANONYMOUS``.  With it,
    :class:`_TokenAndHookAuthorizer` (below) grants an identity or raises :class:`_Refused`."""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        yield

    async def authorize(self, request: HTTPConnection, client_id: str) -> _Identity:
        """``request``: the handshake (or a plain GET of the endpoint, asking what a handshake would get)."""
        return ANONYMOUS

    def metrics(self) -> list[_MetricFamily]:
        return []


def _credentials(request: HTTPConnection) -> str | None:
    """The token a handshake brings: ``Authorization: Bearer`` (programs) or ``?token=`` (browsers)."""
    token = (_bearer(request) or "").strip()
    return token or request.query_params.get("token") or None


class _TokenVerifier:
    """Checks signed tokens (JWTs) with PyJWT: signature, ``exp`` (required), ``nbf``, ``aud``, ``iss``, and
    ``sub`` (required: the user).  Each key takes one algorithm, so ``none`` and HS/RS confusion fail.

    A token verified once is remembered (the last TOKEN_CACHE_SIZE) until its ``exp``: clients that
    reconnect with the token they have, all at once after a restart, cost a lookup each.
    """

    def __init__(self, settings: Settings) -> None:
        try:
            import jwt
        except ImportError as exc:
            what = " and ".join(name for name in ("jwt_secret", "jwt_public_key") if getattr(settings, name))
            raise _not_installed(what, "PyJWT", "'pyjwt[crypto]'", "jwt", exc) from None
        self._jwt = jwt
        self.settings = settings
        self.keys: dict[str, Any] = {}  # algorithm -> key
        if settings.jwt_secret:
            self.keys["HS256"] = settings.jwt_secret
        if settings.jwt_public_key:
            algorithm, key = _public_key(settings.jwt_public_key)
            self.keys[algorithm] = key
        # token -> its grant, nbf, exp and iat (None: the token has none)
        self._verified: collections.OrderedDict[str, tuple[_Grant, float, float, float | None]] = (
            collections.OrderedDict())

    def verify(self, token: str) -> tuple[_Grant, float | None]:
        """The grant a token carries, and when it was issued (its ``iat``, if it has one); :class:`_Refused`
        (401) saying why it is not valid."""
        remembered = self._verified.get(token)
        if remembered is not None:
            grant, not_before, expires, issued_at = remembered
            if not_before <= time.time() < expires:
                self._verified.move_to_end(token)
                return grant, issued_at
            del self._verified[token]  # expired since: verified again, it is refused with the reason
        verified = self._decode(token)
        if len(token) <= TOKEN_CACHE_TOKEN_SIZE:  # what the cache holds stays small: 10,000 x 4 KB at most
            self._verified[token] = verified
            if len(self._verified) > TOKEN_CACHE_SIZE:
                self._verified.popitem(last=False)
        return verified[0], verified[3]

    def _decode(self, token: str) -> tuple[_Grant, float, float, float | None]:
        jwt = self._jwt
        try:
            # With one key its algorithm is the only one accepted, and PyJWT refuses any other itself.
            algorithm = next(iter(self.keys)) if len(self.keys) == 1 else _token_algorithm(token)
            if algorithm not in self.keys:
                raise jwt.InvalidAlgorithmError(algorithm)
            claims = jwt.decode(token, self.keys[algorithm], algorithms=[algorithm],
                                audience=self.settings.jwt_audience, issuer=self.settings.jwt_issuer,
                                options={"require": ["exp", "sub"]})
            grant = msgspec.convert({**claims, "user": claims["sub"]}, _Grant)
            issued_at = claims.get("iat")  # PyJWT checked that it is a number, if there is one
            return (grant, float(claims.get("nbf", 0)), float(claims["exp"]),
                    None if issued_at is None else float(issued_at))
        except jwt.InvalidAlgorithmError:
            message = (f"tokens signed with {_token_algorithm(token)!r} are not accepted "
                       f"(only {', '.join(self.keys)})")
        except jwt.ExpiredSignatureError:
            message = "the token has expired"
        except jwt.ImmatureSignatureError:
            message = "the token is not valid yet (nbf)"
        except jwt.InvalidAudienceError:
            message = f"the token is not for this audience ({self.settings.jwt_audience!r})"
        except jwt.InvalidIssuerError:
            message = f"the token is not from issuer {self.settings.jwt_issuer!r}"
        except jwt.MissingRequiredClaimError as exc:
            message = f"the token has no {exc.claim!r} claim"
        except jwt.InvalidSignatureError:
            message = "the token's signature does not match"
        except jwt.InvalidTokenError as exc:
            message = f"invalid token: {exc}"
        except msgspec.ValidationError as exc:
            message = f"invalid token claims: {exc}"
        raise _Refused(401, "unauthorized", message)


def _token_algorithm(token: str) -> str | None:
    """The ``alg`` a token's header names, unverified; None if it has none (or no header JSON can hold:
    this parser runs on a client's bytes before any check, nested as deep as they like)."""
    try:
        header = _decode(msgspec.json.decode, base64.urlsafe_b64decode(token.partition(".")[0] + "==").decode())
    except (ValueError, msgspec.DecodeError):
        return None
    algorithm = header.get("alg") if isinstance(header, dict) else None
    return algorithm if isinstance(algorithm, str) else None


def _public_key(text: str) -> tuple[str, Any]:
    """A PEM public key (its text, or a file holding it) and the one algorithm it verifies."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if "-----BEGIN" not in text:
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise ValueError(f"jwt_public_key must be PEM text or a PEM file, but cannot read {text!r}: "
                             f"{exc.strerror}") from None
    try:
        key = load_pem_public_key(text.encode())
    except ValueError as exc:
        raise ValueError(f"jwt_public_key is not a PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    raise ValueError(f"jwt_public_key must be an RSA or P-256 key, but got {type(key).__name__}")


class _ConnectHook:
    """Asks the backend whether to accept a handshake, as AWS's ``$connect`` authorizer and Centrifugo's
    connect proxy do; docs/auth.md has the request and the answers.  Fails closed: no clear answer, 503.
    One address may have ``connect_hook_max_pending_per_address`` handshakes waiting for it; more get 503
    at once, so that handshakes the hook holds leave the rest of its pool to other addresses."""

    def __init__(self, settings: Settings) -> None:
        assert settings.connect_hook_url is not None
        self.url = settings.connect_hook_url
        self.settings = settings
        self.client = _BackendClient(settings, "connect_hook_url")
        self.headers = (*HOOK_HEADERS, *(name.lower() for name in settings.connect_hook_headers))
        self.outcomes = collections.Counter(dict.fromkeys(HOOK_OUTCOMES, 0))
        self._throttle = _Throttle()
        self._decode = msgspec.json.Decoder(_Grant).decode
        # No total of its own: max_connections counts the handshakes waiting, and bounds them.
        self.pending = _Shares(sys.maxsize, settings.connect_hook_max_pending_per_address)

    async def ask(self, request: HTTPConnection, client_id: str) -> _Identity:
        client = request.client
        key = _share_key(None, client.host if client else None)
        if self.pending.refusal(key) == "share":
            raise _Refused(503, "over_share", f"{key} has {self.pending.share} handshakes waiting for the connect "
                                              "hook (connect_hook_max_pending_per_address); try again later")
        body = _encode({
            "client_id": client_id,
            "remote": f"{client.host}:{client.port}" if client else None,
            "path": request.scope["path"],
            "query": dict(request.query_params),
            "headers": {name: request.headers[name] for name in self.headers if name in request.headers},
            "websocket": request.scope["type"] == "websocket",  # false: a plain GET asking what it would get
        })
        timeout = self.settings.connect_hook_timeout
        try:
            with self.pending.holding(key), anyio.fail_after(timeout):
                status, answer = await self.client.post(self.url, body, HOOK_ANSWER_LIMIT)
        except TimeoutError:
            raise self._failed("timeout", f"the connect hook did not answer within {timeout:g} seconds") from None
        except ConnectionError as exc:
            raise self._failed("unreachable", f"the connect hook cannot be reached ({exc})") from None
        if status in (401, 403):
            self.outcomes["refused"] += 1
            raise _Refused(status, "unauthorized" if status == 401 else "forbidden",
                           "the credentials were refused" if status == 401 else "this connection is not allowed")
        if not 200 <= status < 300:
            raise self._failed("bad_status", f"the connect hook answered HTTP {status}")
        try:
            if len(answer) > HOOK_ANSWER_LIMIT:
                raise ValueError(f"it is larger than {HOOK_ANSWER_LIMIT} bytes")
            identity = _identity(_decode(self._decode, answer) if answer.strip() else _Grant(), self.settings)
        except (msgspec.MsgspecError, ValueError) as exc:
            raise self._failed("bad_answer", f"the connect hook's answer is not a grant: {str(exc)[:200]}") from None
        self.outcomes["accepted"] += 1
        return identity

    def _failed(self, outcome: str, message: str) -> _Refused:
        """Count and log (at most once per 10 s) a hook that gave no answer; the client gets 503."""
        self.outcomes[outcome] += 1
        self._throttle.warn(outcome, f"{message}; handshakes are refused with 503")
        return _Refused(503, "auth_unavailable", "authentication is unavailable; try again later")


class _TokenAndHookAuthorizer(_Authorizer):
    """Authentication on: a handshake with a token is judged by it, when tokens are configured; any other
    goes to the connect hook, if there is one, or is refused with 401."""

    def __init__(self, settings: Settings, revocations: _Revocations) -> None:
        self.tokens = _TokenVerifier(settings) if settings.jwt_secret or settings.jwt_public_key else None
        self.hook = _ConnectHook(settings) if settings.connect_hook_url else None
        self.settings = settings
        self.revocations = revocations

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        if self.hook is None:
            yield
        else:
            async with self.hook.client.running():
                yield

    async def authorize(self, request: HTTPConnection, client_id: str) -> _Identity:
        token = _credentials(request)
        if token is not None and self.tokens is not None:
            grant, issued_at = self.tokens.verify(token)
            revoked = self.revocations.revoked(grant.user, issued_at)
            if revoked is not None:  # checked after the cache too: a remembered token is refused alike
                raise _Refused(401, "unauthorized", f"the tokens of this user issued before {_iso(revoked)} were "
                                                    "revoked; get a new one")
            try:
                return _identity(grant, self.settings)
            except ValueError as exc:
                raise _Refused(401, "unauthorized", f"invalid token claims: {exc}") from None
        if self.hook is not None:
            return await self.hook.ask(request, client_id)
        raise _Refused(401, "unauthorized", "a token is required: send 'Authorization: Bearer <token>' "
                                            "or add ?token=<token> to the URL")

    def metrics(self) -> list[_MetricFamily]:
        if self.hook is None:
            return []
        return [("connect_hook_total", "counter", "Connect hook requests, by outcome.", self.hook.outcomes,
                 "outcome")]


# --------------------------------------------------------------------------
# Forwarding to the backend: client events, connects and disconnects
# --------------------------------------------------------------------------

FORWARD_ANSWER_LIMIT = 1024 * 1024  # bytes of the backend's answer to a forwarded event
NOTICE_QUEUE = 10_000  # connect and disconnect notices waiting to be sent before more are dropped
NOTICE_SENDERS = 8  # notices sent at once
ADDRESS_KEYS_CACHED = 4096  # addresses whose share key is remembered: more than a gateway's usual busy senders

# What became of each forwarded event (the forwarded_total labels): answered with 2xx; answered an
# error status or garbage (backend_error); no answer in time or no connection (backend_unavailable);
# refused unsent because forward_max_pending events were waiting already, or its user (or address)
# had forward_max_pending_per_user waiting (backend_unavailable).
FORWARD_OUTCOMES = ("ok", "backend_error", "timeout", "unreachable", "busy", "over_share")
# Connect and disconnect notices (the notices_total labels): taken by the backend (2xx); tried again;
# given up after lifecycle_retries more tries, or because NOTICE_QUEUE were waiting, or its user's (or
# address's) lifecycle_max_queued_per_user.
NOTICE_OUTCOMES = ("sent", "retried", "dropped")


class _Forwarder:
    """Where the client events that no built-in or handler takes go, and who hears of connects and
    disconnects.  Alone: nowhere (the sender gets ``unknown_event``), and no one.  With ``forward_url``,
    :class:`_HttpForwarder` (below) POSTs them to the backend."""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        yield

    def takes(self, event: str) -> bool:
        return False

    async def forward(self, connection: _Connection, event: Event, failed: Callable[..., None]) -> None:
        """Forward ``event`` and send its replies to ``connection``; else ``failed(code, message, **details)``."""

    def connected(self, connection: _Connection) -> None:
        """``connection`` was accepted."""

    def disconnected(self, connection: _Connection) -> None:
        """``connection`` ended, once for each connected(); its ``close_reason`` says how."""

    def metrics(self) -> list[_MetricFamily | _Histogram]:
        return []


class _ReplyEvent(msgspec.Struct):
    event: str
    data: dict[str, Any] = {}


class _Reply(msgspec.Struct):
    """The backend's answer to a forwarded event: frames for its sender, in order."""

    events: list[_ReplyEvent] = []


class _NotForwarded(Exception):
    """Why an event got no answer from the backend: its forwarded_total ``outcome``, and the ``code``, the
    ``message`` and the HTTP ``status`` its sender gets."""

    def __init__(self, outcome: str, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.outcome, self.code, self.message, self.status = outcome, code, message, status


class _Batch:
    """Events of one moment on their way to the backend in one request (forward_batch)."""

    __slots__ = ("answers", "bodies", "bytes", "sent")

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.answers: list[asyncio.Future[tuple[int, _Reply]]] = []
        self.bytes = 1  # with the array's brackets and commas
        self.sent = False


_R = TypeVar("_R")


class _HttpForwarder(_Forwarder):
    """POSTs client events to ``forward_url`` and sends the answer's events back to their sender, like AWS's
    two-way routes; tells ``lifecycle_url`` of every connect and disconnect.  docs/backend.md has the bodies.

    A connection forwards one event at a time, in order: its next frame is read when the backend has
    answered.  At most ``forward_max_pending`` wait in all, and ``forward_max_pending_per_user`` for one user
    or address; more are refused at once, so the memory held for a slow backend is bounded whatever it does,
    and one user's slow events leave the rest of the pool to others.  Notices never delay a client: they are queued
    (at most NOTICE_QUEUE, and ``lifecycle_max_queued_per_user`` of one user or address), sent by
    NOTICE_SENDERS tasks that take each user's or address's in turn, tried ``lifecycle_retries`` more
    times, and counted when dropped.  A connection's events and its disconnect wait for its connect notice.
    """

    def __init__(self, settings: Settings, metrics: _Metrics) -> None:
        self.settings = settings
        self._gateway_metrics = metrics  # the registry's: refused events are counted with the gateway's own
        self.client = _BackendClient(settings, "forward_url" if settings.forward_url else "lifecycle_url")
        self.url = settings.forward_url
        self.lifecycle_url = settings.lifecycle_target
        self.outcomes = collections.Counter(dict.fromkeys(FORWARD_OUTCOMES, 0))
        self.latency = _Histogram("forward_seconds", "Time the backend took to answer a forwarded event.")
        self.notices = collections.Counter(dict.fromkeys(NOTICE_OUTCOMES, 0))
        self.pending = _Shares(settings.forward_max_pending, settings.forward_max_pending_per_user)
        self._decode = msgspec.json.Decoder(_Reply).decode
        self._decode_batch = msgspec.json.Decoder(list[_Reply | None]).decode
        self._batch: _Batch | None = None  # the batch of this moment, still taking events
        self._batches: set[asyncio.Task[None]] = set()  # batches on their way
        self._throttle = _Throttle()
        # Notices, by user or address, each's in order: (body, set when it is done, the notice that must go first).
        self._queues: dict[str, collections.deque[tuple[bytes, anyio.Event, anyio.Event | None]]] = {}
        self._turns: collections.deque[str] = collections.deque()  # the keys of _queues, the next to send first
        self._waiting = 0  # notices in _queues
        self._queued: anyio.Event | None = None
        self._senders: set[asyncio.Task[None]] = set()
        self._sending = 0
        self._idle: anyio.Event | None = None  # set when nothing is queued or being sent
        # Client id -> its connect notice's done event, and whose notices it is queued with.
        self._connect_notices: dict[str, tuple[anyio.Event, str]] = {}
        # The share keys of the addresses that sent events lately: parsing an address for each event was a
        # twentieth of the gateway's CPU for it.  Emptied when full.
        self._address_keys: dict[str, str | None] = {}

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """At shutdown, send the notices still queued (disconnects, mostly) for up to ``forward_timeout``."""
        async with self.client.running():
            try:
                yield
            finally:
                await self._drain()

    async def _drain(self) -> None:
        with anyio.move_on_after(self.settings.forward_timeout, shield=True):
            while self._waiting or self._sending:
                self._idle = anyio.Event()
                await self._idle.wait()
        for sender in self._senders:
            sender.cancel()
        self.notices["dropped"] += self._waiting
        self._queues.clear()
        self._turns.clear()
        self._waiting = 0

    def takes(self, event: str) -> bool:
        return self.url is not None and _matches(self.settings.forward_events, event)

    async def forward(self, connection: _Connection, event: Event, failed: Callable[..., None]) -> None:
        assert self.url is not None
        identity, timeout = connection.identity, self.settings.forward_timeout
        key = self._key_of(connection)
        over = self.pending.refusal(key)
        if over == "total":
            self.outcomes["busy"] += 1
            failed(BACKEND_UNAVAILABLE, f"{self.pending.limit} events are waiting for the backend "
                                        "(forward_max_pending); try again later")
            return
        if over == "share":
            self.outcomes["over_share"] += 1
            failed(BACKEND_UNAVAILABLE, f"{key} has {self.pending.share} events waiting for the backend "
                                        "(forward_max_pending_per_user); try again later")
            return
        body = _encode({"type": "event", "client_id": connection.id, "user": identity.user, "meta": identity.meta,
                        "event": event.event, "data": event.data.data, "rooms": sorted(connection.rooms)})
        self.pending.take(key)
        try:
            notice = self._connect_notices.get(connection.id)
            if notice is not None and not notice[0].is_set():
                with anyio.move_on_after(timeout):  # the backend hears of the client before its events
                    await notice[0].wait()
            started = time.perf_counter()
            try:
                status, reply = await (self._alone(body) if self.settings.forward_batch == 1 else self._batched(body))
            finally:
                self.latency.observe(time.perf_counter() - started)
        except _NotForwarded as exc:
            self.outcomes[exc.outcome] += 1
            if exc.code == BACKEND_UNAVAILABLE:
                self._throttle.warn(exc.outcome, f"forwarding: {exc.message}")
            failed(exc.code, exc.message, **({} if exc.status is None else {"status": exc.status}))
            return
        finally:
            self.pending.give(key)
        forged = next((item.event for item in reply.events if item.event in SERVER_EVENTS), None)
        if forged is not None:  # the client must never get such an event that the gateway did not make
            self.outcomes["backend_error"] += 1
            self._gateway_metrics.server_events_refused["backend"] += 1
            message = f"the backend answered {_clipped(forged)}, an event only the gateway sends"
            self._throttle.warn("server_event", f"forwarding: {message}, to event {_clipped(event.event)}; its whole "
                                                "answer was refused and its sender got backend_error (docs/backend.md)")
            failed(BACKEND_ERROR, message, status=status)
            return
        self.outcomes["ok"] += 1
        for item in reply.events:
            connection.send(_Frame(item.event, item.data).reply(connection.id, event.id))

    def _key_of(self, connection: _Connection) -> str | None:
        """:func:`_connection_key`, each address parsed once while it stays in the cache."""
        if connection.identity.user is not None or not connection.remote:
            return _connection_key(connection)
        host = connection.remote.rpartition(":")[0]
        key = self._address_keys.get(host)
        if key is None:
            if len(self._address_keys) >= ADDRESS_KEYS_CACHED:
                self._address_keys.clear()
            key = self._address_keys[host] = _share_key(None, host)
        return key

    async def _alone(self, body: bytes) -> tuple[int, _Reply]:
        """The status and the backend's answer to one event, POSTed alone; else :class:`_NotForwarded`."""
        status, answer = await self._post(body)
        if not answer.strip():  # 204, or 200 with nothing: nothing to send back
            return status, _Reply()
        return status, self._reply(status, answer, self._decode, 'the backend\'s answer is not {"events": [...]}')

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        """The status and body of a 2xx answer to ``body``; else :class:`_NotForwarded`."""
        assert self.url is not None
        timeout = self.settings.forward_timeout
        try:
            status, answer = await self.client.post(self.url, body, FORWARD_ANSWER_LIMIT, timeout)
        except TimeoutError:
            raise _NotForwarded("timeout", BACKEND_UNAVAILABLE,
                                f"the backend did not answer within {timeout:g} seconds") from None
        except ConnectionError as exc:
            raise _NotForwarded("unreachable", BACKEND_UNAVAILABLE, f"the backend cannot be reached ({exc})") from None
        if not 200 <= status < 300:
            raise _NotForwarded("backend_error", BACKEND_ERROR, f"the backend answered HTTP {status}", status)
        return status, answer

    @staticmethod
    def _reply(status: int, answer: bytes, decode: Callable[[bytes], _R], what: str) -> _R:
        """``answer`` decoded; else :class:`_NotForwarded` with ``what`` it is not."""
        try:
            if len(answer) > FORWARD_ANSWER_LIMIT:
                raise msgspec.DecodeError(f"it is larger than {FORWARD_ANSWER_LIMIT} bytes")
            return _decode(decode, answer)
        except msgspec.MsgspecError as exc:
            raise _NotForwarded("backend_error", BACKEND_ERROR, f"{what}: {str(exc)[:200]}", status) from None

    # Batches (forward_batch > 1): the events of one moment, of any connections, in one request.

    async def _batched(self, body: bytes) -> tuple[int, _Reply]:
        """The status and the backend's answer to one event, POSTed in the batch of the moment; else
        :class:`_NotForwarded`."""
        loop = asyncio.get_running_loop()
        batch = self._batch
        if batch is not None and batch.bytes + len(body) > self.settings.forward_batch_bytes:
            self._send_batch(batch)  # full: this event starts the next one
            batch = None
        if batch is None:  # sent at the end of this moment: when every event read in it has joined
            batch = self._batch = _Batch()
            loop.call_soon(self._send_batch, batch)
        answer: asyncio.Future[tuple[int, _Reply]] = loop.create_future()
        batch.bodies.append(body)
        batch.answers.append(answer)
        batch.bytes += len(body) + 1
        if len(batch.bodies) >= self.settings.forward_batch:
            self._send_batch(batch)
        return await answer

    def _send_batch(self, batch: _Batch) -> None:
        if batch.sent:
            return
        batch.sent = True
        if self._batch is batch:
            self._batch = None
        task = asyncio.get_running_loop().create_task(self._post_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _post_batch(self, batch: _Batch) -> None:
        """POST ``batch`` as a JSON array; each event's future gets its answer, or why it has none."""
        outcome: list[_Reply | None] | _NotForwarded
        status = 0
        try:
            status, answer = await self._post(b"[" + b",".join(batch.bodies) + b"]")
            if not answer.strip():  # 204: nothing for any of them
                replies: list[_Reply | None] = [None] * len(batch.answers)
            else:
                replies = self._reply(status, answer, self._decode_batch, "the backend's answer to a batch is not "
                                                                          '[{"events": [...]}, ...]')
            if len(replies) != len(batch.answers):
                raise _NotForwarded("backend_error", BACKEND_ERROR, f"the backend answered {len(replies)} replies to a "
                                                                    f"batch of {len(batch.answers)} events", status)
            outcome = replies
        except _NotForwarded as exc:
            outcome = exc
        except BaseException:  # cancelled as the gateway stops: the events still waiting get an answer
            outcome = _NotForwarded("unreachable", BACKEND_UNAVAILABLE, "the gateway is stopping")
            raise
        finally:
            for n, future in enumerate(batch.answers):
                if not future.done():
                    if isinstance(outcome, _NotForwarded):
                        future.set_exception(outcome)
                    else:
                        future.set_result((status, outcome[n] or _Reply()))

    # Notices

    def connected(self, connection: _Connection) -> None:
        if self.lifecycle_url is not None:
            identity = connection.identity
            key = _connection_key(connection) or connection.id
            self._connect_notices[connection.id] = self._notify(key, {
                "type": "connect", "id": f"{connection.id}:connect", "client_id": connection.id,
                "user": identity.user, "meta": identity.meta, "rooms": list(identity.rooms),
                "remote": connection.remote}), key

    def disconnected(self, connection: _Connection) -> None:
        if self.lifecycle_url is not None:
            identity = connection.identity
            # Queued behind its connect notice, even from another address (a session resumed from elsewhere):
            # a sender then never waits for a connect notice that no sender has taken yet.
            done, key = self._connect_notices.pop(connection.id, (None, _connection_key(connection) or connection.id))
            self._notify(key, {
                "type": "disconnect", "id": f"{connection.id}:disconnect", "client_id": connection.id,
                "user": identity.user, "meta": identity.meta, "reason": connection.close_reason}, after=done)

    def _notify(self, key: str, content: dict[str, Any], after: anyio.Event | None = None) -> anyio.Event:
        """Queue a notice behind the others of ``key`` (a user, an address; a connection without either); the
        event set when it is sent or dropped."""
        done = anyio.Event()
        queue = self._queues.get(key)
        share = self.settings.lifecycle_max_queued_per_user
        if self._waiting >= NOTICE_QUEUE or (share and queue is not None and len(queue) >= share):
            # The backend is down or slow, or this user (address) opens connections faster than it takes
            # their notices: hold no more, and let the others' go first.
            self.notices["dropped"] += 1
            if self._waiting < NOTICE_QUEUE:
                self._throttle.warn("notice_share", f"forwarding: a notice was dropped: {key} has {share} "
                                                    "waiting (lifecycle_max_queued_per_user)")
            done.set()
            return done
        if queue is None:
            queue = self._queues[key] = collections.deque()
            self._turns.append(key)
        queue.append((_encode(content), done, after))
        self._waiting += 1
        if len(self._senders) < NOTICE_SENDERS:  # started on first use: under daphne no lifespan runs
            sender = asyncio.get_running_loop().create_task(self._send_notices())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        if self._queued is not None:
            self._queued.set()
        return done

    async def _send_notices(self) -> None:
        assert self.lifecycle_url is not None
        while True:
            while not self._turns:
                if self._queued is None or self._queued.is_set():  # one event that wakes every idle sender
                    self._queued = anyio.Event()
                await self._queued.wait()
            # Each user's (address's) next notice in turn, as fair queueing does: one that opens connections
            # by the thousand delays another's notices by one of its own, not by all of them.
            key = self._turns.popleft()
            queue = self._queues[key]
            body, done, after = queue.popleft()
            if queue:
                self._turns.append(key)
            else:
                del self._queues[key]
            self._waiting -= 1
            self._sending += 1
            try:
                if after is not None:
                    await after.wait()
                await self._send_notice(body)
            finally:
                self._sending -= 1
                done.set()
                if not self._waiting and not self._sending and self._idle is not None:
                    self._idle.set()

    async def _send_notice(self, body: bytes) -> None:
        assert self.lifecycle_url is not None
        retries = self.settings.lifecycle_retries
        for attempt in range(retries + 1):
            try:
                with anyio.fail_after(self.settings.forward_timeout):
                    status, _ = await self.client.post(self.lifecycle_url, body, FORWARD_ANSWER_LIMIT)
                if 200 <= status < 300:
                    self.notices["sent"] += 1
                    return
                why = f"HTTP {status}"
            except (TimeoutError, ConnectionError) as exc:
                why = str(exc) or type(exc).__name__
            if attempt < retries:
                self.notices["retried"] += 1
                await anyio.sleep(min(0.5 * 2 ** attempt, 5.0))
        self.notices["dropped"] += 1
        self._throttle.warn("notice", f"forwarding: a connect or disconnect notice was dropped after {retries + 1} "
                                      f"tries ({why})")

    def metrics(self) -> list[_MetricFamily | _Histogram]:
        return [("forwarded_total", "counter", "Client events forwarded to the backend, by outcome.", self.outcomes,
                 "outcome"), self.latency,
                ("notices_total", "counter", "Connect and disconnect notices to the backend, by outcome.",
                 self.notices, "outcome")]


# --------------------------------------------------------------------------
# WebSocket endpoint
# --------------------------------------------------------------------------

class _Gateway:
    """The WebSocket endpoint: handshake checks, the read loop and the protocol's routing."""

    def __init__(self, registry: Registry, settings: Settings, server: _ServerSupport,
                 authorizer: _Authorizer, forwarder: _Forwarder) -> None:
        self.registry = registry
        self.settings = settings
        self.server = server
        self.authorizer = authorizer
        self.forwarder = forwarder
        self._handshakes = 0  # accepts in flight, counted against max_connections
        self.waiting = 0  # connections whose request head has not arrived (counted under serve()), likewise
        self._builtins: dict[str, Callable[[_Connection, Event, str], Awaitable[None] | None]] = {
            name: getattr(self, f"_{name}") for name in BUILTIN_EVENTS}
        self._throttle = _Throttle()  # what a client can make the gateway log about a handler's reply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        accepted = await self._accept(scope, receive, send)
        if accepted is None:
            return
        connection, resuming = accepted
        try:
            if resuming is None or not await self._resume(connection, *resuming):
                # A token that found no session counts here; a session that could not be resumed, as it ended.
                # Either was let in before accept, unless it came for a session and could not have it.
                await self._start(connection, resuming is not None and resuming[0] is None,
                                  let_in=resuming is None or resuming[0] is None)
            if await self._read(connection, receive):
                return
            await connection.closed()
            # Some servers (hypercorn) stop reading the socket while the app reads nothing: the peer's
            # close reply would never be read, nor the connection end.  Take, and drop, what it still sends.
            with anyio.move_on_after(self.settings.close_timeout):
                while (await receive())["type"] != "websocket.disconnect":
                    pass
        finally:
            cut_short = connection.state is _State.RESUMING  # cancelled while its session was handed to it
            if cut_short:
                connection.end("abnormal")  # which takes it out of the registry
            connection.abandon()
            self.registry._remove(connection)  # it may have left already, when it started closing
            self.registry._connecting.pop(connection.id, None)  # cut short before it was greeted
            connection.close_reason = connection.close_reason or "abnormal"
            self.registry._metrics.disconnects[connection.close_reason] += 1
            # Its session goes on (AWAY, MOVED: ended() is called when it ends), or ended already (ENDED), or
            # was never its own here (RESUMING), or never began (refused).
            if connection.state not in _SESSION_GOES_ON and not cut_short and connection.close_reason != "refused":
                self.ended(connection)
                await self.registry._hooks.finished(connection.id)

    def ended(self, connection: _Connection) -> None:
        """A client's session ended: with recovery on, maybe long after its last connection did."""
        self.forwarder.disconnected(connection)
        self.registry._hooks.ended(connection.id, connection.identity.user, connection.close_reason)
        logger.debug("client %s disconnected (%s)", connection.id, connection.close_reason)

    async def _start(self, connection: _Connection, no_session_found: bool, *, let_in: bool) -> None:
        """Open a new session: register the connection, greet it, join the rooms it was granted, then those
        on_connect joined it to.  A session not ``let_in`` before accept (a resume that could not have its
        session) asks on_connect now, and is closed if refused: 1008 (1013 if on_connect failed)."""
        if no_session_found:
            self.registry._sessions.outcomes["not_recovered"] += 1
        if not let_in:
            self._handshakes += 1  # counted against max_connections, as a handshake at the hook is
            try:
                await self.registry._let_in(connection.id, connection.identity)
            except _Refused as refusal:
                code = CLOSE_POLICY_VIOLATION if refusal.status == 403 else CLOSE_TRY_AGAIN_LATER
                connection.close(code, _clipped_bytes(refusal.message, MAX_CLOSE_REASON), label="refused")
                return
            except BaseException:  # cancelled while on_connect ran: no session began
                connection.close_reason = "refused"
                raise
            finally:
                self._handshakes -= 1
        self.forwarder.connected(connection)
        self.registry._add(connection)
        await self.registry._backend.register(connection)  # findable before anyone can learn the id
        identity = connection.identity
        rooms = self.registry._connecting.pop(connection.id, {})  # join() joins it at once from now on
        granted = [room for room in identity.rooms if room in rooms]
        self._greet(connection, granted if identity.authenticated else None, recovered=False)
        for room in granted:
            if await self.registry._join(connection, room):
                self.registry._announce(room, "joined", connection)
        for room in rooms:
            if room not in identity.rooms and connection.open:
                # Within max_rooms_per_connection, as join() checked, unless joins made since took the room.
                with contextlib.suppress(ValueError):
                    await self.registry._enter(connection, room)
        logger.debug("client %s connected", connection.id)

    async def _resume(self, connection: _Connection, claimed: _Connection | _Parked | None,
                      offset: int | None) -> bool:
        """Go on with the claimed session, if its frames are all kept: greet the connection as its
        client, then replay what the client missed, before any new frame; else False."""
        missed = None if claimed is None else await self.registry._resume(connection, claimed, offset)
        if missed is None:
            if claimed is not None:
                connection.renew(self.registry._sessions.new())  # a new session, then: not the one it came for
            return False
        assert connection.session is not None
        # Its rooms are those of its session, as far as its credentials now allow, and those they grant.
        identity = connection.identity
        revoked = sorted(room for room in connection.rooms if not identity.may_join(room))
        granted = [room for room in identity.rooms if room not in connection.rooms]
        self._greet(connection, sorted({*connection.rooms, *granted} - {*revoked}), recovered=True,
                    offset=connection.session.sent - len(missed), missed=len(missed))
        for text in missed:
            connection.send(text, keep=False)
        logger.debug("client %s resumed, %d frames replayed", connection.id, len(missed))
        for room in revoked:
            await self.registry._leave(connection, room)
            self.registry._announce(room, "left", connection)
        for room in granted:
            if await self.registry._join(connection, room):
                self.registry._announce(room, "joined", connection)
        return True

    def _greet(self, connection: _Connection, rooms: list[str] | None, **recovery: Any) -> None:
        """Send the connect frame: with authentication, the user (and ``rooms``); with recovery on, the
        session's next resume token and ``recovery``'s fields."""
        greeting: dict[str, Any] = {"message": "connection request granted"}
        if connection.identity.authenticated:
            greeting["user"] = connection.identity.user
        if rooms is not None:
            greeting["rooms"] = rooms
        if connection.session is not None:
            greeting.update(resume_token=connection.session.issue_token(connection.id), **recovery)
        connection.send(_Frame("connect", greeting).to(connection.id), keep=False)

    async def _accept(self, scope: Scope, receive: Receive, send: Send
                      ) -> tuple[_Connection, tuple[_Connection | _Parked | None, int | None] | None] | None:
        """Check and accept the handshake; the new connection, and if it came to resume a session, the
        session it claimed (None if there is none) and the client's offset; or None if it was refused
        or abandoned."""
        websocket = WebSocket(scope, receive, send)
        claimed: _Connection | _Parked | None = None
        client_id = str(uuid.uuid4())  # the connect hook is asked about a new id, even for a resume
        try:
            resume = _resume_request(websocket) if self.settings.recovery_window else None
            async with self.admitting(websocket, client_id) as identity:
                if resume is not None:
                    claimed = await self.registry._claim(resume[0], identity)
                    if claimed is not None:
                        client_id = claimed.id if isinstance(claimed, _Connection) else claimed.client_id
                if claimed is None:  # a new session: on_connect may refuse it, with a status
                    await self.registry._let_in(client_id, identity)
                try:
                    await websocket.accept()
                except BaseException:
                    if claimed is None:
                        self.registry._abandoned(client_id, identity)
                    raise
        except _Refused as refusal:
            self.registry._metrics.rejected_handshakes[refusal.code] += 1
            await _deny(websocket, refusal.status, refusal.code, refusal.message)
            return None
        except WebSocketDisconnect:
            if isinstance(claimed, _Connection) and claimed.session is not None:
                claimed.session.unclaim()
            return None
        client = websocket.client
        output = self.server.output(scope, receive, send, self.settings, self.registry._metrics)
        connection = _Connection(output, remote=f"{client.host}:{client.port}" if client else None,
                                 settings=self.settings, metrics=self.registry._metrics, on_close=self.registry._remove,
                                 client_id=client_id, identity=identity, session=self.registry._sessions.new())
        output.guard(connection, self.received)
        return connection, None if resume is None else (claimed, resume[1])

    @contextlib.asynccontextmanager
    async def admitting(self, request: HTTPConnection, client_id: str) -> AsyncIterator[_Identity]:
        """Check a handshake (origin, room on the server, credentials), counting it against
        ``max_connections`` until the block ends; raise :class:`_Refused` if it may not connect."""
        origin = request.headers.get("origin")
        if origin is not None and not _origin_allowed(origin, request.headers.get("host", ""),
                                                      self.settings.allowed_origins):
            raise _Refused(403, "origin", f"origin {origin!r} is not allowed")
        if len(self.registry) + self._handshakes + self.waiting >= self.settings.max_connections:
            raise _Refused(503, "full", f"server is full ({self.settings.max_connections} connections)")
        self._handshakes += 1
        try:
            yield await self.authorizer.authorize(request, client_id)
        finally:
            self._handshakes -= 1

    async def _read(self, connection: _Connection, receive: Receive) -> bool:
        """Handle frames until the connection starts closing (False) or the peer leaves (True)."""
        while connection.open:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                code = message.get("code", 1006)
                # 1009: the server's engine closed it for a frame over the limit, which ends a session too.
                connection.gone(_PEER_REASONS.get(code, "peer_error"),
                                final=code in (CLOSE_NORMAL, CLOSE_MESSAGE_TOO_BIG))
                return True
            if not connection.open:  # it started closing while we waited (kicked, cut off): handle no more
                return False
            text = message.get("text")
            if text is None:
                connection.close(CLOSE_UNSUPPORTED_DATA, "binary frames are not supported",
                                 label="binary_frame")
                return False
            rest = self.received(connection, text)
            if rest is not None:
                await rest
        return False

    def received(self, connection: _Connection, text: str) -> Awaitable[None] | None:
        """Handle a text frame from ``connection``: at once, as far as it can be without waiting (what most
        frames need: an answer, a relay); None if that was all, else an awaitable of the rest (a handler, the
        backend, Redis), which the caller awaits before it hands over the connection's next frame.  The
        read loop above calls it, and under uvicorn, ws_micro_servers.py's engine as it parses the frame."""
        self.registry._metrics.messages_received += 1
        try:
            rest = self._handle(connection, text)
        except Exception:
            self._broke(connection)
            return None
        return None if rest is None else self._finish(connection, rest)

    async def _finish(self, connection: _Connection, rest: Awaitable[None]) -> None:
        try:
            await rest
        except Exception:
            self._broke(connection)

    def _broke(self, connection: _Connection) -> None:
        logger.exception("error handling a frame from client %s", connection.id)
        connection.close(CLOSE_INTERNAL_ERROR, "internal error", label="internal_error")

    def _handle(self, connection: _Connection, text: str) -> Awaitable[None] | None:
        settings = self.settings
        limit = settings.max_message_size
        if len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit):
            connection.close(CLOSE_MESSAGE_TOO_BIG, f"message larger than {limit} bytes",
                             label="message_too_big", flush=False)
            return None
        tokens = connection.take_token()
        if tokens < 0:
            if tokens < -settings.rate_burst:
                connection.close(CLOSE_POLICY_VIOLATION, "rate limit exceeded", label="rate_limited",
                                 flush=False)
            else:  # read only for its id, so that the error answers the request it refused
                self._error(connection, RATE_LIMITED, f"more than {settings.rate_limit:g} messages per second",
                            None, _answerable(text)[1])
            return None
        try:
            event = _decode_event(text)
        except (msgspec.MsgspecError, RecursionError):  # read again, for the error that says what is wrong
            self._refuse_unreadable(connection, text)
            return None
        if event.id is not None and (problem := _bad_request_id(event.id)) is not None:
            self._error(connection, INVALID_EVENT, problem, event.event)
        elif event.client_id != connection.id:
            self._error(connection, CLIENT_ID_MISMATCH,
                        f"client_id must be this connection's id, but got {event.client_id!r}", event.event, event.id)
        elif event.event in SERVER_EVENTS:
            self._error(connection, INVALID_EVENT, f"{event.event!r} is sent by the server only", event.event,
                        event.id)
        elif event.to is not None or event.room is not None:  # relayed, unchanged, if the connection may
            failed = self._error_for  # failed(connection, event, code, message)
            if event.to is not None and event.room is not None:
                failed(connection, event, INVALID_EVENT, "set 'to' or 'room', not both")
            elif event.to is not None:
                if not connection.identity.relay:
                    failed(connection, event, FORBIDDEN, "this connection may not send to other clients")
                else:
                    return self.registry._relay_to_client(event.to, text, failed, connection, event)
            else:
                room = event.room
                assert room is not None
                if not connection.identity.may_publish(room):
                    failed(connection, event, FORBIDDEN, f"this connection may not send to room {room!r}", room=room)
                elif room not in connection.rooms:
                    failed(connection, event, NOT_IN_ROOM, f"join room {room!r} before sending to it")
                else:
                    return self.registry._relay_to_room(room, connection.id, text, failed, connection, event)
        elif event.event in self._builtins:
            return self._builtins[event.event](connection, event, text)
        else:
            return self._call_handler(connection, event, self._failed(connection, event))
        return None

    def _refuse_unreadable(self, connection: _Connection, text: str) -> None:
        """Answer a frame that is not JSON, or not an event, with the error that says why."""
        try:
            _decode(_decode_event, text)
        except msgspec.ValidationError as exc:
            name, request_id, problem = _answerable(text)
            self._error(connection, INVALID_EVENT, problem or _id_problem(exc) or str(exc), name, request_id)
        except msgspec.DecodeError as exc:
            self._error(connection, INVALID_JSON, str(exc), None)

    def _failed(self, connection: _Connection, event: Event) -> Callable[..., None]:
        """``failed(code, message, **details)``: tell ``connection`` its ``event`` was refused, maybe later.
        Made only for a handler or the backend: a closure in :meth:`_handle` cost every frame, and a partial
        a relayed frame 12% (relays pass ``_error_for`` and what it needs instead)."""
        return functools.partial(self._error_for, connection, event)

    def _error_for(self, connection: _Connection, event: Event, code: str, message: str, **details: Any) -> None:
        """Tell ``connection`` its ``event`` was refused, with ``details`` in the error's data."""
        self._error(connection, code, message, event.event, event.id, **details)

    # The built-in events, one method each (see BUILTIN_EVENTS), returning what is left to await, as _handle.

    def _ping(self, connection: _Connection, event: Event, text: str) -> None:
        connection.send(_Frame("pong", event.data.data).reply(connection.id, event.id))

    def _echo(self, connection: _Connection, event: Event, text: str) -> None:
        connection.send(text)

    async def _join(self, connection: _Connection, event: Event, text: str) -> None:
        room = self._room_of(connection, event)
        if room is None:
            return
        if not connection.identity.may_join(room):
            self._error(connection, FORBIDDEN, f"this connection may not join room {room!r}", event.event, event.id,
                        room=room)
            return
        limit = self.settings.max_rooms_per_connection
        if room not in connection.rooms and len(connection.rooms) >= limit:  # the client's answer, not _enter's error
            self._error(connection, INVALID_EVENT, f"at most {limit} rooms per connection", event.event, event.id)
            return
        await self.registry._enter(connection, room, event.id)

    async def _leave(self, connection: _Connection, event: Event, text: str) -> None:
        room = self._room_of(connection, event)
        if room is None:
            return
        if room not in connection.rooms:
            self._error(connection, NOT_IN_ROOM, f"not a member of room {room!r}", event.event, event.id)
            return
        await self.registry._exit(connection, room, event.id)

    async def _call_handler(self, connection: _Connection, event: Event, failed: Callable[..., None]) -> None:
        name = event.event
        handler = self.registry._handlers.get(name)
        if handler is None:
            if not self.forwarder.takes(name):
                failed(UNKNOWN_EVENT, f"no handler for event {name!r}")
                return
            # Awaited: the connection's next frame is read once the backend has answered this one, so its
            # events arrive in order, and a client that keeps sending to a slow backend waits.
            await self.forwarder.forward(connection, event, failed)
            return
        try:
            reply = await handler(connection.id, event)
        except Exception:
            logger.exception("handler for event %r failed (client %s)", name, connection.id)
            failed(INTERNAL_ERROR, f"the handler for {name!r} failed")
            return
        if reply is None:
            return
        try:
            frame = self._handler_reply(name, reply)
        except (TypeError, ValueError, msgspec.MsgspecError) as exc:  # the handler's bug: it is told, not the client
            self._throttle.warn(f"reply:{name}", f"handler for event {name!r} (client {connection.id}): {exc}",
                                logging.ERROR)
            failed(INTERNAL_ERROR, f"the handler for {name!r} failed")
            return
        connection.send(frame.reply(connection.id, event.id))

    def _handler_reply(self, name: str, reply: object) -> _Frame:
        """The frame a handler's return value makes (see _HandlerReply); TypeError or ValueError, naming what
        it returned, for anything else."""
        if isinstance(reply, tuple) and len(reply) == 2 and isinstance(reply[0], str):
            name, reply = reply
        if not isinstance(reply, Mapping):
            shown = repr(reply) if len(repr(reply)) <= 100 else f"{repr(reply)[:100]}..."
            raise TypeError(f"it returned {shown}, of type {type(reply).__name__}; a handler returns None, a "
                            "mapping (the reply's data.data), or (event name, mapping)")
        if name in SERVER_EVENTS:
            self.registry._metrics.server_events_refused["python"] += 1
            raise ValueError(f"it replied {name!r}, an event only the gateway sends; reply with another name")
        try:
            return _Frame(name, reply)
        except TypeError as exc:
            raise TypeError(f"its reply cannot be JSON: {exc}") from None

    def _room_of(self, connection: _Connection, event: Event) -> str | None:
        try:
            room = msgspec.convert(event.data.data, _RoomRequest).room
        except msgspec.ValidationError as exc:
            self._error(connection, INVALID_EVENT, f"{exc} (in data.data)", event.event, event.id)
            return None
        problem = _bad_room_name(room, self.settings)
        if problem is not None:
            self._error(connection, INVALID_EVENT, problem, event.event, event.id)
            return None
        return room

    def _error(self, connection: _Connection, code: str, message: str, event: str | None,
               request_id: str | int | None = None, **extra: Any) -> None:
        """Tell ``connection`` its frame (named ``event``, with the id ``request_id``) was refused."""
        self.registry._metrics.errors[code] += 1
        connection.send(_Frame("error", {"code": code, "message": message, "event": event, **extra})
                        .reply(connection.id, request_id))


def _origin_allowed(origin: str, host: str, allowed: tuple[str, ...]) -> bool:
    if "*" in allowed or origin in allowed:
        return True
    # Same-origin pages may always connect (the browser page served beside us).
    return urlsplit(origin).netloc.lower() == host.lower() != ""


# A peer's close code, as a disconnects_total label; any other code is a "peer_error".
_PEER_REASONS = {1000: "closed", 1001: "closed", 1012: "shutdown",
                 1005: "abnormal", 1006: "abnormal",  # the connection dropped (uvicorn reports 1005 for that too)
                 1009: "message_too_big"}  # the engine's frame-size limit closed it


class _Answerable(msgspec.Struct):
    """What an answer needs of a frame refused before its envelope could be read: its name and its id."""

    event: Any = None
    id: Any = None


_decode_answerable = msgspec.json.Decoder(_Answerable).decode


def _answerable(text: str) -> tuple[str | None, str | int | None, str | None]:
    """The ``event`` of a frame refused before its envelope was read (one that failed validation, or went
    over the rate limit), if it has a string one; its ``id``, if it has a good one; and what is wrong with its
    id, if anything."""
    try:
        frame = _decode(_decode_answerable, text)
    except msgspec.MsgspecError:  # not JSON, not an object, or a number too large to read
        return None, None, None
    problem = _bad_request_id(frame.id)
    return (frame.event if isinstance(frame.event, str) else None,
            frame.id if problem is None else None, problem)


def _id_problem(exc: msgspec.ValidationError) -> str | None:
    """What msgspec says of an id it could not even read (an integer of thousands of digits), with the rule."""
    return f"{_REQUEST_ID_RULE}, but got: {exc}" if str(exc).endswith("`$.id`") else None


async def _deny(websocket: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse a handshake with a real HTTP status, before accept."""
    try:
        await websocket.send_denial_response(_refusal_response(status, code, message))
    except RuntimeError:  # the server lacks the denial-response extension (daphne): it answers 403, with the reason
        await websocket.close(CLOSE_POLICY_VIOLATION, _clipped_bytes(f"{code}: {message}", MAX_CLOSE_REASON))


# --------------------------------------------------------------------------
# Sidecar HTTP API
# --------------------------------------------------------------------------


MAX_QUERY_PARAMETERS = 16  # a listing takes two; parsing thousands would hold the event loop for milliseconds
CLIENT_ID_LENGTH = 36  # str(uuid4()): the longest key a cursor names is this, or a room's name
_CURSOR = re.compile(r"[A-Za-z0-9_-]+")  # base64url, unpadded


class _ApiError(Exception):
    """A request the API refuses before doing anything: its status, error code and why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _json(content: Any, status: int = 200) -> Response:
    return Response(_encode(content), status_code=status, media_type="application/json")


def _path_name(request: Request, param: str) -> str:
    """The name (a client id, a user, a room) that the path's last segment holds, percent-decoded as UTF-8:
    a ``/`` in a name is sent as ``%2F``.  Raises :class:`_ApiError`.

    Servers decode ``%2F`` before routing, so the route takes the rest of the path, and the raw path says
    whether it was one segment: ``/api/rooms/a%2Fb`` is room ``a/b``, ``/api/rooms/a/b`` is no route.
    """
    decoded: str = request.path_params[param]
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes):
        name = unquote_to_bytes(raw.partition(b"?")[0].rpartition(b"/")[2])
        if name.count(b"/") != decoded.count("/"):
            raise _ApiError(404, "not_found", f"no route for this path: a {param} is one segment of it, with any "
                                              "'/' in it sent as %2F")
    else:  # optional in ASGI: without it, a '/' however sent is part of the name
        name = decoded.encode("utf-8", "surrogatepass")
    if not name:
        raise _ApiError(404, "not_found", f"no route for this path: it names no {param}")
    try:
        return name.decode()
    except UnicodeDecodeError as exc:
        raise _ApiError(400, INVALID_PARAMETER, f"the {param} in the path is not UTF-8 once percent-decoded: "
                                                f"{name[exc.start:exc.end]!r} at byte {exc.start}") from None


def _room_in_path(request: Request, settings: Settings) -> str:
    room = _path_name(request, "room")
    problem = _bad_room_name(room, settings)
    if problem is not None:
        raise _ApiError(400, INVALID_PARAMETER, problem)
    return room


def _user_in_path(request: Request) -> str:
    user = _path_name(request, "user")
    if len(user) > MAX_USER_LENGTH:
        raise _ApiError(400, INVALID_PARAMETER, f"users have 1 to {MAX_USER_LENGTH} characters, but got {len(user)}")
    return user


def _query(request: Request, *names: str) -> dict[str, str]:
    """The query parameters ``names`` a request gives (others are ignored), each at most once, within
    MAX_QUERY_PARAMETERS parameters in all.  Raises :class:`_ApiError`."""
    try:
        fields = parse_qsl(request.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True,
                           errors="strict", max_num_fields=MAX_QUERY_PARAMETERS)
    except UnicodeDecodeError as exc:
        raise _ApiError(400, INVALID_PARAMETER, f"the query string is not UTF-8 once percent-decoded: {exc}") from None
    except ValueError:  # counted before any is parsed
        raise _ApiError(400, INVALID_PARAMETER, f"at most {MAX_QUERY_PARAMETERS} query parameters, but got "
                                                f"{request.scope['query_string'].count(b'&') + 1}") from None
    given: dict[str, str] = {}
    for name, value in fields:
        if name in names:
            if name in given:
                raise _ApiError(400, INVALID_PARAMETER, f"{name} is given twice")
            given[name] = value
    return given


def _paging(request: Request, settings: Settings) -> _Paging:
    """The page a listing request asks for, by its ``limit`` and ``cursor`` query parameters.  Raises
    :class:`_ApiError`."""
    given = _query(request, "limit", "cursor")
    limit, largest = settings.api_page_size, settings.api_max_page_size
    text = given.get("limit")
    if text is not None:
        if not (text.isascii() and text.isdigit() and len(text) < 10 and int(text) <= largest):
            raise _ApiError(400, INVALID_PARAMETER, f"limit must be a whole number from 0 to {largest}, but got "
                                                    f"{_clipped(text, 40)}")
        limit = int(text)
    cursor = given.get("cursor", "")
    return _Paging(_after(cursor, max(settings.max_room_name_length, CLIENT_ID_LENGTH)) if cursor else "", limit,
                   settings.api_max_page_bytes)


def _cursor(key: str) -> str:
    """A page's ``next``: the key of its last entry, base64url-encoded; clients pass it back as it is."""
    return base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()


def _after(cursor: str, longest: int) -> str:
    """The key a cursor that a page gave (:func:`_cursor`) names, if it is a key of at most ``longest``
    characters; else :class:`_ApiError`.  Any such key is a place in the order, and safe to start after."""
    key = None
    if len(cursor) <= 6 * longest and _CURSOR.fullmatch(cursor):
        with contextlib.suppress(ValueError):  # bad padding, not UTF-8
            key = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    if key is None or not 0 < len(key) <= longest:
        raise _ApiError(400, INVALID_PARAMETER, f"cursor must be a page's next, as it was given, but got "
                                                f"{_clipped(cursor, 40)}")
    return key


def _listing(page: _Page, name: str, **head: Any) -> Response:
    """A page of a listing as the API answers it: ``head``, ``count``, the entries as ``name``, and ``next``
    unless it is the last page."""
    content = {**head, "count": page.count, name: page.entries}
    if page.last is not None:
        content["next"] = _cursor(page.last)
    return _json(content)


def _api_error(status: int, code: str, message: str) -> Response:
    return _json({"error": {"code": code, "message": message}}, status)


def _refusal_response(status: int, code: str, message: str) -> Response:
    """A refused handshake's (or API call's) answer; a 401 says which credentials to send."""
    response = _api_error(status, code, message)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _bearer(request: HTTPConnection) -> str | None:
    """What follows ``Authorization: Bearer``, as sent; None without such a header."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" else None


async def _backend_unavailable(request: Request, exc: Exception) -> Response:
    return _api_error(503, BACKEND_UNAVAILABLE, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    response = _api_error(exc.status_code, code, exc.detail)
    response.headers.update(exc.headers or {})  # 405's Allow
    return response


def _api_routes(registry: Registry, settings: Settings) -> list[Route]:
    """The routes a backend uses to reach clients (compare API Gateway's @connections)."""

    def guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def check(request: Request) -> Response:
            refusal = _cross_site(request, settings.allowed_origins)
            if refusal is not None:
                return _api_error(403, FORBIDDEN, refusal)
            if settings.api_token is not None:
                token = _bearer(request)
                if token is None or not hmac.compare_digest(token.encode(), settings.api_token.encode()):
                    return _refusal_response(401, "unauthorized", "send 'Authorization: Bearer <token>'")
            else:
                refusal = _not_local(request)
                if refusal is not None:
                    return _api_error(403, FORBIDDEN, f"without WS_MICRO_API_TOKEN {refusal}")
            try:
                return await endpoint(request)
            except _ApiError as error:
                return _api_error(error.status, error.code, error.message)

        return check

    async def read_push(request: Request) -> _Push | Response:
        # Only JSON: a page may POST text/plain or a form to any site without asking (no CORS
        # preflight), but not application/json.
        content_type = request.headers.get("content-type")
        if (content_type or "").partition(";")[0].strip().lower() != "application/json":
            return _api_error(415, UNSUPPORTED_MEDIA_TYPE,
                              f"send a push with Content-Type: application/json, not {content_type!r}")
        body = b""
        with anyio.move_on_after(settings.api_body_timeout) as deadline:  # a trickle would hold a task for ever
            async for chunk in request.stream():
                body += chunk
                if len(body) > settings.max_message_size:
                    return _api_error(413, "too_large", f"body larger than {settings.max_message_size} bytes")
        if deadline.cancelled_caught:
            return _api_error(408, "timeout", f"the body did not arrive within {settings.api_body_timeout:g} seconds")
        try:
            text = body.decode()
        except UnicodeDecodeError as exc:
            return _api_error(400, INVALID_JSON, f"the body is not UTF-8: {body[exc.start:exc.end]!r} "
                                                 f"at byte {exc.start} ({exc.reason})")
        try:
            push = _decode(_decode_push, text)
        except msgspec.ValidationError as exc:
            return _api_error(422, INVALID_EVENT, str(exc))
        except msgspec.DecodeError as exc:
            return _api_error(400, INVALID_JSON, str(exc))
        if push.event in SERVER_EVENTS:  # a client must never get one that the gateway did not make
            registry._metrics.server_events_refused["api"] += 1
            return _api_error(422, INVALID_EVENT, f"{_clipped(push.event)} is an event only the gateway sends; push "
                                                  "another name")
        return push

    async def list_clients(request: Request) -> Response:
        page = await registry._backend.clients(registry._connections, _paging(request, settings))
        return _listing(page, "clients")

    async def get_client(request: Request) -> Response:
        client_id = _path_name(request, "client_id")
        connection = registry._connections.get(client_id)
        entry = registry._backend.entry(connection) if connection else await registry._backend.client(client_id)
        return _unknown_client(client_id) if entry is None else _json(entry)

    def pushing(deliver: Callable[[Request, _Push], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            push = await read_push(request)
            return push if isinstance(push, Response) else await deliver(request, push)

        return endpoint

    async def push_to_client(request: Request, push: _Push) -> Response:
        client_id = _path_name(request, "client_id")
        if not await registry.send_to_client(client_id, push.event, push.data.data):
            return _unknown_client(client_id)
        return _json({"delivered": 1}, 202)

    async def disconnect_client(request: Request) -> Response:
        client_id = _path_name(request, "client_id")
        if not await registry.disconnect(client_id, CLOSE_NORMAL, "disconnected by the server"):
            return _unknown_client(client_id)
        return _json({"disconnected": 1}, 202)

    async def publish_to_room(request: Request, push: _Push) -> Response:
        delivered = await registry.publish(_room_in_path(request, settings), push.event, push.data.data)
        return _json({"delivered": delivered}, 202)

    async def broadcast(request: Request, push: _Push) -> Response:
        return _json({"delivered": await registry.broadcast(push.event, push.data.data)}, 202)

    async def list_rooms(request: Request) -> Response:
        return _listing(await registry._backend.rooms(registry._rooms, _paging(request, settings)), "rooms")

    async def get_room(request: Request) -> Response:
        room = _room_in_path(request, settings)
        page = await registry._backend.members("room", room, registry._connections, registry._rooms.get(room, set()),
                                               _paging(request, settings))
        return _listing(page, "members", room=room)

    async def get_user(request: Request) -> Response:
        user = _user_in_path(request)
        page = await registry._backend.members("user", user, registry._connections, registry._users.get(user, set()),
                                               _paging(request, settings))
        return _listing(page, "clients", user=user)

    async def push_to_user(request: Request, push: _Push) -> Response:
        return _json({"delivered": await registry.send_to_user(_user_in_path(request), push.event,
                                                               push.data.data)}, 202)

    async def disconnect_user(request: Request) -> Response:
        user, answer = _user_in_path(request), dict[str, Any]()
        given = _query(request, "revoke", "disconnect")
        revoke, disconnect = _flag(given, "revoke", False), _flag(given, "disconnect", True)
        if revoke:  # first: a client closed by the disconnect may come straight back with its token
            try:
                answer["revoked_before"] = _iso(await registry.revoke_user(user))
            except ValueError as exc:
                return _api_error(503, "too_many_revocations", str(exc))
        if disconnect:
            answer["disconnected"] = await registry.disconnect_user(user, CLOSE_NORMAL, "disconnected by the server")
        return _json(answer, 202)

    # A name in the path takes the rest of it (":path"), for a "/" in it sent as %2F: see _path_name.
    return [
        Route("/api/clients", guarded(list_clients), methods=["GET"]),
        Route("/api/clients/{client_id:path}", guarded(get_client), methods=["GET"]),
        Route("/api/clients/{client_id:path}", guarded(pushing(push_to_client)), methods=["POST"]),
        Route("/api/clients/{client_id:path}", guarded(disconnect_client), methods=["DELETE"]),
        Route("/api/users/{user:path}", guarded(get_user), methods=["GET"]),
        Route("/api/users/{user:path}", guarded(pushing(push_to_user)), methods=["POST"]),
        Route("/api/users/{user:path}", guarded(disconnect_user), methods=["DELETE"]),
        Route("/api/rooms", guarded(list_rooms), methods=["GET"]),
        Route("/api/rooms/{room:path}", guarded(get_room), methods=["GET"]),
        Route("/api/rooms/{room:path}", guarded(pushing(publish_to_room)), methods=["POST"]),
        Route("/api/broadcast", guarded(pushing(broadcast)), methods=["POST"]),
    ]


def _flag(given: Mapping[str, str], name: str, default: bool) -> bool:
    """A true-or-false query parameter, of those :func:`_query` read; :class:`_ApiError` naming it if it is
    neither."""
    text = given.get(name)
    if text is None:
        return default
    try:
        return bool(_convert(bool, text))
    except ValueError as exc:
        raise _ApiError(400, INVALID_PARAMETER, f"the query parameter {name} {exc}") from None


def _unknown_client(client_id: str) -> Response:
    return _api_error(404, UNKNOWN_CLIENT, f"no client with id {_clipped(client_id)}")


def _cross_site(request: Request, allowed_origins: tuple[str, ...]) -> str | None:
    """Why a request comes from another site's page, which must not drive the API; None if it does not.

    Browsers send ``Origin`` (on every POST and DELETE) and ``Sec-Fetch-Site``; programs send neither.
    """
    origin = request.headers.get("origin")
    if origin is not None:
        if not _origin_allowed(origin, request.headers.get("host", ""), allowed_origins):
            return f"origin {origin!r} is not allowed"
        if origin in allowed_origins or "*" in allowed_origins:
            return None  # listed: a browser calls it cross-site or same-site, and that is the point
    site = request.headers.get("sec-fetch-site")
    if site in ("cross-site", "same-site"):  # same-site: another port or subdomain, e.g. any dev server
        return f"requests from other sites' pages are refused (Sec-Fetch-Site: {site})"
    return None


_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def _not_local(request: Request) -> str | None:
    """Why a request without a token is refused; None if it comes from this machine.

    Not by the peer's address alone: behind a proxy it is the proxy's, and a
    DNS-rebinding page reaches us from loopback under its own host name.
    """
    for header in _PROXY_HEADERS:
        if header in request.headers:
            return f"the API refuses proxied requests (this one has {header!r}); behind a proxy, set a token"
    hosts = request.headers.getlist("host")
    if len(hosts) > 1:  # which one names us?  HTTP/1.1 allows one (RFC 9112, 3.2), and servers may not refuse more
        return f"the API answers requests with one Host header, not {len(hosts)}"
    host = hosts[0] if hosts else ""
    if not _is_loopback_host(host):
        return f"the API answers requests for a loopback name only, not Host {_clipped(host)}"
    if not _is_loopback(request):
        return "the API answers loopback clients only"
    return None


def _is_loopback_host(host: str) -> bool:
    """Whether a Host header names this machine: localhost, *.localhost, 127.x.x.x or [::1], with any port."""
    host = host.lower()
    if host.startswith("["):  # [::1] or [::1]:8000
        name, bracket, port = host[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return False
        port = port[1:]
    else:
        name, _, port = host.partition(":")
    if port and not (port.isascii() and port.isdigit()):
        return False
    if name == "localhost" or name.endswith(".localhost"):  # browsers resolve these to loopback themselves
        return True
    try:
        return ipaddress.ip_address(name).is_loopback and (":" in name) == host.startswith("[")
    except ValueError:
        return False


def _is_loopback(request: Request) -> bool:
    try:
        return request.client is not None and ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------
# Application
# --------------------------------------------------------------------------

DESCRIPTOR_RESERVE = 64  # file descriptors kept for the server's own use: listeners, Redis, logs, static files


def _raise_descriptor_limit() -> int:
    """Raise this process's open-file limit to its hard limit; how many descriptors clients may hold."""
    try:
        import resource
    except ImportError:  # not a Unix
        return sys.maxsize
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    return max(soft - DESCRIPTOR_RESERVE, 1)


# A line that may carry a secret mentions one of these.  Lines that do not (nearly all) pass untouched.
_MENTIONS_SECRET = re.compile(r"(?i)token|bearer|authorization|cookie")
# Each secret, after what says it is one (kept): a token in a URL's query (browsers cannot set headers on a
# WebSocket), up to the next parameter; a bearer token; the value of a header that carries one (a session, for
# cookies), as "name: value" or as a repr's ('name', 'value'); a resume token in a frame's JSON.
_SECRET = re.compile(r"""(?ix)
    ( (?<![\w-]) (?:resume_)?token= ) [^&\s"'\#]*
  | ( \bbearer\s+ ) [^\s"',]+
  | ( (?:authorization|cookie|x-ws-micro-resume-token) ["']? \s* [:,=] \s* (?:b?["'])? ) [^"'\r\n]*
  | ( "resume_token" \s* : \s* " ) [^"]*
""")
_PLAIN = (str, int, float, type(None))  # arguments that print as themselves: a secret in one is in its text


def _redacted(text: str) -> str:
    return _SECRET.sub(lambda found: next(kept for kept in found.groups() if kept is not None) + "[redacted]", text)


def _redacted_payload(arg: object) -> object:
    """A frame (websockets logs them at DEBUG) whose payload carries a resume token, as a frame with the token
    redacted: its log line shows only the payload's ends, which could be the token's end."""
    data = getattr(arg, "data", None)
    if not isinstance(data, bytes) or b"token" not in data or not dataclasses.is_dataclass(arg):
        return arg
    return str(dataclasses.replace(arg, data=_redacted(data.decode("utf-8", "replace")).encode()))  # type: ignore[type-var]


def _redact_record(record: logging.LogRecord) -> None:
    """Write ``[redacted]`` for the tokens and credentials in a log record, whatever logged it and however:
    logs are kept and read more widely than tokens may be."""
    if record.exc_info and not record.exc_text:  # a traceback's text, as a handler would write it
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    for name in ("exc_text", "stack_info"):
        value = getattr(record, name)
        if value and _MENTIONS_SECRET.search(value):
            setattr(record, name, _redacted(value))
    args = record.args
    if isinstance(record.msg, str) and isinstance(args, tuple) and all(isinstance(arg, _PLAIN) for arg in args):
        if not any(isinstance(part, str) and _MENTIONS_SECRET.search(part) for part in (record.msg, *args)):
            return  # nearly every line: checked without formatting it
        # Each argument on its own, so that formatters that read them (uvicorn's access log) still can.
        record.msg = _redacted(record.msg)
        record.args = tuple(_redacted(arg) if isinstance(arg, str) else arg for arg in args)
    elif isinstance(args, tuple):
        record.args = tuple(_redacted_payload(arg) for arg in args)
    try:
        text = record.getMessage()  # any argument (a dict, a scope, a frame, an event): format, then look
    except Exception:  # a broken format string: logging reports it when the record is written
        return
    if _MENTIONS_SECRET.search(text) and (clean := _redacted(text)) != text:
        record.msg, record.args = clean, None  # a header's name in one argument and its value in another


def _redact_tokens_in_logs() -> None:
    """Redact every log record of this process as it is made: the servers' loggers and websockets' are many
    (uvicorn.error, .access and .asgi, websockets.server, hypercorn's, granian's, daphne's and Twisted's through
    it), and a record factory sees them all, whatever their name, level or handlers."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacts_tokens", False):
        return

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            _redact_record(record)
        except Exception:  # never fail the caller's logging call, nor write what could not be checked
            record.msg = f"(a line ws_micro could not check for tokens: {type(record.msg).__name__} message)"
            record.args, record.exc_info, record.exc_text, record.stack_info = None, None, None, None
        return record

    make_record.redacts_tokens = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_record)


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log running out of descriptors as one line per 10 s, not asyncio's traceback per refused accept."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiets_accept_errors", False):
        return
    throttle = _Throttle()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        # asyncio retries each refused accept later; once the listener has closed, the retry fails with a
        # ValueError, reported as "Exception in callback ..._start_serving(...)".  Only the message tells it
        # apart (should it change, those lines are logged as asyncio logs them).
        if isinstance(error, ValueError) and "._start_serving(" in context.get("message", ""):
            return
        if not isinstance(error, OSError) or error.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                                                   errno.ENOMEM):
            (previous or type(loop).default_exception_handler)(loop, context)
            return
        held = throttle("accept")
        if held is not None:
            logger.error("cannot accept connections: %s (%d refused since the last report); raise the open-file "
                         "limit (ulimit -n) or lower max_connections", error.strerror, held + 1)

    handle.quiets_accept_errors = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handle)


def _harden_process(settings: Settings, server: _ServerSupport) -> None:
    """What the app can do for the process it runs in: descriptors and a readable log under abuse."""
    budget = _raise_descriptor_limit()
    if settings.max_connections > budget:
        logger.warning("max_connections (%d) is more than this process's open-file limit leaves for clients (%d): "
                       "raise it with ulimit -n", settings.max_connections, budget)
    _quiet_accept_errors(asyncio.get_running_loop())
    server.harden()


# The sibling modules, each imported only when it is needed, and only from beside this file: a copied
# ws_micro.py does not pick up the modules of an installed ws-micro, and a copy vendored in a package
# (myapp/ws_micro.py) finds its siblings there.  Each checks, as it is imported, that the core it gets
# as ``ws_micro`` is this file, of its version, and refuses to load otherwise.


def _check_sibling(path: str, version: str) -> None:
    """For a sibling module as it is imported: ImportError unless this core is the one beside it, of its
    version."""
    name = Path(path).name
    if version != __version__:
        raise ImportError(f"{name} {version} cannot run beside ws_micro.py {__version__} ({__file__}): take both "
                          "files from the same release")
    if Path(__file__).resolve().parent != Path(path).resolve().parent:
        raise ImportError(f"{name} ({path}) runs only with the ws_micro.py beside it, not with {__file__}")


def _sibling(name: str) -> types.ModuleType | None:
    """The sibling module ``name``, imported from beside this file; None if there is no such file, and
    ImportError, saying why, if it cannot run with this core."""
    if not Path(__file__).with_name(f"{name}.py").is_file():
        return None
    core = sys.modules[__name__]
    if sys.modules.setdefault("ws_micro", core) is not core:  # what the sibling's ``import ws_micro`` gets
        raise ImportError(f"{name}.py needs the ws_micro.py beside it ({__file__}), but another module named "
                          f"ws_micro is imported already ({getattr(sys.modules['ws_micro'], '__file__', '?')})")
    package = __spec__.parent if __spec__ is not None else ""  # "myapp" when vendored as myapp/ws_micro.py
    return importlib.import_module(f"{package}.{name}" if package else name)


@functools.cache
def _server_support() -> _ServerSupport:
    """ws_micro_servers.py's support for the servers it knows, if it sits beside this module; else the core's
    own, which says at the first connection why frames go through ASGI."""
    try:
        servers = _sibling("ws_micro_servers")
    except ImportError as exc:
        return _ServerSupport(str(exc), logging.WARNING)
    if servers is None:
        return _ServerSupport("ws_micro_servers.py is not beside ws_micro.py (docs/configuration.md says what a "
                              "copy of the core alone keeps)")
    support: _ServerSupport = servers.ServerSupport()
    return support


def _redis_backend(registry: Registry, settings: Settings) -> _Backend:
    """Cluster mode's backend, from ws_micro_redis.py; ValueError, saying what to install, without it."""
    try:
        cluster = _sibling("ws_micro_redis")
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    if cluster is None:  # and say whether redis-py is missing too, so that installing it is not taken for the fix
        redis_py = "" if importlib.util.find_spec("redis") else " and redis-py: pip install 'redis[hiredis]'"
        raise ValueError("redis_url needs ws_micro_redis.py beside ws_micro.py (pip install . in a checkout installs "
                         f"both; with a copied ws_micro.py, copy ws_micro_redis.py beside it){redis_py}")
    backend: _Backend = cluster.RedisBackend(registry, settings)
    return backend


# What the gateway says, once, when a request reaches it before its lifespan ran; ws_micro_redis.py tells clients
# and /healthz the same, for the Redis connection the lifespan would have opened.
_NO_LIFESPAN = ("the gateway's lifespan did not run (a Mount does not run a mounted app's lifespan, and daphne runs "
                "none): run it from the host app's lifespan (docs/embedding.md, \"The gateway's lifespan\")")


def create_app(*, registry: Registry | None = None, debug: bool = False, **options: Any) -> Starlette:
    """Build the gateway as a Starlette app; ``options`` are the fields of :class:`Settings`.

    Pass your own ``registry`` to register handlers on it; ``app.state.registry`` is the one in use.
    """
    settings = Settings(**options)
    _redact_tokens_in_logs()  # now, before the server logs a first request
    registry = registry if registry is not None else Registry()
    # Each optional part behind its seam: authentication, forwarding, other instances, the server's internals.
    authorizer = _TokenAndHookAuthorizer(settings, registry._revocations) if settings.authenticating else _Authorizer()
    forwarding = settings.forward_url or settings.lifecycle_target
    forwarder = _HttpForwarder(settings, registry._metrics) if forwarding else _Forwarder()
    backend = _redis_backend(registry, settings) if settings.redis_url else _Backend()
    server = _server_support()
    gateway = _Gateway(registry, settings, server, authorizer, forwarder)
    registry._use(settings, backend, gateway.ended, server.together)

    async def healthz(request: Request) -> Response:
        status, details = registry._backend.health()
        return _json({"status": status, "connections": len(registry), **details})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(registry._metrics.render(len(registry), [
                                     *registry._sessions.metrics(), *authorizer.metrics(), *forwarder.metrics(),
                                     *registry._backend.metrics(), *registry._hooks.metrics()]),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def probe(request: Request) -> Response:
        """A plain GET of the WebSocket endpoint: what a handshake with these credentials would get.
        Browsers cannot read a refused handshake's status; the JS client asks here."""
        try:
            async with gateway.admitting(request, str(uuid.uuid4())) as identity:
                resume = _resume_request(request) if settings.recovery_window else None
                if resume is not None:
                    await registry._claim(resume[0], identity, spend=False)
                response = _api_error(426, "upgrade_required", "a WebSocket handshake would be accepted")
                response.headers["Upgrade"] = "websocket"
        except _Refused as refusal:
            response = _refusal_response(refusal.status, refusal.code, refusal.message)
        origin = request.headers.get("origin")
        if origin is not None and ("*" in settings.allowed_origins or origin in settings.allowed_origins):
            response.headers.update({"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true",
                                     "Vary": "Origin"})
        return response

    page_routes: list[BaseRoute] = []
    static = _static_folder(settings.static_dir)
    if static is not None:
        index = static / "index.html"

        async def page(request: Request) -> Response:
            return FileResponse(index)

        page_routes = [Route("/", page, methods=["GET"]), Mount("/static", StaticFiles(directory=static))]
    else:  # say why where the page would be, and once in the log
        why = ("static_dir is empty" if not settings.static_dir else
               f"no static folder with an index.html beside {Path(__file__).name} (static_dir 'auto')")
        off = f"the browser page is off: {why}; set static_dir to a folder with an index.html (docs/browser.md)"

        async def no_page(request: Request) -> Response:
            return _api_error(404, "not_found", off)

        page_routes = [Route("/", no_page, methods=["GET"])]

    def starting() -> None:
        """What the app does as it starts: for its process, and a word about what is off."""
        _harden_process(settings, server)
        if static is None and not settings.static_dir:
            logger.info("browser page off: static_dir is empty")
        elif static is None:  # a copied single file: the page's folder was not copied with it
            logger.info("browser page off: no static folder with an index.html beside %s, nor installed with it; "
                        "copy static/ beside it, or set static_dir to a folder with an index.html (docs/browser.md)",
                        Path(__file__).resolve())

    lifespan_ran = False

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal lifespan_ran
        lifespan_ran = True
        starting()
        # The registry's end first: the sessions that end then are told to the forwarder and on_disconnect, and
        # an on_disconnect may still send to other instances through the backend.
        async with registry._backend.running(), authorizer.running(), forwarder.running(), registry._running():
            yield

    def first_request() -> None:
        """Without the lifespan (a host app that does not run it, daphne): do now what it does that needs no
        shutdown, and say once, as a WARNING, what is lost without the rest."""
        if lifespan_ran:
            return
        starting()
        lost = []
        if settings.redis_url:
            lost.append("cluster mode has no Redis connection (clients on other instances cannot be reached, and "
                        "/healthz says degraded)")
        if settings.lifecycle_target is not None:
            lost.append("the disconnect notices still queued at shutdown will not be sent")
        if lost:
            logger.warning("%s; without it, %s", _NO_LIFESPAN, " and ".join(lost))

    async def no_endpoint(websocket: WebSocket) -> None:
        """A handshake to a path that is not the endpoint (a typo, a forgotten mount prefix): 404, naming the
        endpoint, where Starlette's router would close it, which servers answer with 403 and no body."""
        registry._metrics.rejected_handshakes["not_found"] += 1
        endpoint = websocket.scope.get("root_path", "") + settings.path  # mounted: the mount's prefix, then ours
        await _deny(websocket, 404, "not_found", f"no WebSocket endpoint at {_clipped(websocket.scope['path'])}; "
                                                 f"the gateway's is {endpoint!r}")

    app = _GatewayApp(
        gateway,
        first_request,
        debug=debug,
        routes=[
            WebSocketRoute(settings.path, gateway),
            Route(settings.path, probe, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *_api_routes(registry, settings),
            _OtherWebSockets(no_endpoint),  # before a Mount, which would take a WebSocket too
            *page_routes,
        ],
        exception_handlers={HTTPException: _http_error, BackendUnavailable: _backend_unavailable},
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.settings = settings
    return app


class _OtherWebSockets(BaseRoute):
    """The route of every WebSocket that the routes before it did not take, whatever its path (a path's regular
    expression would miss one with a line break in it), to ``endpoint``."""

    def __init__(self, endpoint: Callable[[WebSocket], Awaitable[None]]) -> None:
        self.endpoint = endpoint

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        return (Match.FULL, {}) if scope["type"] == "websocket" else (Match.NONE, {})

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.endpoint(WebSocket(scope, receive, send))


class _GatewayApp(Starlette):
    """Starlette, calling the WebSocket endpoint directly when no middleware was added: its middleware
    and router would each keep a coroutine frame alive for as long as a connection lasts."""

    def __init__(self, gateway: _Gateway, first_request: Callable[[], None], **options: Any) -> None:
        super().__init__(**options)
        self.gateway = gateway
        self._first_request: Callable[[], None] | None = first_request  # None once called

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.serving(scope, receive, send)

    def serving(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """What serves ``scope``: the gateway's coroutine itself for its path, which a caller awaits with no frame of
        this app's in between (a frame held for a connection's life is 270 bytes), else Starlette's."""
        if self._first_request is not None and scope["type"] != "lifespan":
            first_request, self._first_request = self._first_request, None
            first_request()
        if scope["type"] == "websocket" and not self.user_middleware:
            path, root_path = scope["path"], scope.get("root_path", "")
            if root_path and path.startswith(root_path):  # mounted: match as Starlette's router does
                path = path[len(root_path):]
            if path == self.gateway.settings.path:
                scope["app"] = self
                return self.gateway(scope, receive, send)
        return super().__call__(scope, receive, send)


def _static_folder(static_dir: str) -> Path | None:
    """The browser page's folder: beside the module (a checkout, a copied folder) or installed with it."""
    if static_dir != "auto":
        return Path(static_dir) if static_dir else None
    here = Path(__file__).resolve().parent
    for folder in (here / "static", here / "ws_micro_static"):
        if (folder / "index.html").is_file():
            return folder
    return None  # a copied single file: the gateway runs without the page


class _AppFromEnvironment:
    """The gateway configured from ``WS_MICRO_*`` variables and the file ``WS_MICRO_CONFIG`` names, built when the
    server starts it (its lifespan) or first uses it, never at import: ``uvicorn ws_micro:app``,
    ``hypercorn ws_micro:app``, and so on."""

    def __init__(self) -> None:
        self._app: Starlette | None = None

    def built(self) -> Starlette:
        if self._app is None:  # a bad value's error names its variable, or the file and key
            self._app = _built(create_app, _given(os.environ, [field.name for field in dataclasses.fields(Settings)]))
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None and scope["type"] == "lifespan":  # a bad setting fails the startup, with its name
            startup = await receive()
            try:
                self.built()
            except ValueError as exc:  # a bad setting, or a missing package: its one line says which
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            except Exception as exc:  # a bug (a sibling module that does not compile): fail, not serve without it
                logger.exception("the gateway could not be built")
                await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                return
            receive = _replaying(startup, receive)
        app = self.built()
        await (app.serving(scope, receive, send) if isinstance(app, _GatewayApp) else app(scope, receive, send))

    def __getattr__(self, name: str) -> Any:  # app.state, app.routes, ...: those of the built app
        if name.startswith("__"):  # a tool probing for __wrapped__ and the like must not build it
            raise AttributeError(name)
        return getattr(self.built(), name)


def _replaying(first: Message, receive: Receive) -> Receive:
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


app = _AppFromEnvironment()


# --------------------------------------------------------------------------
# Serving (ws-micro): uvicorn
# --------------------------------------------------------------------------


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging configuration, with the gateway's own lines beside uvicorn's."""
    from uvicorn.config import LOG_LEVELS, LOGGING_CONFIG

    if logging.getLogger().handlers:  # the embedding program configured logging: ws_micro's lines go there
        return LOGGING_CONFIG
    # A number: "trace" is uvicorn's own level, named only once uvicorn.Config configures logging.
    ws_micro = {"handlers": ["default"], "level": LOG_LEVELS.get(level.lower(), level.upper()), "propagate": False}
    return {**LOGGING_CONFIG, "loggers": {**LOGGING_CONFIG["loggers"], "ws_micro": ws_micro}}


def serve(app: Starlette, settings: ServerSettings | None = None) -> None:
    """Run ``app`` on uvicorn until SIGINT or SIGTERM, then return (so the process exits 0).

    uvicorn then sends every WebSocket a close frame (1012) and waits up to
    ``graceful_timeout``; the signal it re-raises reaches our no-op handler.
    """
    import uvicorn

    settings = settings or ServerSettings()
    app_settings: Settings | None = getattr(app.state, "settings", None)
    gateway: _Gateway | None = getattr(app, "gateway", None)
    log_config = _log_config(settings.log_level)
    logging.config.dictConfig(log_config)  # now, for what the server support says as it is asked below
    # With ws_micro_servers.py, request heads have a deadline and a size, and sockets waiting for one count.
    guarded = None if gateway is None else gateway.server.http_protocol(
        gateway, settings.handshake_timeout, _raise_descriptor_limit(), settings.max_head_size)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded or "auto",
        ws="websockets-sansio",
        lifespan="on",  # a failing startup (cluster mode) stops the server instead of passing unnoticed
        # The engine refuses oversized frames (1009) before buffering them.
        ws_max_size=app_settings.max_message_size if app_settings else 16 * 1024 * 1024,
        ws_ping_interval=settings.ping_interval or None,
        ws_ping_timeout=settings.ping_timeout or None,
        ws_per_message_deflate=settings.per_message_deflate,
        timeout_graceful_shutdown=settings.graceful_timeout,
        log_level=settings.log_level,
        log_config=log_config,
        h11_max_incomplete_event_size=settings.max_head_size,  # uvicorn's h11 parser bounds heads; httptools does not
    )
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------

DEFAULT_URL = "ws://localhost:8000/ws/py_client"


class HandshakeRefused(ConnectionError):
    """The server refused the handshake with an HTTP status: 401 (no valid token), 403, 503 (full, or its
    authentication unavailable).  ``code`` and ``message`` are those of its error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"the server refused the connection: HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class SessionLost(ConnectionError):
    """The connection dropped and the server could not recover the session: the client is connected
    again, as a new client (a new ``client_id``, in no rooms), and missed frames; resynchronise."""


class RequestError(Exception):
    """The server answered :meth:`Client.request` with an ``error`` frame: its ``code`` and ``message``, and
    the whole ``answer``."""

    def __init__(self, code: str, message: str, answer: Event) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.answer = code, message, answer


# A client's own bounds on requests: those waiting for their answers (a program that sends faster than the
# server answers gets RuntimeError, not a growing table), and the frames a request read while it waited for
# its answer, kept for recv() (at this many it reads no more, and waits for recv() to take some: the server's
# own bound on what waits for a slow reader, max_queue_messages, is 1000 frames by default).
MAX_PENDING_REQUESTS = 1000
MAX_UNREAD_FRAMES = 1000


class Client:
    """An async client for the protocol, built on ``websockets``::

        async with Client("ws://localhost:8000/ws/py_client", token=token) as client:
            await client.send("join", {"room": "lobby"})
            async for event in client:
                print(event.event, event.data.data)

    ``token`` goes in an ``Authorization: Bearer`` header.  A refused handshake raises
    :class:`HandshakeRefused`.  ``await client.request("ping", {...})`` sends a frame with an ``id`` and
    returns its answer.  Iteration ends when the server closes the connection
    normally; an abnormal close raises ``websockets.ConnectionClosedError``.

    With recovery on at the server, a connection that drops is resumed, within
    ``resume_timeout`` seconds of tries: the client keeps its id and rooms and receives what it
    missed, in order, as if nothing happened (``recovered`` is True).  If the server cannot
    recover the session, the send or receive raises :class:`SessionLost`, connected again.
    """

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None, resume_timeout: float = 30.0,
                 **connect_options: Any) -> None:
        self.url = url
        self.client_id = ""
        self.user: str | None = None  # with authentication on, who the server says we are
        self.connect_frame = ""
        # Connection recovery: whether the last connect resumed the session (None: the server offers none),
        # and the frames received since the session began, but its connect frames.
        self.recovered: bool | None = None
        self.offset = 0
        self._resume_token: str | None = None
        self._resume_timeout = resume_timeout
        # websockets' options; frames are capped (inflated, if compressed) at uvicorn's default limit.
        self._connect_options = {"max_size": 16 * 1024 * 1024, "open_timeout": 10.0, **connect_options}
        if token is not None:
            headers = dict(self._connect_options.get("additional_headers") or {})
            self._connect_options["additional_headers"] = {**headers, "Authorization": f"Bearer {token}"}
        self._connection: Any = None
        # Requests (see request()): their ids, and their futures by id; the frames read while one waited,
        # for recv(); and one reader of the socket at a time, whether a request or recv().
        self._request_ids = itertools.count(1)
        self._requests: dict[int, asyncio.Future[Event]] = {}
        self._unread: collections.deque[str] = collections.deque()
        self._reading = asyncio.Lock()

    async def connect(self) -> Self:
        """Open the connection and wait, up to ``open_timeout``, for the connect frame that carries our id;
        else ``TimeoutError``, :class:`HandshakeRefused`, or ``ConnectionError`` if something else came."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        _redact_tokens_in_logs()  # websockets logs the headers it sends at DEBUG: our token among them

        options = self._connect_options
        if self._resume_token is not None:
            options = {**options, "additional_headers": {**dict(options.get("additional_headers") or {}),
                                                         RESUME_TOKEN_HEADER: self._resume_token,
                                                         RESUME_OFFSET_HEADER: str(self.offset)}}
        try:
            self._connection = await connect(self.url, **options)
        except InvalidStatus as exc:
            raise _handshake_refused(exc.response.status_code, bytes(exc.response.body or b"")) from None
        try:
            with anyio.fail_after(self._connect_options["open_timeout"] or math.inf):
                self.connect_frame = await self._connection.recv()
            event = _decode(_decode_event, self.connect_frame)
            if event.event != "connect":
                raise ConnectionError(f"expected a connect frame, but got {event.event!r}")
        except msgspec.MsgspecError as exc:
            await self.close()
            raise ConnectionError(f"expected a connect frame, but got {self.connect_frame[:200]!r} ({exc})") from None
        except BaseException:
            await self.close()
            raise
        self.client_id = event.client_id
        greeting = event.data.data
        user = greeting.get("user")
        self.user = user if isinstance(user, str) else None
        token, recovered = greeting.get("resume_token"), greeting.get("recovered")
        self._resume_token = token if isinstance(token, str) else None
        self.recovered = recovered if isinstance(recovered, bool) else None
        if not self.recovered:
            self.offset = 0
        return self

    def _resumable(self, closed: Any) -> bool:
        """Whether the session outlives this close: the connection dropped (no close frame came), or the
        server went away (1001, 1012: restarting); not a close the server chose (kicked, cut off)."""
        return self._resume_token is not None and (closed.rcvd is None or closed.rcvd.code in (1001, 1012))

    async def _resume(self) -> None:
        """Connect again after a drop, with the session's resume token; :class:`SessionLost` if the server
        gave a new session."""
        from websockets.exceptions import InvalidHandshake

        delay, deadline = 0.05, time.monotonic() + self._resume_timeout
        while True:
            try:
                await self.connect()
                break
            except HandshakeRefused as exc:
                if exc.status != 409 and exc.status != 400:
                    raise
                self._resume_token = None  # spent already: a new session, then
            except (OSError, TimeoutError, InvalidHandshake):
                if time.monotonic() + delay > deadline:
                    raise
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if not self.recovered:
            raise SessionLost(f"the session could not be recovered; connected again as {self.client_id}")

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def send(self, event: str, data: Mapping[str, Any] | None = None, *,
                   to: str | None = None, room: str | None = None) -> None:
        await self.send_text(_encode(Event(event, self.client_id, Payload(dict(data or {})), to, room)).decode())

    async def send_text(self, text: str) -> None:
        from websockets.exceptions import ConnectionClosedError

        try:
            await self._connection.send(text)
        except ConnectionClosedError as exc:
            if not self._resumable(exc):
                raise
            await self._resume()
            await self._connection.send(text)

    async def request(self, event: str, data: Mapping[str, Any] | None = None, *,
                      timeout: float = 10.0) -> Event:  # noqa: ASYNC109 - socket.io's and Centrifugo's clients' way
        """Send ``event`` with an ``id`` and return the server's answer, the frame that carries the id back
        (``pong`` for ``ping``, a handler's or the backend's reply); raise :class:`RequestError` if it is an
        ``error``, and ``TimeoutError`` if none came within ``timeout`` seconds.  The answer goes to this
        call only, not to recv(); the frames that come meanwhile wait for recv(), in order."""
        if len(self._requests) >= MAX_PENDING_REQUESTS:
            raise RuntimeError(f"{MAX_PENDING_REQUESTS} requests are waiting for their answers already "
                               "(MAX_PENDING_REQUESTS)")
        request_id = next(self._request_ids)
        answered: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = answered
        try:
            with anyio.move_on_after(timeout):
                await self.send_text(_encode(Event(event, self.client_id, Payload(dict(data or {})),
                                                   id=request_id)).decode())
                while not answered.done():
                    if len(self._unread) >= MAX_UNREAD_FRAMES:  # read no more: recv() must take some first
                        await answered
                        break
                    async with self._reading:  # one reader at a time; another may have read our answer
                        if not answered.done():
                            text = await self._read_text()
                            if not self._answers(text):
                                self._unread.append(text)
        finally:
            del self._requests[request_id]
        if not answered.done() or answered.cancelled():
            unread = f"; {len(self._unread)} frames received meanwhile wait for recv()" if self._unread else ""
            raise TimeoutError(f"no answer to {event!r} (id {request_id}) within {timeout:g} seconds{unread}")
        answer = answered.result()
        if answer.event == "error":
            error = answer.data.data
            raise RequestError(str(error.get("code")), str(error.get("message")), answer)
        return answer

    def _answers(self, text: str) -> bool:
        """Whether ``text`` is the answer to a request waiting here, which it then resolves: a frame with the
        request's id, our own client id and no ``to`` or ``room``: one the server sent us (a frame relayed
        from another client carries the sender's id)."""
        if not self._requests or '"id"' not in text:
            return False
        try:
            event = _decode(_decode_event, text)
        except msgspec.MsgspecError:
            return False
        waiting = self._requests.get(event.id) if isinstance(event.id, int) else None
        if waiting is None or event.client_id != self.client_id or event.to is not None or event.room is not None:
            return False
        if not waiting.done():
            waiting.set_result(event)
        return True

    async def recv_text(self) -> str:
        """The next frame that is no request's answer."""
        while True:
            if self._unread:
                return self._unread.popleft()
            async with self._reading:
                if not self._unread:  # else a request read it while we waited for our turn
                    text = await self._read_text()
                    if not self._answers(text):
                        return text

    async def _read_text(self) -> str:
        """The next frame off the socket, resuming the session if the connection dropped.  A close fails the
        requests waiting: their answers will not come."""
        from websockets.exceptions import ConnectionClosed, ConnectionClosedError

        while True:
            try:
                text = await self._connection.recv()
                break
            except ConnectionClosed as exc:
                if isinstance(exc, ConnectionClosedError) and self._resumable(exc):
                    try:
                        await self._resume()
                        continue
                    except Exception as failure:  # SessionLost among them: the answers went with the session
                        self._fail_requests(failure)
                        raise
                self._fail_requests(exc)
                raise
        if not isinstance(text, str):
            raise ConnectionError(f"expected a text frame, but got {type(text).__name__}")
        self.offset += 1
        return text

    def _fail_requests(self, failure: BaseException) -> None:
        for waiting in self._requests.values():
            if not waiting.done():
                waiting.set_exception(failure)

    async def recv(self) -> Event:
        """The next event.  A ``connect`` frame after the first, relayed from another client, is skipped."""
        while True:
            event = _decode(_decode_event, await self.recv_text())
            if event.event != "connect":
                return event
            logger.warning("ignored a connect frame from %r that was not the first frame", event.client_id)

    async def __aiter__(self) -> AsyncIterator[Event]:
        from websockets.exceptions import ConnectionClosedOK

        try:
            while True:
                yield await self.recv()
        except ConnectionClosedOK:
            return

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        if self._connection is not None:
            await self._connection.close(code, reason)

    @property
    def close_code(self) -> int | None:
        return self._connection.close_code if self._connection is not None else None


def _handshake_refused(status: int, body: bytes) -> HandshakeRefused:
    try:
        error = msgspec.json.decode(body)["error"]
        return HandshakeRefused(status, str(error["code"]), str(error["message"]))
    except (msgspec.DecodeError, KeyError, TypeError):
        if status == 403 and not body.strip():  # what a host app's router answers for a path it has no route for
            return HandshakeRefused(status, "http_error", "no reason given: a host app answers so for a path outside "
                                                          "the gateway's mount (is the URL's path right?), and daphne "
                                                          "for any refusal")
        return HandshakeRefused(status, "http_error", body[:200].decode(errors="replace"))


async def _run_client(url: str, linger: float, token: str | None = None) -> int:
    """The ``client`` command: frames to stdout as JSON lines, stdin lines to the server."""
    from websockets.exceptions import ConnectionClosed

    send_line, lines = anyio.create_memory_object_stream[str | None](100)

    def read_stdin(portal: anyio.from_thread.BlockingPortal) -> None:
        # A daemon thread, not a worker: a read blocked on a terminal must not keep the process alive.
        for line in sys.stdin:
            portal.call(send_line.send, line)
        portal.call(send_line.send, None)

    client = await Client(url, token=token).connect()
    print(client.connect_frame, flush=True)
    async with anyio.from_thread.BlockingPortal() as portal, anyio.create_task_group() as tasks:

        async def print_frames() -> None:
            while True:
                try:
                    print(await client.recv_text(), flush=True)
                except SessionLost as lost:  # connected again, as a new client: say so, and show its frame
                    print(f"{lost}", file=sys.stderr)
                    print(client.connect_frame, flush=True)
                except ConnectionClosed:
                    break
            tasks.cancel_scope.cancel()

        tasks.start_soon(print_frames)
        threading.Thread(target=read_stdin, args=(portal,), daemon=True).start()
        async for line in lines:
            if line is None:  # EOF: let replies in flight arrive, then leave
                await anyio.sleep(linger)
                break
            if not line.strip():
                continue
            try:
                message = _decode(msgspec.json.decode, line)
            except msgspec.DecodeError:
                message = None
            if not isinstance(message, dict):
                print(f"ignored: expected a JSON object, but got {line.strip()!r}", file=sys.stderr)
                continue
            message["client_id"] = client.client_id
            message.setdefault("data", {"data": {}})
            try:
                await client.send_text(_encode(message).decode())
            except SessionLost as lost:
                print(f"not sent: {lost}", file=sys.stderr)
            except ConnectionClosed:
                break
        await client.close()
        tasks.cancel_scope.cancel()
    code = client.close_code
    print(f"closed: {code}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


class _Described(typing.NamedTuple):
    """A setting as the field declaring it says."""

    name: str
    group: str  # the comment opening its group of fields: "Limits", "Authentication (docs/auth.md): on when ..."
    description: str  # its docstring: one line


@functools.cache
def _described() -> tuple[_Described, ...]:
    """Every setting, in order, with its group and its one-line description, read from the source of Settings and
    ServerSettings: Python keeps neither a field's docstring nor a comment (and ``-OO`` drops every docstring).
    Without the source (a frozen program), the settings are listed by name alone."""
    described = []
    for cls in (Settings, ServerSettings):
        try:  # the class's lines, to the next one not indented (inspect.getsource would parse the whole module)
            module = linecache.getlines(inspect.getsourcefile(cls) or "")
            start = module.index(f"class {cls.__name__}:\n")
        except (OSError, TypeError, ValueError):
            described += [_Described(field.name, cls.__name__, "") for field in dataclasses.fields(cls)]
            continue
        lines = [module[start], *itertools.takewhile(lambda line: line[:1] in (" ", "\n"), module[start + 1:])]
        groups = {number: line.strip()[2:] for number, line in enumerate(lines, 1)  # a comment after a blank line
                  if line.strip().startswith("# ") and not lines[number - 2].strip()}
        body = typing.cast(ast.ClassDef, ast.parse("".join(lines)).body[0]).body
        for statement, after in zip(body, [*body[1:], None], strict=True):
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                group = groups.get(max((n for n in groups if n < statement.lineno), default=0), cls.__name__)
                doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
                described.append(_Described(statement.target.id, group, " ".join(str(doc).split())))
    return tuple(described)


def _plain(description: str) -> str:
    """A description as a terminal shows it: ``*`` is *."""
    return description.replace("``", "")


def _shown(value: Any) -> str:
    """A default as --help shows it: ``none``, ``off``, ``*``, ``5000``."""
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if value != "" else '""'


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _defaults() -> dict[str, Any]:
    return {field.name: field.default for cls in (Settings, ServerSettings) for field in dataclasses.fields(cls)}


_SETTINGS_HELP = (
    "Each setting is a flag, a variable (WS_MICRO_MAX_MESSAGE_SIZE) and a key of the config file "
    "(max_message_size): a flag beats a variable, which beats the file. Keep secrets out of flags: other users "
    "can see them in the process list.")


def _settings_help(width: int) -> str:
    """The settings in ``ws-micro --help``, by group: in a terminal wide enough, a table of their flags, defaults and
    descriptions, a line each; else each flag and its default on a line, and its description below."""
    kinds, defaults = _setting_types(), _defaults()
    rows = [(setting.group, f"--[no-]{setting.name.replace('_', '-')}" if kinds[setting.name] is bool else
             f"{_option(setting.name)} {_metavar(setting.name, kinds[setting.name])}",
             _shown(defaults[setting.name]), _plain(setting.description)) for setting in _described()]
    usage_width, default_width = (max(len(row[column]) for row in rows) for column in (1, 2))
    table = 2 + usage_width + 2 + default_width + 2 + max(len(row[3]) for row in rows) <= width
    lines = textwrap.wrap(_SETTINGS_HELP, width)
    if table:
        lines += ["", f"  {'FLAG':{usage_width}}  {'DEFAULT':{default_width}}  DESCRIPTION"]
    group = None
    for in_group, usage, default, description in rows:
        if in_group != group:
            group = in_group
            lines += ["", *textwrap.wrap(group, width)]
        if table:
            lines.append(f"  {usage:{usage_width}}  {default:{default_width}}  {description}")
        else:
            lines.append(f"  {usage}  (default: {default})")
            lines += textwrap.wrap(description, width, initial_indent="    ", subsequent_indent="    ",
                                   break_on_hyphens=False)
    return "\n".join(lines)


def _metavar(name: str, kind: Any) -> str:
    if kind in (int, float):
        return "N"
    return "LIST" if kind == tuple[str, ...] else "URL" if name.endswith("_url") else "TEXT"


def _config_file() -> str:
    """What ``ws-micro config`` prints: every setting, its description as a comment, and its default commented
    out, with fresh random values for the secrets (commented out too)."""
    lines = [
        "# ws-micro's settings, read by ws-micro --config FILE, or from WS_MICRO_CONFIG=FILE (by uvicorn ws_micro:app",
        "# too). Each key is also a flag (--max-message-size) and a variable (WS_MICRO_MAX_MESSAGE_SIZE): a flag",
        "# beats a variable, which beats this file. A line commented out shows the default: uncomment it to change it.",
        f"# {', '.join(_SECRETS)} hold fresh random values, made for this file: uncomment those you need,",
        "# and keep the file private (chmod 600; ws-micro config FILE writes it so).",
    ]
    defaults = _defaults()
    group = None
    for setting in _described():
        if setting.group != group:
            group = setting.group
            lines += ["", f"## {group}"]
        value = secrets.token_urlsafe(32) if setting.name in _SECRETS else defaults[setting.name]
        lines += ["", f"# {_plain(setting.description)}", f"#{setting.name} = {_toml(value)}"]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    """A setting's value in TOML: unset is "", as in a variable."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return msgspec.json.encode(value or "").decode()  # a JSON string is a TOML basic string


class _Parser(argparse.ArgumentParser):
    """argparse, answering a mistake with one line, not the whole usage before it."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message.replace(chr(10), ' ')}\n")


def _parser() -> _Parser:
    """``ws-micro``'s options: --config, and a flag for each setting, given only if given (--help lists them)."""
    parser = _Parser(prog="ws-micro", formatter_class=argparse.RawDescriptionHelpFormatter,
                     usage="%(prog)s [--config FILE] [--SETTING VALUE ...]\n"
                           "       %(prog)s client [URL]   a client: JSON lines in, frames out\n"
                           "       %(prog)s config [FILE]  a config file of every setting, to start from",
                     description="ws_micro: a WebSocket gateway in one module. It serves until SIGINT or SIGTERM.",
                     epilog=_settings_help(max(shutil.get_terminal_size().columns - 2, 40)))  # argparse's width
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--config", metavar="FILE", help=f"read settings from this TOML file (or {CONFIG_VARIABLE})")
    for name, kind in _setting_types().items():
        if kind is bool:
            parser.add_argument(_option(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
        else:
            parser.add_argument(_option(name), default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _configured(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[Starlette, ServerSettings]:
    """The app and server settings ``ws-micro [argv]`` runs: flags over variables over the file over defaults."""
    parser = _parser()
    options, extra = parser.parse_known_args(argv)
    if extra:
        close = difflib.get_close_matches(extra[0].partition("=")[0], [_option(name) for name in _setting_types()], n=1)
        parser.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {close[0]}?)" if close else ""))
    flags = vars(options)
    config = flags.pop("config")
    server_fields = [field.name for field in dataclasses.fields(ServerSettings)]
    try:
        given = _given(environ, list(_setting_types()), config, flags)
        server = _built(ServerSettings, {name: given.pop(name) for name in server_fields if name in given})
        return _built(create_app, given), server
    except ValueError as exc:
        parser.error(str(exc))


def _built(make: Callable[..., _T], given: Mapping[str, _Given]) -> _T:
    """``make(**values)``, an error about a value naming where it was given: errors about a setting start with its
    name (``max_connections must be at least 1``), which this replaces with ``--max-connections`` or the like."""
    try:
        return make(**{name: setting.value for name, setting in given.items()})
    except ValueError as exc:
        name, _, problem = str(exc).partition(" ")
        if name in given:
            raise ValueError(f"{given[name].source} {problem}") from None
        raise


def _write_config(argv: Sequence[str]) -> int:
    """``ws-micro config [FILE]``."""
    parser = _Parser(prog="ws-micro config", formatter_class=argparse.RawDescriptionHelpFormatter, description=(
        "Print a TOML config file with every setting: its description, its default\n(commented out), and fresh "
        "random values for the secrets. Load it with\nws-micro --config FILE, or WS_MICRO_CONFIG=FILE."))
    parser.add_argument("file", nargs="?", help="write it to FILE instead, readable by you alone (mode 0600); "
                                                "an existing FILE is left alone")
    args = parser.parse_args(argv)
    if args.file is None:
        sys.stdout.write(_config_file())
        return 0
    try:
        with os.fdopen(os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(_config_file())
    except OSError as exc:
        parser.error(f"cannot write {args.file!r}: {exc.strerror}")
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    """``ws-micro [options]`` serves the gateway; ``ws-micro client [URL]`` talks to one; ``ws-micro config``
    prints a config file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["client"]:
        parser = _Parser(prog="ws-micro client", description="Talk to a gateway: each line of standard input, a "
                         "JSON frame, is sent (its client_id filled in), and each frame received is printed as a "
                         "line of JSON.")
        parser.add_argument("url", nargs="?", default=DEFAULT_URL,
                            help=f"the gateway's endpoint, ws:// or wss:// (default {DEFAULT_URL})")
        parser.add_argument("--linger", type=float, default=0.5,
                            help="seconds to wait for replies after stdin ends (default 0.5)")
        parser.add_argument("--token", default=environ.get(ENV_PREFIX + "TOKEN"),
                            help=f"sent as 'Authorization: Bearer'; env {ENV_PREFIX}TOKEN, which, unlike a flag, "
                                 "other users cannot see in the process list")
        args = parser.parse_args(argv[1:])
        if _url_scheme(args.url) not in ("ws", "wss"):
            parser.error(f"the URL must start with ws:// or wss://, but got {_clipped(args.url)}")
        try:
            return anyio.run(_run_client, args.url, args.linger, args.token)
        except (OSError, ConnectionError) as exc:
            print(f"ws-micro client: {exc}", file=sys.stderr)
            return 1
    if argv[:1] == ["config"]:
        return _write_config(argv[1:])
    serve(*_configured(argv, environ))
    return 0


if __name__ == "__main__":
    # Run as the module ws_micro, not as a second copy of it: the sibling modules import it by that name.
    sys.modules.setdefault("ws_micro", sys.modules[__name__])
    sys.exit(main())
