"""Tests of the browser page and the JS client (static/), in a real headless Chromium.

Playwright drives the system's Chromium against real server processes, and
against test servers that misbehave in one way each: a gateway that drops its
clients, one that never answers, a proxy that cuts connections as a network
failure would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from conftest import (
    FORGERY,
    JWT_SECRET,
    MINE,
    TIMEOUT,
    CuttingProxy,
    Server,
    frame,
    free_port,
    hooks_app,
    mint,
    relaying_gateway,
    replying_server,
    require_marks,
    run_server,
)
from playwright.sync_api import Browser, Locator, Page, Playwright, sync_playwright
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as connect_sync

pytestmark = [pytest.mark.process, pytest.mark.browser]


CHROMIUM = os.environ.get("WS_MICRO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start_playwright() -> contextlib.AbstractContextManager[Playwright]:
    """Playwright's sync API, for a test marked to start Chromium (and Playwright's driver, a Node process).

    Checked before the driver starts: a driver that fails to start leaves Playwright unusable for the
    tests after.
    """
    require_marks("starts Playwright and Chromium", "process", "browser")
    return sync_playwright()


@pytest.fixture  # per test: Playwright's sync API holds an event loop that the async tests must not meet
def browser() -> Iterator[Browser]:
    """Debian's Chromium (Playwright cannot download its own browser here); a missing one fails, never skips."""
    assert Path(CHROMIUM).is_file(), f"the browser tests need {CHROMIUM}: apt-get install chromium"
    with start_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_console(browser: Browser, server: Server, **context_options: Any) -> Page:
    page = browser.new_context(**context_options).new_page()
    page.goto(server.http + "/")
    page.wait_for_function("document.getElementById('state').dataset.state === 'open'", timeout=TIMEOUT * 1000)
    return page


def client_id_of(page: Page) -> str:
    return str(page.locator("#client-id").inner_text())


def send_from(page: Page, route: str, target: str, event: str, data: str) -> None:
    page.select_option("#route", route)
    page.fill("#target", target)
    page.fill("#event", event)
    page.fill("#data", data)
    page.click("#send-form button[type=submit]")


def log_entry(page: Page, text: str) -> Locator:
    entry = page.locator("#log li", has_text=text).first
    entry.wait_for(timeout=TIMEOUT * 1000)
    return entry


def assert_rendered(page: Page, path: Path) -> None:
    """The page was laid out and painted: its panels have size, styles applied, pixels written."""
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a blank page compresses to far less
    for selector in ("header", "#send-form", "#room-form", "#log"):
        box = page.locator(selector).bounding_box()
        assert box and box["width"] > 100 and box["height"] > 20, selector
    badge = page.evaluate("getComputedStyle(document.getElementById('state')).backgroundColor")
    assert badge == "rgb(31, 122, 61)"  # the stylesheet's green for "open"


def test_browser_pages_talk_by_id_and_by_room_and_see_errors(browser: Browser, tmp_path: Path) -> None:
    with run_server("--log-level", "warning") as server:
        a, b = open_console(browser, server), open_console(browser, server)
        id_a, id_b = client_id_of(a), client_id_of(b)
        assert len(id_a) == 36 and id_a != id_b

        send_from(a, "client", id_b, "chat", '{"text": "hello B"}')
        assert id_a in log_entry(b, "hello B").inner_text()

        for page in (a, b):  # keyboard only: type a room name, press Enter
            page.focus("#room")
            page.keyboard.type("lobby")
            page.keyboard.press("Enter")
            log_entry(page, "joined")
        send_from(a, "room", "lobby", "chat", '{"text": "hello room"}')
        assert "in lobby" in log_entry(b, "hello room").inner_text()

        send_from(a, "client", "nobody", "chat", "{}")
        error = log_entry(a, "unknown_client")
        assert "error" in (error.get_attribute("class") or "")
        assert "no client with id 'nobody'" in error.inner_text()

        send_from(a, "client", id_b, "chat", "[1, 2]")  # the form refuses what the server would
        assert "JSON object" in a.locator("#send-error").inner_text()

        a.locator("#refresh").click()
        a.locator("#clients li", has_text=id_b).wait_for(timeout=TIMEOUT * 1000)
        assert_rendered(a, tmp_path / "console.png")


def test_browser_page_reconnects_and_rejoins_its_room_after_a_restart(browser: Browser, tmp_path: Path) -> None:
    port = free_port()
    with run_server("--log-level", "warning", port=port) as server:
        page = open_console(browser, server)
        first_id = client_id_of(page)
        page.fill("#room", "lobby")
        page.press("#room", "Enter")
        log_entry(page, "joined")
    # The server is gone: the page says so, and when it tries again, and keeps trying.
    page.wait_for_function("document.getElementById('state').dataset.state === 'reconnecting'",
                           timeout=TIMEOUT * 1000)
    page.wait_for_function(r"""/^closed \d+; reconnecting in \d+\.\d s \(attempt \d+\)$/
                               .test(document.getElementById('state').textContent)""", timeout=TIMEOUT * 1000)
    with run_server("--log-level", "warning", port=port) as server:
        page.wait_for_function("document.getElementById('state').dataset.state === 'open'", timeout=30_000)
        second_id = client_id_of(page)
        assert second_id != first_id
        # It re-joined its room by itself: the page shows the second "joined", the server lists it there.
        page.locator("#log li", has_text="joined").nth(1).wait_for(timeout=TIMEOUT * 1000)
        assert server.get(f"/api/clients/{second_id}").json()["rooms"] == ["lobby"]
        assert server.post("/api/rooms/lobby", {"event": "news", "data": {"data": {"n": 1}}}).json() == {
            "delivered": 1}
        log_entry(page, '{"n":1}')
        assert_rendered(page, tmp_path / "reconnected.png")


