"""The chat page (``GET /``) in headless Chromium, driven by Playwright,
against a live daphne with the real SDK and CLI and the offline model.

One browser and one server (``OMNI_AUTH=off``) for the module; the login test
has a second server with ``OMNI_AUTH=required``, the budget test a third with
a daily budget (``OMNI_DAILY_BUDGET_USD``). Every test opens a fresh
browser context with a resource id of its own and fails on any uncaught page
error. Debian's Chromium (``/usr/bin/chromium``, ``make browser`` installs it):
missing, the tests skip, or fail under ``CI=true``.

Run: ``.venv/bin/python -m pytest tests/test_page.py``
"""

import json
import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import ci
from tests.e2e import ROOT, Server, new_id, python_bin, reply, serving

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]

CHROMIUM = os.environ.get("OMNI_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
# README's screenshot: written when OMNI_UPDATE_SCREENSHOT=1 (a plain test run
# leaves the committed file alone).
SCREENSHOT = ROOT / "docs" / "page.png"
TIMEOUT_MS = 30_000


def unavailable(why: str):
    if ci():
        pytest.fail(f"{why} (CI=true: the browser tests must run)")
    pytest.skip(why)


try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - requirements.txt pins it
    expect = sync_playwright = None


class PageServer(Server):
    """A daphne server in a given ``OMNI_AUTH`` mode."""

    def __init__(self, data_dir, database_url, auth: str = "off", env: dict[str, str] | None = None):
        # no shutdown grace: a stopped server goes away mid-turn, as the
        # reconnect test needs
        # the websocket's caller checked again on every frame (logout test)
        super().__init__(data_dir, database_url, {"OMNI_AUTH": auth, "OMNI_SHUTDOWN_GRACE_SECONDS": "0",
                                                  "OMNI_WS_RECHECK_SECONDS": "0", **(env or {})})
        self.auth = auth

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def create_user(self, username: str, password: str) -> None:
        code = ("from django.contrib.auth import get_user_model; "
                f"get_user_model().objects.create_user({username!r}, password={password!r})")
        done = subprocess.run([python_bin(), "manage.py", "shell", "-c", code],
                              cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


class DroppingProxy:
    """A TCP proxy in front of a server that can drop every open connection
    at once, as a network or a load balancer does, while the server (and its
    running turns) carries on."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self):
        with self.lock:
            dropped, self.open = self.open, []
        for s in dropped:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()
        self.drop()


def serve(tmp_path_factory, auth: str, env: dict[str, str] | None = None):
    yield from serving(tmp_path_factory, PageServer, auth=auth, env=env)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory, "off")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    yield from serve(tmp_path_factory, "required")


# A turn of the offline model costs more than this: one turn goes through, the next is refused.
DAILY_BUDGET = "0.0005"


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory):
    yield from serve(tmp_path_factory, "off", {"OMNI_DAILY_BUDGET_USD": DAILY_BUDGET})


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        unavailable("playwright is not installed (pip install -r requirements.txt)")
    if not Path(CHROMIUM).exists():
        unavailable(f"no Chromium at {CHROMIUM} (make browser installs Debian's chromium)")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Tab:
    """A page in a fresh browser context, with its uncaught errors and
    dialogs (alert, confirm...) recorded."""

    def __init__(self, browser, resource: str | None, viewport=None, **context_options):
        # context_options: Playwright's, e.g. timezone_id, locale
        self.context = browser.new_context(viewport=viewport or {"width": 1280, "height": 800},
                                           **context_options)
        self.context.set_default_timeout(TIMEOUT_MS)
        if resource:
            self.context.add_init_script(f"localStorage.setItem('omni.resourceId', {resource!r});")
        self.resource = resource
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.frames: list[str] = []  # websocket frames from the server
        self.sent: list[str] = []  # websocket frames to the server
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("dialog", self._dialog)
        self.page.on("websocket", self._websocket)

    def _websocket(self, ws):
        ws.on("framereceived", lambda payload: self.frames.append(payload))
        ws.on("framesent", lambda payload: self.sent.append(payload))

    def _dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def close(self):
        self.context.close()


@pytest.fixture
def tabs(browser):
    """Opens tabs; at the end, none had an uncaught error."""
    opened: list[Tab] = []

    def open_tab(resource: str | None = None, **kwargs) -> Tab:
        tab = Tab(browser, resource if resource is not None else new_id("user"), **kwargs)
        opened.append(tab)
        return tab

    yield open_tab
    errors = [e for tab in opened for e in tab.errors]
    for tab in opened:
        tab.close()
    assert errors == [], f"uncaught page errors: {errors}"


@pytest.fixture(autouse=True)
def no_cli_left(request):
    """After every test, every CLI process below the servers it used is one
    their pool accounts for (a warm client or spare), none left over."""
    yield
    for name in ("server", "auth_server", "budget_server"):
        if name in request.fixturenames:
            live = request.getfixturevalue(name)
            assert live.unaccounted_cli(timeout=15) == [], "a CLI process the pool does not know of"


# --- helpers -------------------------------------------------------------------------

def open_page(tab: Tab, server: PageServer):
    page = tab.page
    page.goto(server.url())
    expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    return page


def send(page, text: str) -> None:
    box = page.get_by_label("Message")
    box.fill(text)
    box.press("Enter")


def assistant(page):
    return page.locator("#messages .message.assistant")


def wait_turn_end(page) -> None:
    """The turn ended and the page drew the stored conversation."""
    expect(page.locator("#messages .message.streaming")).to_have_count(0)
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#messages")).not_to_have_attribute("aria-busy", "true")


def ask(page, text: str, *earlier: str) -> None:
    """Send ``text`` and wait for the offline model's whole answer."""
    send(page, text)
    expect(assistant(page).last.locator(".text")).to_have_text(reply(text, *earlier))
    wait_turn_end(page)


def texts(page) -> list[tuple[str, str]]:
    items = page.locator("#messages .message")
    return [
        ("user" if "user" in (items.nth(i).get_attribute("class") or "") else "assistant",
         items.nth(i).locator(".text").inner_text())
        for i in range(items.count())
    ]


def current_thread(page) -> str:
    match = re.search(r"#thread=(.+)$", page.url)
    assert match, page.url
    return match.group(1)


def thread_item(page, thread_id: str):
    return page.locator(f'#threads [data-thread-id="{thread_id}"]')


def usd(amount: float) -> str:
    """An amount as the page writes it (ui.js formatUsd)."""
    if amount >= 1 or amount == 0:
        return f"${amount:.2f}"
    if amount < 0.0001:
        return "<$0.0001"
    return "$" + re.sub(r"(\.\d\d\d??)0+$", r"\1", f"{amount:.4f}")


def thread_cost(server, thread_id: str, resource: str) -> float:
    status, data = server.metadata(thread_id, resource)
    assert status == 200, data
    return data["session"]["costUsd"]


def no_chunks(tab: Tab) -> None:
    """The page's turn frames say "chunks": false, and no chunk event came."""
    starts = [json.loads(f) for f in tab.sent if '"message"' in f or '"fork"' in f]
    starts = [f for f in starts if f.get("type") in ("message", "fork")]
    assert starts and all(f.get("chunks") is False for f in starts), starts
    kinds = [json.loads(f).get("type") for f in tab.frames]
    assert "done" in kinds and "chunk" not in kinds, kinds


def stored_messages(server, thread_id: str, resource: str) -> list[tuple[str, str]]:
    status, data = server.get_json("/api/sessions/messages", threadId=thread_id, resourceId=resource)
    assert status == 200, data
    return [(m["role"], m["text"]) for m in data["messages"]]


# --- tests -------------------------------------------------------------------------

def test_send_streams_and_a_follow_up_remembers(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    box = page.get_by_label("Message")
    # Shift+Enter adds a line; Enter sends.
    box.fill("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert box.input_value() == "line one\nline two"
    expect(page.locator("#messages .message")).to_have_count(0)
    assert page.evaluate("document.activeElement.id") == "message"

    agents = page.locator("#agent option")
    assert agents.all_inner_texts() == ["smart", "datadog", "correlator"]  # the server's presets
    page.get_by_label("Agent").select_option("datadog")
    ask(page, "What is 2+2?")
    thread = current_thread(page)
    # The answer streamed over the websocket in pieces.
    events = [f for f in tab.frames if '"type": "text"' in f or '"type":"text"' in f]
    assert len(events) >= 2, tab.frames
    item = thread_item(page, thread)
    expect(item).to_have_count(1)
    expect(item.locator(".thread-title")).to_have_text("What is 2+2?")
    expect(item).to_have_attribute("aria-current", "true")
    expect(page.locator("#thread-title")).to_have_text("What is 2+2?")

    ask(page, "What was my last question?", "What is 2+2?")
    assert texts(page) == [
        ("user", "What is 2+2?"), ("assistant", reply("What is 2+2?")),
        ("user", "What was my last question?"),
        ("assistant", reply("What was my last question?", "What is 2+2?")),
    ]
    assert [(s["threadId"], s["messageCount"], s["agent"])
            for s in server.sessions(tab.resource)["sessions"]] == [(thread, 4, "datadog")]
    # The thread's cost and the day's spend (no budget on this server); no chunk events.
    cost = thread_cost(server, thread, tab.resource)
    assert cost > 0
    expect(page.locator("#thread-cost")).to_have_text(usd(cost))
    expect(page.locator("#spend")).to_have_text(f"Today {usd(cost)} (no cap)")
    no_chunks(tab)


def test_reload_restores_and_follows_a_running_turn(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    ask(page, "First question")
    thread = current_thread(page)
    page.reload()
    expect(page.locator("#messages .message")).to_have_count(2)
    assert texts(page) == [("user", "First question"), ("assistant", reply("First question"))]
    expect(thread_item(page, thread)).to_have_attribute("aria-current", "true")

    slow = "[slow] keep talking"
    send(page, slow)
    expect(assistant(page).last.locator(".text")).to_contain_text("Offline")
    page.reload()
    # Still running after the reload: the page follows it and shows the rest.
    expect(page.locator("#messages .message.streaming")).to_have_count(1)
    expect(page.locator("#stop")).to_be_visible()
    expect(assistant(page).last.locator(".text")).to_have_text(reply(slow, "First question"))
    wait_turn_end(page)
    assert texts(page)[-2:] == [("user", slow), ("assistant", reply(slow, "First question"))], (texts(page), [f[:90] for f in tab.frames if "chunk" not in f[:20]])


def test_fork_from_the_thread_and_from_an_earlier_message(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    q1, q2 = "What is 2+2?", "What was my last question?"
    ask(page, q1)
    ask(page, q2, q1)
    parent = current_thread(page)

    # Fork the whole thread.
    page.get_by_role("button", name="Fork", exact=True).click()
    expect(page.locator("#fork-banner")).to_be_visible()
    ask(page, "Now multiply instead", q1, q2)
    expect(page.locator("#fork-banner")).to_be_hidden()
    fork1 = current_thread(page)
    assert fork1 != parent
    item = thread_item(page, fork1)
    expect(item).to_have_attribute("aria-current", "true")
    badge = item.locator(".fork-badge")
    expect(badge).to_have_attribute("href", f"#thread={parent}")
    expect(page.locator("#thread-origin")).to_contain_text("Forked from")
    assert len(texts(page)) == 6

    # Back to the parent through the badge, then fork from its first answer.
    badge.click()
    expect(thread_item(page, parent)).to_have_attribute("aria-current", "true")
    expect(page.locator("#messages .message")).to_have_count(4)
    assistant(page).first.get_by_role("button", name=re.compile("Fork")).click()
    branch = "Branch at the first answer"
    ask(page, branch, q1)
    fork2 = current_thread(page)
    assert fork2 not in (parent, fork1)
    ask(page, "And then?", q1, branch)
    assert texts(page) == [
        ("user", q1), ("assistant", reply(q1)), ("user", branch), ("assistant", reply(branch, q1)),
        ("user", "And then?"), ("assistant", reply("And then?", q1, branch)),
    ]
    expect(page.locator("#threads [data-thread-id]")).to_have_count(3)
    expect(thread_item(page, fork2).locator(".fork-badge")).to_have_attribute("href", f"#thread={parent}")

    # The branches stay independent.
    thread_item(page, parent).locator(".thread-open").click()
    expect(page.locator("#messages .message")).to_have_count(4)
    assert stored_messages(server, parent, tab.resource) == [
        ("user", q1), ("assistant", reply(q1)), ("user", q2), ("assistant", reply(q2, q1))]
    assert len(stored_messages(server, fork1, tab.resource)) == 6
    shot = page.screenshot(path=str(SCREENSHOT) if os.environ.get("OMNI_UPDATE_SCREENSHOT") == "1" else None)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"


def test_stop_ends_the_running_turn(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    slow = "[slow] stop me please"
    send(page, slow)
    expect(assistant(page).last.locator(".text")).to_contain_text("Offline")
    page.get_by_role("button", name="Stop").click()
    expect(assistant(page).last.locator(".note")).to_have_text("stopped")
    wait_turn_end(page)
    assert len(assistant(page).last.locator(".text").inner_text()) < len(reply(slow))
    assert server.unaccounted_cli() == []
    # The thread takes the next message.
    send(page, "After the stop")
    expect(assistant(page).last.locator(".text")).to_contain_text('Offline model heard: "After the stop"')
    wait_turn_end(page)


def test_a_busy_thread_says_so(server, tabs):
    resource = new_id("user")
    first, second = tabs(resource), tabs(resource)
    page = open_page(first, server)
    ask(page, "Shared thread")
    thread = current_thread(page)
    other = second.page
    other.goto(server.url(f"/#thread={thread}"))
    expect(other.locator("#messages .message")).to_have_count(2)
    expect(other.locator("#connection")).to_have_attribute("data-state", "open")

    send(page, "[slow] taking a while")
    expect(assistant(page).last.locator(".text")).to_contain_text("Offline")
    send(other, "Me too")
    expect(other.get_by_role("alert")).to_contain_text("still answering")
    # Away and back while the turn runs: the whole reply is there in the end.
    page.get_by_role("button", name="New chat").click()
    expect(page.locator("#messages .message")).to_have_count(0)
    thread_item(page, thread).locator(".thread-open").click()
    expect(assistant(page).last.locator(".text")).to_have_text(
        reply("[slow] taking a while", "Shared thread"))
    wait_turn_end(page)
    wait_turn_end(other)
    assert len(texts(page)) == 4


def test_delete_asks_first(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    ask(page, "Soon gone")
    thread = current_thread(page)
    dialog = page.locator("#confirm-delete")

    page.get_by_role("button", name="Delete").click()
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(thread_item(page, thread)).to_have_count(1)
    assert server.metadata(thread, tab.resource)[0] == 200

    page.get_by_role("button", name="Delete").click()
    dialog.get_by_role("button", name="Delete").click()
    expect(thread_item(page, thread)).to_have_count(0)
    expect(page.locator("#messages .message")).to_have_count(0)
    expect(page.locator("#thread-title")).to_have_text("New conversation")
    assert "#thread=" not in page.url
    assert server.metadata(thread, tab.resource)[0] == 404
    assert tab.dialogs == []


def test_a_malformed_address_opens_a_new_conversation(server, tabs):
    """``#thread=%`` (a broken escape) is no thread: no uncaught error (the
    ``tabs`` fixture checks), a new conversation that works."""
    tab = tabs()
    page = tab.page
    for fragment in ("#thread=%", "#thread=%E0%A4%A", "#thread=a%2Fb"):
        page.goto(server.url() + fragment)
        expect(page.locator("#connection")).to_have_attribute("data-state", "open")
        expect(page.locator("#thread-title")).to_have_text("New conversation")
    ask(page, "Still fine?")


def test_a_deleted_running_turn_ends_on_the_page(server, tabs):
    """Deleting the thread whose reply is streaming stops it; the page's turn
    ends (the error names its thread) instead of staying "running"."""
    tab = tabs()
    page = open_page(tab, server)
    ask(page, "First")
    thread = current_thread(page)
    send(page, "Second [slow]")
    expect(page.locator("#messages .message.streaming")).to_have_count(1)
    status, _, _ = server.request("DELETE", "/api/sessions", {"threadId": thread, "resourceId": tab.resource},
                                  timeout=10)
    assert status == 200
    expect(page.locator("#stop")).to_be_hidden()
    assert any('"thread_deleted"' in f and thread in f for f in tab.frames)


def test_html_in_messages_is_shown_as_text(server, tabs):
    tab = tabs(viewport={"width": 390, "height": 800})  # a phone's width
    page = open_page(tab, server)
    # (not at the start: the offline model skips texts that open with a tag, as CLI notes do)
    payload = "Echo <img src=x onerror=alert(1)> <script>alert(2)</script> **bold** `code`"
    send(page, payload)
    wait_turn_end(page)
    # The model's echo, in text nodes, with the Markdown subset as elements.
    expect(assistant(page).last.locator(".text")).to_have_text(
        reply(payload).replace("**bold**", "bold").replace("`code`", "code"))
    user = page.locator("#messages .message.user").first.locator(".text")
    expect(user).to_contain_text("<img src=x onerror=alert(1)> <script>alert(2)</script>")
    expect(assistant(page).last.locator(".text strong")).to_have_text("bold")
    page.reload()
    expect(page.locator("#messages .message")).to_have_count(2)
    expect(assistant(page).last.locator(".text")).to_contain_text('<img src=x onerror=alert(1)>')
    expect(page.locator("#threads .thread-title")).to_contain_text("<img src=x")
    assert page.locator("main img, main script, nav img").count() == 0
    assert tab.dialogs == []
    # The phone layout: nothing wider than the screen, the composer in view.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    expect(page.get_by_role("button", name="Send")).to_be_in_viewport()


def test_a_dropped_websocket_reconnects(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    ask(page, "Before the restart")
    connection = page.locator("#connection")
    port = server.port

    # The server goes away mid-turn: it ends the turn (an error result, or
    # nothing more if the socket goes first), the page says it is
    # reconnecting, reconnects on its own and shows what was kept.
    send(page, "[slow] cut short")
    expect(assistant(page).last.locator(".text")).to_contain_text("Offline")
    server.stop()
    expect(connection).to_have_attribute("data-state", "down")
    expect(connection).to_contain_text("reconnecting")
    server.start(port=port)
    expect(connection).to_have_attribute("data-state", "open")
    expect(assistant(page).last.locator(".note")).to_have_text(
        re.compile("interrupted: the connection to the server was lost|ended with an error"))
    wait_turn_end(page)

    ask(page, "After the restart", "Before the restart", "[slow] cut short")


def test_a_dropped_connection_follows_the_running_turn(server, tabs):
    """The socket drops while the turn goes on in the server: the page
    reconnects, follows the turn and shows the rest of the reply, once."""
    proxy = DroppingProxy(server.port)
    try:
        tab = tabs()
        page = tab.page
        page.goto(proxy.url())
        connection = page.locator("#connection")
        expect(connection).to_have_attribute("data-state", "open")
        ask(page, "Before the drop")
        slow = "[slow] through a drop"
        send(page, slow)
        expect(assistant(page).last.locator(".text")).to_contain_text("Offline")
        proxy.drop()
        before = len(tab.frames)
        expect(connection).to_have_attribute("data-state", "down")
        expect(connection).to_have_attribute("data-state", "open")
        expect(assistant(page).last.locator(".text")).to_have_text(reply(slow, "Before the drop"))
        wait_turn_end(page)
        assert texts(page)[-2:] == [("user", slow), ("assistant", reply(slow, "Before the drop"))]
        follows = [f for f in tab.sent if '"follow"' in f]
        assert follows, tab.sent
        # The rest came through the follow (the turn was still running).
        after = [json.loads(f)["type"] for f in tab.frames[before:]]
        assert "text" in after and after[-1] == "done", after
    finally:
        proxy.close()


def test_login_required(auth_server, tabs):
    auth_server.create_user("alice", "wonderland-123")
    tab = tabs(resource="")
    page = tab.page
    page.goto(auth_server.url())
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("didn't match")
    page.get_by_label("Password").fill("wonderland-123")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(auth_server.url())
    expect(page.locator("#username")).to_have_text("alice")
    expect(page.locator("#resource-id")).to_have_count(0)
    expect(page.locator("#connection")).to_have_attribute("data-state", "open")

    ask(page, "Who am I?")  # the websocket runs as alice (session cookie)
    thread = current_thread(page)
    expect(thread_item(page, thread)).to_have_count(1)
    # Her own usage (GET /api/usage without a resourceId).
    expect(page.locator("#spend")).to_have_text(re.compile(r"^Today \$0\.\d+ \(no cap\)$"))
    expect(page.locator("#thread-cost")).to_have_text(re.compile(r"^\$0\.\d+$"))

    # Logged out in another tab: the page's next call sends her to log in,
    # and back to the thread.
    other = tab.context.new_page()
    other.goto(auth_server.url())
    other.get_by_role("button", name="Log out").click()
    expect(other).to_have_url(re.compile(r"/accounts/login/"))
    other.close()
    page.get_by_role("button", name="New chat").click()
    thread_item(page, thread).locator(".thread-open").click()
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next="))
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("wonderland-123")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(auth_server.url(f"/#thread={thread}"))
    expect(page.locator("#messages .message")).to_have_count(2)

    page.get_by_role("button", name="Delete").click()  # a REST call with X-CSRFToken
    page.locator("#confirm-delete").get_by_role("button", name="Delete").click()
    expect(thread_item(page, thread)).to_have_count(0)
    expect(page.locator("#error")).to_be_hidden()

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    page.goto(auth_server.url())
    expect(page).to_have_url(re.compile(r"/accounts/login/"))


def test_a_socket_closed_for_lost_credentials_sends_the_person_to_log_in(auth_server, tabs):
    """Logged out in another tab: the page's open websocket is closed with
    4401 at its next frame, and the page goes to the login instead of
    reconnecting with credentials that no longer work."""
    auth_server.create_user("bob", "builder-123")
    tab = tabs(resource="")
    page = tab.page
    page.goto(auth_server.url())
    page.get_by_label("Username").fill("bob")
    page.get_by_label("Password").fill("builder-123")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    other = tab.context.new_page()
    other.goto(auth_server.url())
    other.get_by_role("button", name="Log out").click()
    expect(other).to_have_url(re.compile(r"/accounts/login/"))
    other.close()
    send(page, "Am I still here?")  # a frame on the socket opened before the logout
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next="))


# --- tools and approvals -------------------------------------------------------------

def tool_marker(tool: str, **tool_input) -> str:
    """The offline model's marker: it calls ``mcp__omni__<tool>`` with this input."""
    return f"[tool {tool} {json.dumps(tool_input)}]"


def last_text(page):
    """The last piece of assistant text (a reply that used tools has several)."""
    return page.locator("#messages .message.assistant .text").last


def ask_to_delete(page, victim: str) -> tuple[str, object]:
    """Ask the agent to delete ``victim``; wait for the approval request.
    The message and the call's block."""
    text = "Delete it " + tool_marker("delete_conversation", threadId=victim)
    send(page, text)
    call = page.locator("#messages .tool-call")
    expect(call).to_have_count(1)
    expect(call.get_by_role("button", name="Allow")).to_be_visible()
    return text, call


def a_call_to_delete(page, first: str) -> tuple[str, str, object]:
    """A conversation (``first`` its message) and, in a new chat, a request
    to delete it waiting for a decision: the victim's thread, the message
    and the call's block."""
    ask(page, first)
    victim = current_thread(page)
    page.get_by_role("button", name="New chat").click()
    text, call = ask_to_delete(page, victim)
    return victim, text, call


def deleted_reply(victim: str, text: str) -> str:
    return f'Offline model got from mcp__omni__delete_conversation: "{{"deleted": "{victim}"}}". {reply(text)}'


def test_a_tool_call_waits_for_allow_then_runs(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    victim, text, call = a_call_to_delete(page, "A conversation to delete")
    thread = current_thread(page)

    # The call as it happens: its name, input, the request with its expiry.
    expect(call.locator(".tool-name")).to_have_text("delete_conversation")
    expect(call.locator(".tool-input")).to_contain_text(f'"threadId": "{victim}"')
    expect(call.locator(".tool-status")).to_have_text("waiting for your decision")
    expect(call.locator(".approval time")).to_have_attribute("datetime", re.compile(r"Z$"))
    expect(call.get_by_role("button", name="Deny")).to_be_visible()
    # Marked in the sidebar; the thread is busy meanwhile; nothing deleted yet.
    expect(thread_item(page, thread).locator(".approval-badge")).to_be_visible()
    expect(page.locator("#stop")).to_be_visible()
    expect(thread_item(page, victim)).to_have_count(1)
    assert server.metadata(victim, tab.resource)[0] == 200

    call.get_by_role("button", name="Allow").click()
    expect(call.get_by_role("button")).to_have_count(0)
    expect(call.locator(".approval-decision")).to_have_text(f"Allowed by {tab.resource}")
    expect(last_text(page)).to_have_text(deleted_reply(victim, text))
    wait_turn_end(page)
    expect(thread_item(page, victim)).to_have_count(0)
    assert server.metadata(victim, tab.resource)[0] == 404
    expect(thread_item(page, thread).locator(".approval-badge")).to_have_count(0)
    # Drawn again from the store: the call with its decision and result.
    expect(call).to_have_count(1)
    expect(call.locator(".tool-result")).to_contain_text(f'"deleted": "{victim}"')
    expect(call.locator(".tool-status")).to_have_text("done")
    expect(call.locator(".approval-decision")).to_have_text(f"Allowed by {tab.resource}")
    page.reload()
    expect(call.locator(".approval-decision")).to_have_text(f"Allowed by {tab.resource}")
    expect(last_text(page)).to_have_text(deleted_reply(victim, text))


def test_deny_keeps_the_thread_and_the_reply_says_so(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    victim, text, call = a_call_to_delete(page, "Keep this one")
    thread = current_thread(page)

    call.get_by_role("button", name="Deny").click()
    expect(call.get_by_role("button")).to_have_count(0)
    expect(call.locator(".approval-decision")).to_have_text(f"Denied by {tab.resource}")
    expect(last_text(page)).to_contain_text("Offline model was refused mcp__omni__delete_conversation")
    expect(last_text(page)).to_contain_text(f"{tab.resource} denied this call")
    wait_turn_end(page)
    expect(call.locator(".tool-status")).to_have_text("not run")
    expect(call.locator(".tool-result")).to_contain_text("denied this call")
    expect(thread_item(page, victim)).to_have_count(1)
    expect(thread_item(page, thread).locator(".approval-badge")).to_have_count(0)
    assert server.metadata(victim, tab.resource)[0] == 200
    # The conversation goes on.
    ask(page, "Anything else?", text)


def test_stop_while_a_request_waits_denies_it(server, tabs):
    tab = tabs()
    page = open_page(tab, server)
    victim, text, call = a_call_to_delete(page, "Spare me")
    page.get_by_role("button", name="Stop").click()
    expect(call.locator(".approval-decision")).to_have_text("Denied: the reply was stopped")
    expect(call.get_by_role("button")).to_have_count(0)
    wait_turn_end(page)
    expect(call.locator(".tool-status")).to_have_text("not run")
    expect(thread_item(page, victim)).to_have_count(1)
    assert server.metadata(victim, tab.resource)[0] == 200


def test_a_reload_while_a_request_waits(server, tabs):
    """The request survives a reload: drawn once (the store and the followed
    turn's replay are the same call), marked in the sidebar, and Allow works."""
    tab = tabs()
    page = open_page(tab, server)
    victim, text, call = a_call_to_delete(page, "Delete me after a reload")
    thread = current_thread(page)

    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    expect(call).to_have_count(1)
    expect(call.get_by_role("button", name="Allow")).to_be_visible()
    expect(call.get_by_role("button", name="Deny")).to_be_visible()
    expect(thread_item(page, thread).locator(".approval-badge")).to_be_visible()
    expect(page.locator("#messages .message.user")).to_have_count(1)
    expect(page.locator("#messages .message.assistant")).to_have_count(1)
    expect(last_text(page)).to_have_text("Calling mcp__omni__delete_conversation.")

    call.get_by_role("button", name="Allow").click()
    expect(call.locator(".approval-decision")).to_have_text(f"Allowed by {tab.resource}")
    expect(last_text(page)).to_have_text(deleted_reply(victim, text))
    wait_turn_end(page)
    expect(thread_item(page, victim)).to_have_count(0)
    expect(call).to_have_count(1)
    assert texts(page)[0] == ("user", text)


def test_a_second_tab_sees_the_request_and_decides_it(server, tabs):
    resource = new_id("user")
    first, second = tabs(resource), tabs(resource)
    page = open_page(first, server)
    victim, text, call = a_call_to_delete(page, "Shared victim")
    thread = current_thread(page)

    other = open_page(second, server)
    expect(thread_item(other, thread).locator(".approval-badge")).to_be_visible()
    thread_item(other, thread).locator(".thread-open").click()
    other_call = other.locator("#messages .tool-call")
    expect(other_call).to_have_count(1)
    other_call.get_by_role("button", name="Allow").click()
    # Both tabs see the decision and the rest of the reply.
    for tab_page, block in ((other, other_call), (page, call)):
        expect(block.locator(".approval-decision")).to_have_text(f"Allowed by {resource}")
        expect(block.get_by_role("button")).to_have_count(0)
        expect(last_text(tab_page)).to_have_text(deleted_reply(victim, text))
        wait_turn_end(tab_page)
    expect(thread_item(page, victim)).to_have_count(0)
    # A second decision from the first tab's stale view is not possible: no buttons left.
    assert first.dialogs == second.dialogs == []


def test_a_request_survives_a_dropped_connection(server, tabs):
    """The socket drops while the call waits: the page reconnects, follows
    the turn from where it was (turnId, afterSeq) and Allow still works."""
    proxy = DroppingProxy(server.port)
    try:
        tab = tabs()
        page = tab.page
        page.goto(proxy.url())
        connection = page.locator("#connection")
        expect(connection).to_have_attribute("data-state", "open")
        victim, text, call = a_call_to_delete(page, "Dropped victim")
        proxy.drop()
        expect(connection).to_have_attribute("data-state", "down")
        expect(connection).to_have_attribute("data-state", "open")
        expect(call.get_by_role("button", name="Allow")).to_be_visible()
        call.get_by_role("button", name="Allow").click()
        expect(last_text(page)).to_have_text(deleted_reply(victim, text))
        wait_turn_end(page)
        follows = [json.loads(f) for f in tab.sent if '"follow"' in f]
        assert any(f.get("turnId") and "afterSeq" in f for f in follows), follows
        expect(call).to_have_count(1)
        expect(thread_item(page, victim)).to_have_count(0)
    finally:
        proxy.close()


def test_tool_input_and_results_are_text_and_long_ones_collapse(server, tabs):
    """A call that needs no approval: shown as it runs, its (model- and
    user-controlled) result drawn as text, collapsed when long."""
    tab = tabs()
    page = open_page(tab, server)
    payload = "Echo <img src=x onerror=alert(1)> <script>alert(2)</script> " + "padding " * 40
    send(page, payload)
    wait_turn_end(page)
    seeded = current_thread(page)
    page.get_by_role("button", name="New chat").click()
    text = "Read it " + tool_marker("read_conversation", threadId=seeded)
    send(page, text)
    call = page.locator("#messages .tool-call")
    expect(call.locator(".tool-name")).to_have_text("read_conversation")
    expect(last_text(page)).to_contain_text("Offline model got from mcp__omni__read_conversation")
    wait_turn_end(page)
    expect(call).to_have_count(1)
    expect(call.locator(".approval")).to_have_count(0)
    expect(call.locator(".tool-input")).to_have_js_property("open", True)  # short: open
    result = call.locator(".tool-result")
    expect(result).to_have_js_property("open", False)  # long: collapsed
    expect(result.locator("summary")).to_contain_text("characters")
    expect(result).to_contain_text("<img src=x onerror=alert(1)>")
    result.locator("summary").click()
    expect(result.locator("pre")).to_be_visible()
    assert page.locator("main img, main script").count() == 0
    assert tab.dialogs == []


def test_a_request_decided_after_the_server_restarted(server, tabs):
    """The worker that ran the turn stops while its call waits: the page
    reconnects and shows the request from the store (no "interrupted"
    note); Allow then continues the conversation in a new turn, which the
    page follows and draws."""
    tab = tabs()
    page = open_page(tab, server)
    victim, text, call = a_call_to_delete(page, "Victim of a restart")
    connection = page.locator("#connection")
    port = server.port

    server.stop()
    expect(connection).to_have_attribute("data-state", "down")
    server.start(port=port)
    expect(connection).to_have_attribute("data-state", "open")
    # No turn runs now, but the page follows the thread: the call still waits
    # (its request replayed), so the page looks as it did before the restart.
    expect(page.locator("#stop")).to_be_visible()
    expect(call).to_have_count(1)
    allow = call.get_by_role("button", name="Allow")
    expect(allow).to_be_visible()
    expect(page.locator("#messages .note")).to_have_count(0)

    allow.click()
    expect(call.locator(".approval-decision")).to_have_text(f"Allowed by {tab.resource}")
    expect(last_text(page)).to_have_text(deleted_reply(victim, text))
    wait_turn_end(page)
    expect(call.locator(".tool-status")).to_have_text("done")
    expect(thread_item(page, victim)).to_have_count(0)
    assert server.metadata(victim, tab.resource)[0] == 404


# --- usage and budgets -------------------------------------------------------------------

def test_the_cost_the_days_spend_and_a_spent_budget(budget_server, tabs):
    """The open thread's cost and today's spend against the budget, after a
    turn and on load; the next turn (and a fork) refused with when the
    budget resets, in the person's time (Tokyo: a UTC midnight is 09:00)."""
    server = budget_server
    tab = tabs(timezone_id="Asia/Tokyo", locale="en-GB")
    page = open_page(tab, server)
    spend, cost_label = page.locator("#spend"), page.locator("#thread-cost")
    budget = usd(float(DAILY_BUDGET))
    expect(spend).to_have_text(f"Today $0.00 of {budget}")
    expect(spend).to_have_attribute("data-over", "false")
    expect(cost_label).to_be_hidden()  # a new conversation

    first = "What does this cost?"
    ask(page, first)
    thread = current_thread(page)
    cost = thread_cost(server, thread, tab.resource)
    assert cost > float(DAILY_BUDGET), cost
    expect(cost_label).to_have_text(usd(cost))
    expect(spend).to_have_text(f"Today {usd(cost)} of {budget}")
    expect(spend).to_have_attribute("data-over", "true")
    done = [json.loads(f) for f in tab.frames if '"done"' in f]
    assert [d["result"]["costUsd"] for d in done if d["type"] == "done"] == [pytest.approx(cost)]

    # Over budget: the next message is refused, and the page says when that ends.
    resets = re.compile(r"Today's budget is spent: no new messages until it resets "
                        r"(today|tomorrow) at 09:00 your time \(in (\d+ h( \d+ min)?|\d+ min)\)\.")
    alert = page.get_by_role("alert")
    send(page, "And again?")
    expect(alert).to_have_text(resets)
    wait_turn_end(page)
    refusal = [json.loads(f) for f in tab.frames if '"budget_exceeded"' in f]
    assert len(refusal) == 1 and refusal[0]["threadId"] == thread and refusal[0]["retryAfter"] > 0, refusal
    assert stored_messages(server, thread, tab.resource) == [("user", first), ("assistant", reply(first))]
    expect(cost_label).to_have_text(usd(cost))  # nothing more spent
    expect(spend).to_have_text(f"Today {usd(cost)} of {budget}")

    # A fork is a turn too.
    page.get_by_role("button", name="Fork", exact=True).click()
    send(page, "On a branch?")
    expect(alert).to_have_text(resets)
    wait_turn_end(page)
    assert len([f for f in tab.frames if '"budget_exceeded"' in f]) == 2

    # On load: the thread's cost and the day's spend.
    page.goto(server.url(f"/#thread={thread}"))
    expect(page.locator("#messages .message")).to_have_count(2)
    expect(cost_label).to_have_text(usd(cost))
    expect(spend).to_have_text(f"Today {usd(cost)} of {budget}")
    expect(spend).to_have_attribute("data-over", "true")
    no_chunks(tab)
    starts = [json.loads(f)["type"] for f in tab.sent if '"chunks"' in f]
    assert starts == ["message", "message", "fork"], starts
