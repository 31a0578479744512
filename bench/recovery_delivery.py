"""What connection recovery costs a fan-out, in process: the registry's delivery alone, no sockets.

1,000 connections on an output that takes every frame at once and does nothing with it, all in one
room; their sessions are filled first (150 frames: full at recovery_max_frames, 100), then COUNT more
frames go to all of them: an API fan-out (``Registry._fan_out`` of a new ``_Frame``, as POST
/api/broadcast does) or a room relay (``Registry._relay`` of one client's frame to the 999 others).
It prints the time per delivery, which a shared machine makes noisy.  Count instructions instead,
with the difference of two counts so that the start-up's cancel out:

    for n in 20 60; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/recovery_delivery.py api on $n 2>&1 | grep Collected; done
    # instructions per delivery = (second - first) / (40 * 1000), or / (40 * 999) for room

and ``--rss`` prints how much the process grew instead (sessions full, COUNT frames later).

    python bench/recovery_delivery.py api|room on|off COUNT [--rss]
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.types import Message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ws_micro

RECEIVERS = 1000
FILL = 150  # frames before counting: every session full (recovery_max_frames is 100 by default)
PADDING = "abcdefghij" * 10  # a frame of about 150 characters, as bench_ws_micro.py's fan-outs send


class NullOutput(ws_micro._Output):
    """A socket that takes every frame at once."""

    __slots__ = ()

    def write_now(self, text: str, wire: bytes | None = None) -> Awaitable[None] | None:
        return None


async def _never(message: Message) -> None:
    raise AssertionError("a NullOutput writes past ASGI")


def build(recovery: bool) -> tuple[ws_micro.Registry, list[str]]:
    registry = ws_micro.Registry()
    settings = ws_micro.Settings(recovery_window=120.0 if recovery else 0.0)
    registry._use(settings, ws_micro._Backend(), lambda connection: None)
    output = NullOutput(_never)
    ids = []
    for _ in range(RECEIVERS):
        connection = ws_micro._Connection(output, remote=None, settings=settings, metrics=registry._metrics,
                                          on_close=registry._remove, session=registry._sessions.new())
        registry._add(connection)
        connection.rooms = {"room"}
        ids.append(connection.id)
    registry._rooms["room"] = set(ids)
    return registry, ids


def api(registry: ws_micro.Registry, ids: list[str], first: int, count: int) -> None:
    for n in range(first, first + count):
        registry._fan_out(list(registry._connections), ws_micro._Frame("tick", {"n": n, "text": PADDING}))


def room(registry: ws_micro.Registry, ids: list[str], first: int, count: int) -> None:
    sender = ids[0]
    for n in range(first, first + count):  # each a new string, as each frame read from a client is
        data = f'{{"data":{{"n":{n},"text":"{PADDING}"}}}}'
        text = f'{{"event":"chat","client_id":"{sender}","room":"room","data":{data}}}'
        registry._relay([member for member in registry._rooms["room"] if member != sender], text)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> None:
    kind, recovery, count = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3])
    deliver: Callable[[ws_micro.Registry, list[str], int, int], None] = api if kind == "api" else room
    registry, ids = build(recovery)
    gc.collect()
    before = rss_kib()
    deliver(registry, ids, 0, FILL)
    started = time.perf_counter()
    deliver(registry, ids, FILL, count)
    elapsed = time.perf_counter() - started
    deliveries = count * (RECEIVERS if kind == "api" else RECEIVERS - 1)
    gc.collect()
    label = f"{kind} recovery {'on' if recovery else 'off'}"
    if "--rss" in sys.argv:
        print(f"{label}: the process grew {(rss_kib() - before) / 1024:.1f} MiB")
    else:
        print(f"{label}: {elapsed / deliveries * 1e9:.0f} ns per delivery")


if __name__ == "__main__":
    main()