def test_browser_page_refuses_forged_server_events(browser: Browser) -> None:
    with run_server("--log-level", "warning") as server:
        a, b = open_console(browser, server), open_console(browser, server)
        id_b = client_id_of(b)
        for name in ("connect", "pong"):  # the gateway refuses to relay them
            send_from(a, "client", id_b, name, '{"message": "connection request granted"}')
            assert f"'{name}' is sent by the server only" in log_entry(a, f"invalid_event: '{name}'").inner_text()
        send_from(a, "client", id_b, "chat", '{"text": "after the forgeries"}')
        log_entry(b, "after the forgeries")  # frames from A arrive in order: nothing of A's came before it
        assert b.locator("#log li", has_text="connect").count() == 1  # its own
        assert client_id_of(b) == id_b
        assert b.evaluate("window.wsMicroClient.clientId") == id_b
    # A gateway without that check relays them: the page still keeps its id, and can still send.
    with relaying_gateway(*FORGERY) as url, run_server("--log-level", "warning") as server:
        page = browser.new_context().new_page()
        page.goto(f"{server.http}/?ws={url}")
        log_entry(page, "after the forgery")
        assert client_id_of(page) == MINE
        assert page.evaluate("window.wsMicroClient.clientId") == MINE


def test_browser_pages_of_other_sites_cannot_drive_the_api(tmp_path: Path) -> None:
    # evil.example resolves to this machine, as it would after a DNS rebinding.
    with (start_playwright() as playwright, run_server("--log-level", "warning") as server):
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            *CHROMIUM_ARGS, "--host-resolver-rules=MAP evil.example 127.0.0.1"])
        try:
            own = open_console(chromium, server)
            rebound = chromium.new_context().new_page()
            rebound.goto(f"http://evil.example:{server.port}/")  # its own origin: the WebSocket is same-origin
            rebound.locator("#clients-note", has_text="403").wait_for(timeout=TIMEOUT * 1000)
            # Requests a page may send anywhere without a CORS preflight: text/plain POSTs.
            for target in (f"http://127.0.0.1:{server.port}", f"http://evil.example:{server.port}"):
                status = rebound.evaluate("""async (url) => {
                    const response = await fetch(url + "/api/broadcast", {method: "POST", mode: "no-cors",
                      headers: {"Content-Type": "text/plain"}, body: '{"event":"forged","data":{"data":{}}}'});
                    return response.status;  // 0 when opaque (cross-origin)
                }""", target)
                assert status in (0, 403, 415)
            send_from(own, "builtin", "", "ping", '{"n": 1}')  # had a broadcast gone out, it would come first
            log_entry(own, '{"n":1}')
            assert own.locator("#log li", has_text="forged").count() == 0
            own.locator("#refresh").click()  # the page's own, same-origin use goes on
            own.locator("#clients-note", has_text="2 connected").wait_for(timeout=TIMEOUT * 1000)
        finally:
            chromium.close()


def test_browser_page_fits_a_phone_and_works_without_the_api(browser: Browser, tmp_path: Path) -> None:
    with run_server("--log-level", "warning", "--api-token", "secret") as server:
        page = open_console(browser, server, viewport={"width": 375, "height": 740}, is_mobile=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling
        page.locator("#clients-note", has_text="401").wait_for(timeout=TIMEOUT * 1000)
        send_from(page, "builtin", "", "ping", '{"n": 7}')
        log_entry(page, "pong")
        assert_rendered(page, tmp_path / "phone.png")


# The JS client's reconnect rules, each against a real server that misbehaves in one way.


class Attempts:
    """The connections a test server accepted: when each came and when its client let go of it."""

    def __init__(self) -> None:
        self.opened: list[float] = []
        self.closed: dict[int, float] = {}
        self._changed = threading.Condition()

    def open(self) -> int:
        with self._changed:
            self.opened.append(time.monotonic())
            self._changed.notify_all()
            return len(self.opened) - 1

    def close(self, index: int) -> None:
        with self._changed:
            self.closed[index] = time.monotonic()
            self._changed.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        with self._changed:
            assert self._changed.wait_for(predicate, TIMEOUT), f"timed out waiting for {what}"


@contextlib.contextmanager
def serving(server: Any, **options: float) -> Iterator[None]:
    """Run a blocking server's ``serve_forever`` (websockets' or socketserver's) in a thread; stop it after."""
    require_marks(f"starts a test server in a thread ({type(server).__name__})", "process")
    thread = threading.Thread(target=server.serve_forever, kwargs=options)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        thread.join(TIMEOUT)


@contextlib.contextmanager
def flaky_gateway(*holds: float | None, greet: bool = True) -> Iterator[tuple[str, Attempts]]:
    """A WebSocket server that greets each connection as the gateway does (unless not ``greet``), keeps the
    i-th one ``holds[i]`` seconds (the last hold for all later ones; None: until the client leaves), then
    closes it with 1011, as a gateway that fails under its clients would."""
    from websockets.sync.server import ServerConnection, serve

    attempts = Attempts()

    def handler(ws: ServerConnection) -> None:
        index = attempts.open()
        if greet:
            ws.send(json.dumps(frame("connect", f"flaky-{index}", {"message": "connection request granted"})))
        hold = holds[min(index, len(holds) - 1)]
        if hold is None:
            with contextlib.suppress(ConnectionClosed):
                for _ in ws:
                    pass
        else:
            time.sleep(hold)  # this server's way: up for `hold` seconds, then it fails
            ws.close(1011, "flaky")
        attempts.close(index)

    with serve(handler, "127.0.0.1", 0) as flaky, serving(flaky):
        yield f"ws://127.0.0.1:{flaky.socket.getsockname()[1]}/ws/py_client", attempts


@contextlib.contextmanager
def mute_server(greet: bool = False) -> Iterator[tuple[str, Attempts]]:
    """A TCP server that accepts every connection and never answers its WebSocket handshake; or, ``greet``,
    answers it and sends a connect frame, then goes quiet as a peer behind a dead network does: it reads
    what comes and answers nothing, not even a close."""
    from websockets.utils import accept_key

    attempts = Attempts()

    class Mute(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            index = attempts.open()
            with contextlib.suppress(OSError):
                if greet:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = self.request.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    key = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                               if line.lower().startswith(b"sec-websocket-key:"))
                    greeting = json.dumps(frame("connect", f"mute-{index}", {})).encode()
                    self.request.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key).encode()
                                         + b"\r\n\r\n" + bytes((0x81, len(greeting))) + greeting)
                while self.request.recv(4096):
                    pass
            attempts.close(index)

    class MuteServer(socketserver.ThreadingTCPServer):
        daemon_threads, block_on_close = True, False  # a socket the client never lets go of stays behind

    with MuteServer(("127.0.0.1", 0), Mute) as mute, serving(mute, poll_interval=0.05):
        yield f"ws://127.0.0.1:{mute.server_address[1]}/ws/py_client", attempts


def start_probe(page: Page, url: str, **options: float | str) -> None:
    """A JS Client of the test's own on the page, for ``url``, not yet connected (window.probe); every
    state it reports lands in window.seen as {state, ...detail}, and when, in ms, in window.seenAt."""
    page.evaluate("""async ([url, options]) => {
        const { Client } = await import("./static/ws_micro.js");
        window.seen = [];
        window.seenAt = [];
        window.probe = new Client(url, options);
        probe.onState((state, detail) => {
            seen.push({ state, ...detail });
            seenAt.push(performance.now());
        });
    }""", [url, options])


def wait_seen(page: Page, count: int, state: str) -> list[dict[str, Any]]:
    """Wait until the probe has reported ``state`` ``count`` times; all it reported so far."""
    page.wait_for_function("([count, state]) => seen.filter((s) => s.state === state).length >= count",
                           arg=[count, state], timeout=TIMEOUT * 1000)
    return list(page.evaluate("seen"))


def waits(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reconnect waits among the reported states: those that say when the next try comes."""
    return [state for state in seen if state["state"] == "reconnecting" and "delay" in state]


def tries(page: Page) -> list[float]:
    """When (ms, the page's clock) each of the probe's tries opened its socket."""
    return [at for at, state in zip(page.evaluate("seenAt"), page.evaluate("seen"), strict=True)
            if state["state"] in ("connecting", "reconnecting") and "delay" not in state]


def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` (state in another process, seen through its API) until it holds."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_browser_client_connect_is_a_no_op_while_connecting_or_open(browser: Browser) -> None:
    with run_server("--log-level", "warning") as server:
        page = open_console(browser, server)  # the console's own client: the first connection
        page.evaluate("wsMicroClient.connect(); wsMicroClient.connect()")
        start_probe(page, server.ws)
        page.evaluate("probe.connect(); probe.connect()")  # the second call comes while it is connecting
        wait_seen(page, 1, "open")
        page.evaluate("probe.connect()")
        # One more client, connected last. Chromium opens one socket at a time to a host (RFC 6455, 4.1),
        # so a socket that one of the calls above opened would have been accepted before this one.
        page.evaluate("""async (url) => {
            const { Client } = await import("./static/ws_micro.js");
            window.last = new Client(url).connect();
        }""", server.ws)
        page.wait_for_function("last.state === 'open'", timeout=TIMEOUT * 1000)
        assert server.metric("ws_micro_connections_total") == 3
        assert server.get("/api/clients").json()["count"] == 3
        assert [state["state"] for state in page.evaluate("seen")] == ["connecting", "open"]
        assert page.evaluate("wsMicroClient.clientId") == client_id_of(page)


@pytest.fixture(scope="module")
def page_server() -> Iterator[Server]:
    """A gateway that only serves the page, for the tests whose probe talks to a test server of its own:
    they look at nothing on this one, so they may share it."""
    with run_server("--log-level", "warning") as running:
        yield running


def test_browser_client_backs_off_from_a_server_that_drops_it_until_a_connection_lasts_min_uptime(
        browser: Browser, page_server: Server) -> None:
    # Four connections dropped at once, one that lasts past minUptime, one more dropped, one that stays.
    with flaky_gateway(0, 0, 0, 0, 1.0, 0, None) as (url, attempts):
        page = open_console(browser, page_server)
        start_probe(page, url, initialDelay=100, minUptime=500)
        page.evaluate("probe.connect()")
        seen = wait_seen(page, 7, "open")
        # Each was greeted, so each opened; yet the waits grew, and started over only after the long one.
        assert [(wait["attempt"], wait["cause"], wait["code"]) for wait in waits(seen)] == [
            (1, "close", 1011), (2, "close", 1011), (3, "close", 1011), (4, "close", 1011),
            (1, "close", 1011), (2, "close", 1011)]
        for wait in waits(seen):  # each wait is between half and all of initialDelay * 2 ** (attempt - 1)
            assert 50 * 2 ** (wait["attempt"] - 1) <= wait["delay"] <= 100 * 2 ** (wait["attempt"] - 1), wait
        # So the tries spread out, 50 ms at least between the 1st and the 2nd, then 100, 200, 400 (retrying
        # every 50-100 ms, it would have made all seven in well under 1 s); each was a connection to the server.
        opened = tries(page)
        for i in range(4):
            assert opened[i + 1] - opened[i] >= 50 * 2**i - 1, opened
        assert len(opened) == len(attempts.opened) == 7


@pytest.mark.parametrize("server_kind", ["handshake hangs", "never greets"])
def test_browser_client_drops_and_retries_a_connection_not_greeted_within_connect_timeout(
        browser: Browser, page_server: Server, server_kind: str) -> None:
    test_server = mute_server() if server_kind == "handshake hangs" else flaky_gateway(None, greet=False)
    with test_server as (url, attempts):
        page = open_console(browser, page_server)
        start_probe(page, url, initialDelay=100, connectTimeout=500)
        page.evaluate("probe.connect()")
        # It tried again, and let go of the first connection: no socket is left behind.
        attempts.wait(lambda: len(attempts.opened) >= 2 and 0 in attempts.closed, "a second try")
        seen, seen_at = page.evaluate("seen"), page.evaluate("seenAt")
        timed_out = seen.index(waits(seen)[0])
        assert (seen[timed_out]["attempt"], seen[timed_out]["cause"], seen[timed_out]["code"],
                seen[timed_out]["reason"]) == (1, "timeout", 4000, "connect timeout")
        assert seen_at[timed_out] - seen_at[0] >= 500 - 1  # connectTimeout after its first try, not before
        assert "open" not in [state["state"] for state in seen]


def test_browser_client_leaves_a_dead_connection_at_once_when_its_keepalive_goes_unanswered(
        browser: Browser, page_server: Server) -> None:
    # Chromium waits a minute for the closing handshake of a socket whose peer is gone; the client does not.
    with mute_server(greet=True) as (url, attempts):
        page = open_console(browser, page_server)
        start_probe(page, url, initialDelay=100, keepalive=300)
        page.evaluate("probe.connect()")
        attempts.wait(lambda: len(attempts.opened) >= 2, "a second try")  # within 10 s, not after a minute
        seen, seen_at = page.evaluate("seen"), page.evaluate("seenAt")
        assert [state["state"] for state in seen[:2]] == ["connecting", "open"]
        assert seen[2] == {"state": "reconnecting", "attempt": 1, "delay": seen[2]["delay"], "cause": "keepalive",
                           "code": 4000, "reason": "keepalive timeout"}
        assert seen_at[2] - seen_at[1] >= 600 - 1  # a ping's interval, then a pong's wait


def test_browser_client_gives_up_after_max_retries_until_reconnect_is_called(browser: Browser,
                                                                             page_server: Server) -> None:
    with flaky_gateway(0, 0, 0, None) as (url, attempts):
        page = open_console(browser, page_server)
        start_probe(page, url, initialDelay=100, maxRetries=2)
        page.evaluate("probe.connect()")
        seen = wait_seen(page, 1, "closed")
        assert [wait["attempt"] for wait in waits(seen)] == [1, 2]
        assert seen[-1] == {"state": "closed", "gaveUp": True, "attempt": 2, "cause": "close",
                            "code": 1011, "reason": "flaky"}
        assert len(attempts.opened) == 3  # the first try and two retries
        page.evaluate("probe.reconnect()")  # still works once it has given up
        seen = wait_seen(page, 4, "open")
        assert seen[-2:] == [{"state": "connecting", "attempt": 0},
                             {"state": "open", "clientId": "flaky-3", "recovered": None}]
        assert len(attempts.opened) == 4


def test_browser_client_retries_at_once_when_the_browser_comes_back_online(browser: Browser,
                                                                          page_server: Server) -> None:
    with flaky_gateway(0, None) as (url, attempts):
        page = open_console(browser, page_server)
        start_probe(page, url, initialDelay=60_000, maxDelay=60_000)
        page.evaluate("probe.connect()")
        page.wait_for_function("seen.some((s) => s.delay !== undefined)", timeout=TIMEOUT * 1000)
        page.context.set_offline(True)
        page.context.set_offline(False)
        seen = wait_seen(page, 2, "open")  # long before the 30 s or more it was to wait
        dropped, online = waits(seen)
        assert (dropped["attempt"], dropped["cause"]) == (1, "close") and dropped["delay"] >= 30_000
        assert (online["attempt"], online["cause"], online["delay"]) == (1, "online", 0)
        assert len(attempts.opened) == 2


def test_browser_console_reconnect_button_replaces_the_connection_at_once(browser: Browser) -> None:
    with run_server("--log-level", "warning") as server:
        page = open_console(browser, server)
        first_id = client_id_of(page)
        page.fill("#room", "lobby")
        page.press("#room", "Enter")
        log_entry(page, "joined")
        page.click("#reconnect")
        page.wait_for_function("([id]) => document.getElementById('client-id').textContent !== id",
                               arg=[first_id], timeout=TIMEOUT * 1000)
        second_id = client_id_of(page)
        assert page.locator("#state").inner_text() == "open"
        page.locator("#log li", has_text="joined").nth(1).wait_for(timeout=TIMEOUT * 1000)
        # The old connection is gone from the server, not left open beside the new one.
        until(lambda: [c["client_id"] for c in server.get("/api/clients").json()["clients"]] == [second_id],
              "the server to list only the new connection")
        assert server.get(f"/api/clients/{second_id}").json()["rooms"] == ["lobby"]
        assert server.metric("ws_micro_connections_total") == 2


# Tokens: the page and the JS client against the gateway's --jwt-secret (JWT_SECRET, tokens from mint()).


def wait_state(page: Page, state: str) -> None:
    page.wait_for_function("([state]) => document.getElementById('state').dataset.state === state",
                           arg=[state], timeout=TIMEOUT * 1000)


def test_browser_page_connects_with_a_token_from_its_fragment_and_takes_it_out_of_the_address_bar(
        browser: Browser, tmp_path: Path) -> None:
    token, log = mint(), tmp_path / "server.log"
    with run_server("--log-level", "info", "--jwt-secret", JWT_SECRET, log=log) as server:
        page = browser.new_context().new_page()
        page.goto(f"{server.http}/#token={token}")  # a fragment: the browser never sends it to the server
        wait_state(page, "open")
        assert page.locator("#user").inner_text() == "alice"
        assert page.evaluate("wsMicroClient.user") == "alice"
        assert page.evaluate("location.href") == f"{server.http}/"  # not in the address bar, nor bookmarked
        assert page.input_value("#token") == token  # kept for the page's next tries
        send_from(page, "builtin", "", "ping", '{"n": 1}')
        log_entry(page, "pong")
    text = log.read_text()
    assert '"GET / HTTP/1.1" 200' in text  # the access log was on, and saw the page's requests
    assert token not in text and token.split(".")[2] not in text


@pytest.mark.parametrize("kind", ["none", "expired", "wrong-secret"])
def test_browser_page_shows_a_refused_token_and_tries_no_more_until_retried(browser: Browser, kind: str) -> None:
    token = {"none": None, "expired": mint(lifetime=-60),
             "wrong-secret": mint(key="another-secret-of-32-bytes-or-more")}[kind]
    with run_server("--log-level", "warning", "--jwt-secret", JWT_SECRET) as server:
        page = browser.new_context().new_page()
        page.clock.install()  # the page's timers run in real time, and are fast-forwarded below
        page.goto(f"{server.http}/" + (f"#token={token}" if token else ""))
        wait_state(page, "refused")
        refused = server.metric("ws_micro_rejected_handshakes_total", reason="unauthorized")
        assert 1 <= refused <= 2  # the handshake, and perhaps the page's one GET asking why
        # Five minutes later by the page's clock, any retry would have come (the waits are 10 s at most).
        page.clock.run_for(5 * 60_000)
        assert page.evaluate("wsMicroClient.state") == "refused"
        assert server.metric("ws_micro_rejected_handshakes_total", reason="unauthorized") == refused
        # The page says what the gateway answers the same request.
        answer = server.get("/ws/py_client", params={"token": token} if token else {})
        assert (answer.status_code, answer.json()["error"]["code"]) == (401, "unauthorized")
        assert page.locator("#state").inner_text() == "refused: 401 unauthorized"
        assert page.locator("#refusal-status").inner_text() == "401 unauthorized"
        assert page.locator("#refusal-message").inner_text() == answer.json()["error"]["message"]
        # The token field is open beside the refusal: a new token, then Retry.
        page.fill("#token", mint())
        page.click("#retry")
        wait_state(page, "open")
        assert page.locator("#user").inner_text() == "alice"
        assert page.locator("#refusal").is_hidden()


def test_browser_client_gets_a_fresh_token_from_its_function_for_every_try(browser: Browser) -> None:
    minted: list[str] = []
    expired = False  # when set, the next tokens have expired already

    def fresh_token() -> str:  # the app's own token endpoint, say
        minted.append(mint({"sub": f"user-{len(minted) + 1}"}, lifetime=-60 if expired else 60))
        return minted[-1]

    with run_server("--log-level", "warning", "--jwt-secret", JWT_SECRET, "--max-message-size", "1024") as server:
        page = browser.new_context().new_page()
        page.expose_function("fetchFreshToken", fresh_token)  # JS gets a Promise of its answer
        page.goto(f"{server.http}/healthz")  # this origin, without the console's own client
        page.evaluate("""async (url) => {
            const { Client } = await import("/static/ws_micro.js");
            window.seen = [];
            window.probe = new Client(url, { initialDelay: 100, token: () => fetchFreshToken() });
            probe.onState((state, detail) => seen.push({ state, ...detail, user: probe.user }));
            probe.connect();
        }""", server.ws)
        assert wait_seen(page, 1, "open")[-1]["user"] == "user-1"
        page.evaluate("probe.send('echo', { pad: 'x'.repeat(2000) })")  # too large: the server closes (1009)
        seen = wait_seen(page, 2, "open")
        assert [(wait["cause"], wait["code"]) for wait in waits(seen)] == [("close", 1009)]
        assert seen[-1]["user"] == "user-2" and len(minted) == 2  # the retry asked for a token of its own
        expired = True
        page.evaluate("probe.send('echo', { pad: 'x'.repeat(2000) })")
        seen = wait_seen(page, 1, "refused")
        assert {key: seen[-1][key] for key in ("status", "code")} == {"status": 401, "code": "unauthorized"}
        assert page.evaluate("probe.refusal.status") == 401 and len(minted) == 3
        expired = False
        page.evaluate("probe.reconnect()")  # the app, once it can get a good token again
        assert wait_seen(page, 3, "open")[-1]["user"] == "user-4"
        assert len(minted) == 4


def test_browser_client_on_another_origin_learns_why_it_was_refused(browser: Browser) -> None:
    with run_server("--log-level", "warning") as site, run_server(
            "--log-level", "warning", "--jwt-secret", JWT_SECRET, "--allowed-origins", site.http) as gateway:
        page = browser.new_context().new_page()
        page.goto(f"{site.http}/healthz")  # a page of another origin, which the gateway allows
        start_probe(page, gateway.ws, token=mint(lifetime=-60))
        page.evaluate("probe.connect()")
        # Its GET asking why went cross-origin with credentials: the answer let the page read it.
        refused = wait_seen(page, 1, "refused")[-1]
        assert (refused["status"], refused["code"]) == (401, "unauthorized")
        start_probe(page, gateway.ws, token=mint())
        page.evaluate("probe.connect()")
        wait_seen(page, 1, "open")
        assert page.evaluate("probe.user") == "alice"


# Connection recovery: the page and the JS client against a gateway with --recovery-window, which they
# reach through a CuttingProxy that the test cuts as a network failure would.


def news(n: int) -> dict[str, Any]:
    return {"event": "news", "data": {"data": {"n": n}}}


def log_lines(page: Page) -> list[str]:
    """The page's log, oldest first."""
    return list(reversed(page.eval_on_selector_all("#log li", "items => items.map((item) => item.textContent)")))


def news_seen(page: Page) -> list[int]:
    """The ``news`` frames in the page's log, oldest first, by their n."""
    return [int(match[1]) for line in log_lines(page) if (match := re.fullmatch(r'news to me\{"n":(\d+)\}', line))]


def wait_for_a_failed_retry(page: Page) -> None:
    """Wait until the page has said that a retry failed too: its badge counts a second attempt."""
    page.wait_for_function(r"""/reconnecting in .*\(attempt ([2-9]|\d\d+)\)$/
                               .test(document.getElementById('state').textContent)""", timeout=TIMEOUT * 1000)


def test_browser_client_comes_back_as_itself_with_every_frame_it_missed_after_its_connection_drops(
        browser: Browser, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with (run_server("--log-level", "info", "--recovery-window", "120", log=log) as server,
          CuttingProxy(server.port) as proxy):
        page = browser.new_context().new_page()
        sockets: list[str] = []  # the URL of each WebSocket the page opened
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.goto(proxy.http + "/")
        wait_state(page, "open")
        client_id = client_id_of(page)
        page.fill("#room", "lobby")
        page.press("#room", "Enter")
        log_entry(page, "joined")
        assert server.post(f"/api/clients/{client_id}", news(0)).json() == {"delivered": 1}
        log_entry(page, '{"n":0}')

        # The network fails: first what the gateway sends is lost on its way (n 1, which the gateway wrote to
        # a connection it still had); then the connection is gone, and no close frame, not even a FIN,
        # reaches either end; and the network stays down a while.
        proxy.stall()
        assert server.post(f"/api/clients/{client_id}", news(1)).json() == {"delivered": 1}
        proxy.cut(hold=True)
        wait_for_a_failed_retry(page)
        until(lambda: server.metric("ws_micro_sessions_away") == 1, "the gateway to keep the session")
        for path, n in ((f"/api/clients/{client_id}", 2), ("/api/rooms/lobby", 3), ("/api/broadcast", 4)):
            assert server.post(path, news(n)).json() == {"delivered": 1}, path  # kept for it
        assert news_seen(page) == [0]
        proxy.release()  # the network is back: the page gets through by itself

        page.locator("#session", has_text="session recovered").wait_for(timeout=TIMEOUT * 1000)
        assert page.locator("#state").inner_text() == "open"
        assert client_id_of(page) == client_id
        assert page.evaluate("wsMicroClient.recovered") is True
        assert server.post(f"/api/clients/{client_id}", news(5)).json() == {"delivered": 1}
        log_entry(page, '{"n":5}')
        # Every frame it missed, once each and in order, then the new one; what it had got, not again.
        assert news_seen(page) == [0, 1, 2, 3, 4, 5]
        lines = log_lines(page)
        recovered = lines.index("session recovered: same id, same rooms; the 4 frame(s) it missed follow")
        assert lines[recovered - 1].startswith("connect to me") and '"recovered":true' in lines[recovered - 1]
        assert lines[recovered + 1] == 'news to me{"n":1}'
        # Still in its room, which it did not join again: one "joined" only.
        assert page.locator("#log li", has_text="joined").count() == 1
        assert server.get(f"/api/clients/{client_id}").json()["rooms"] == ["lobby"]
        assert [room.inner_text() for room in page.locator("#rooms li button.link").all()] == ["lobby"]
        assert server.post("/api/rooms/lobby", news(6)).json() == {"delivered": 1}
        log_entry(page, '{"n":6}')

        # Its tries since the drop each carried the first connection's token and how many frames it had
        # got since (joined, and n 0); the token is nowhere on the page, its address or its storage.
        resumes = [dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)) for url in sockets[1:]]
        assert len(resumes) >= 2 and all(resume.keys() == {"resume_token", "resume_offset"} for resume in resumes)
        assert {(resume["resume_token"].split(".")[0], resume["resume_offset"]) for resume in resumes} == {
            (client_id, "2")}
        token = resumes[0]["resume_token"]
        assert len({resume["resume_token"] for resume in resumes}) == 1
        assert token not in page.content() and "resume_token" not in page.content()
        assert page.evaluate("location.href") == proxy.http + "/"
        assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    text = log.read_text()
    assert "WebSocket /ws/py_client" in text  # the access log was on, and saw the page's handshakes
    assert token.split(".")[1] not in text


def test_browser_client_back_in_its_session_changes_only_the_rooms_it_changed_while_away(browser: Browser) -> None:
    with (run_server("--log-level", "warning", "--recovery-window", "120") as server,
          CuttingProxy(server.port) as proxy):
        page = browser.new_context().new_page()
        page.goto(proxy.http + "/")
        wait_state(page, "open")
        client_id = client_id_of(page)
        for room in ("lobby", "news"):
            page.fill("#room", room)
            page.press("#room", "Enter")
        page.locator("#log li", has_text="joined").nth(1).wait_for(timeout=TIMEOUT * 1000)
        proxy.cut(hold=True)
        wait_for_a_failed_retry(page)
        page.evaluate("wsMicroClient.leave('news'); wsMicroClient.join('sport')")  # while it cannot send them
        proxy.release()
        page.locator("#session", has_text="session recovered").wait_for(timeout=TIMEOUT * 1000)
        log_entry(page, '{"room":"news","members":0}')
        log_entry(page, '{"room":"sport","members":1}')
        assert server.get(f"/api/clients/{client_id}").json()["rooms"] == ["lobby", "sport"]
        assert page.locator("#log li", has_text="joined").count() == 3  # lobby, news, then sport: lobby not again
        assert [room.inner_text() for room in page.locator("#rooms li button.link").all()] == ["lobby", "sport"]


@contextlib.contextmanager
def page_in_lobby(browser: Browser, window: str) -> Iterator[tuple[Server, CuttingProxy, Page, list[str]]]:
    """A console page behind a cutting proxy, in room lobby, with recovery on; the URLs of its sockets."""
    with (run_server("--log-level", "warning", "--recovery-window", window) as server,
          CuttingProxy(server.port) as proxy):
        page = browser.new_context().new_page()
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.goto(proxy.http + "/")
        wait_state(page, "open")
        page.fill("#room", "lobby")
        page.press("#room", "Enter")
        log_entry(page, "joined")
        yield server, proxy, page, sockets


def resume_tokens(sockets: list[str]) -> list[str | None]:
    return [dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)).get("resume_token") for url in sockets]


def test_browser_client_recovers_its_session_when_the_answer_to_its_resume_is_lost(browser: Browser) -> None:
    with page_in_lobby(browser, "120") as (server, proxy, page, sockets):
        client_id = client_id_of(page)
        # Its first try gets through and the gateway takes its token; then the network fails before the page
        # sees the answer, with the next token. Its next try brings the same token, which is as good again
        # once that connection has dropped: the session is not lost to one lost packet.
        proxy.cut(upgrades=1)
        page.locator("#session", has_text="session recovered").wait_for(timeout=TIMEOUT * 1000)
        assert client_id_of(page) == client_id and page.evaluate("wsMicroClient.recovered") is True
        assert server.post("/api/rooms/lobby", news(1)).json()["delivered"] == 1
        log_entry(page, '{"n":1}')
        tokens = resume_tokens(sockets)
        assert tokens[0] is None and len(tokens) == 3 and tokens[1] == tokens[2]
        assert page.locator("#log li", has_text="joined").count() == 1  # its room kept, not joined again
        assert page.locator("#refusal").is_hidden()


def test_browser_client_starts_a_new_session_when_its_own_cannot_be_resumed(browser: Browser) -> None:
    with page_in_lobby(browser, "0.5") as (server, proxy, page, sockets):
        first_id = client_id_of(page)
        proxy.cut(hold=True)
        until(lambda: server.metric("ws_micro_sessions_total", outcome="expired") == 1,
              "the session to end when the window passed")
        proxy.release()

        page.locator("#session", has_text="new session").wait_for(timeout=TIMEOUT * 1000)
        second_id = client_id_of(page)
        assert second_id != first_id and page.evaluate("wsMicroClient.recovered") is False
        assert "new session: new id; frames sent meanwhile are lost, resynchronise" in log_lines(page)
        # It joined its room again, as in a new session it must.
        page.locator("#log li", has_text="joined").nth(1).wait_for(timeout=TIMEOUT * 1000)
        assert server.get(f"/api/clients/{second_id}").json()["rooms"] == ["lobby"]
        assert server.post("/api/rooms/lobby", news(1)).json()["delivered"] >= 1
        log_entry(page, '{"n":1}')
        assert page.evaluate("wsMicroClient.offset") == 2  # counted from the new session's connect frame
        tokens = resume_tokens(sockets)
        assert tokens[0] is None and str(tokens[1]).startswith(first_id + ".")
        # Every try brought it, the last one too: the gateway answered that one with a new session.
        assert len(set(tokens[1:])) == 1
        assert server.metric("ws_micro_sessions_total", outcome="not_recovered") == 1
        assert page.locator("#refusal").is_hidden()


# Requests and replies: the JS client's request(), against a gateway whose handlers reply (REPLYING_APP).


def test_browser_client_request_resolves_with_its_answer_and_rejects_on_error_timeout_and_close(
        browser: Browser, tmp_path: Path) -> None:
    with replying_server(tmp_path, env={"WS_MICRO_RATE_BURST": "5000"}) as server:  # room for 1000 requests at once
        page = browser.new_context().new_page()
        page.goto(f"{server.http}/healthz")  # this origin, without the console's own client
        results = page.evaluate("""async (url) => {
            const { Client, RequestError } = await import("/static/ws_micro.js");
            window.failure = (error) => ({ name: error.name, code: error.code, message: error.message,
                                           isRequestError: error instanceof RequestError, answer: error.answer });
            window.opened = (client) => new Promise((resolve) => {
                client.onState((state) => { if (state === "open") resolve(); });
                client.connect();
            });
            window.a = new Client(url, { keepalive: 0 });
            window.handed = [];  // what its on() handlers got
            a.on("*", (frame) => handed.push(frame));
            const early = await a.request("ping").catch(failure);
            await opened(a);
            return {
                early,
                pong: await a.request("ping", { n: 1 }),
                sum: await a.request("add", { numbers: [1, 2] }),
                error: await a.request("nothing").catch(failure),
                timeout: await a.request("quiet", {}, { timeout: 200 }).catch(failure),
                handed: handed.map((frame) => frame.event),
            };
        }""", server.ws)
        me = page.evaluate("a.clientId")
        assert results["early"] == {"name": "RequestError", "code": "not_connected", "isRequestError": True,
                                    "message": "not_connected: not connected (state closed)", "answer": None}
        assert results["pong"] == {**frame("pong", me, {"n": 1}), "id": 1}
        assert results["sum"] == {**frame("add", me, {"sum": 3, "id": 2}), "id": 2}
        assert results["error"] == {
            "name": "RequestError", "code": "unknown_event", "isRequestError": True,
            "message": "unknown_event: no handler for event 'nothing'",
            "answer": {**frame("error", me, {"code": "unknown_event", "message": "no handler for event 'nothing'",
                                             "event": "nothing"}), "id": 3}}
        assert results["timeout"] == {"name": "RequestError", "code": "timeout", "isRequestError": True,
                                      "message": "timeout: no answer to quiet (id 4) within 200 ms", "answer": None}
        assert results["handed"] == ["connect"]  # the answers went to their requests only

        # A frame another client relays with the id of a request waiting is no answer: it carries its sender's id.
        page.evaluate("""() => {
            window.settled = null;
            a.request("quiet", {}, { timeout: 30000 }).then((frame) => { settled = { frame }; },
                                                           (error) => { settled = failure(error); });
        }""")
        with connect_sync(server.ws) as other:
            id_other = json.loads(other.recv(TIMEOUT))["client_id"]
            other.send(json.dumps({**frame("chat", id_other, {"n": 1}, to=me), "id": 5}))
            page.wait_for_function("handed.some((frame) => frame.event === 'chat')", timeout=TIMEOUT * 1000)
        assert page.evaluate("handed.at(-1).id") == 5 and page.evaluate("settled") is None
        # The gateway closes the connection: the request waiting is rejected with it.
        assert httpx.delete(f"{server.http}/api/clients/{me}", timeout=TIMEOUT).status_code == 202
        page.wait_for_function("settled !== null", timeout=TIMEOUT * 1000)
        assert page.evaluate("settled") == {
            "name": "RequestError", "code": "closed", "isRequestError": True, "answer": None,
            "message": "closed: the connection closed (1000) before the answer came"}

        # At most MAX_PENDING_REQUESTS wait at once; close() rejects them all, and none is left.
        bounded = page.evaluate("""async (url) => {
            const { Client, MAX_PENDING_REQUESTS } = await import("/static/ws_micro.js");
            const b = new Client(url, { keepalive: 0 });
            await opened(b);
            const waiting = Array.from({ length: MAX_PENDING_REQUESTS },
                                       () => b.request("quiet", {}, { timeout: 30000 }).catch((error) => error.code));
            const over = await b.request("ping").catch(failure);
            b.close();
            const codes = await Promise.all(waiting);
            return { max: MAX_PENDING_REQUESTS, over, closed: codes.filter((code) => code === "closed").length,
                     left: b._requests.size };
        }""", server.ws)
        assert bounded == {"max": 1000, "closed": 1000, "left": 0, "over": {
            "name": "RequestError", "code": "too_many_requests", "isRequestError": True, "answer": None,
            "message": "too_many_requests: 1000 requests are waiting for their answers already"}}


def test_browser_client_rooms_follow_the_servers_joins_and_leaves(browser: Browser, tmp_path: Path) -> None:
    # The host app with lifecycle hooks: its on_connect joins the rooms the token's meta names, and its
    # /members route calls Registry.join() and leave().
    with run_server("--log-level", "warning", uvicorn_app="hooks:app", cwd=tmp_path,
                    env=hooks_app(tmp_path)) as server:
        page = browser.new_context().new_page()
        page.goto(f"{server.http}/healthz")
        page.evaluate("""async ([url, token]) => {
            const { Client } = await import("/static/ws_micro.js");
            window.a = new Client(url, { keepalive: 0, token });
            await new Promise((resolve) => {
                a.onState((state) => { if (state === "open") resolve(); });
                a.connect();
            });
        }""", [server.ws, mint({"sub": "alice", "meta": {"rooms": ["lobby"]}})])
        page.wait_for_function("a.rooms.has('lobby')", timeout=TIMEOUT * 1000)  # joined by on_connect
        me = page.evaluate("a.clientId")
        assert httpx.put(f"{server.http}/members/{me}/news", timeout=TIMEOUT).json() == {"found": True}
        page.wait_for_function("a.rooms.has('news')", timeout=TIMEOUT * 1000)
        assert httpx.delete(f"{server.http}/members/{me}/lobby", timeout=TIMEOUT).json() == {"found": True}
        page.wait_for_function("!a.rooms.has('lobby')", timeout=TIMEOUT * 1000)
        assert sorted(page.evaluate("[...a.rooms]")) == ["news"]
