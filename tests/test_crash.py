"""A worker SIGKILLed mid-turn loses nothing a person said (issue 22,
findings 1 and 2): the message of the turn in flight is in the thread's
history afterwards, and the next turn, on the other worker or on the same
one restarted, resumes the thread's session with it in the model's context
(the offline model's reply lists every earlier user text, so it shows what
the model was sent).

Two setups: two workers sharing PostgreSQL and Redis (``running_cluster``
of tests/test_scale_out.py), the next message going to the other worker;
one worker on the embedded libSQL file, killed and started again on the
same data dir. In each, a thread's first turn (finding 2: its session was
created on the dead worker) and a later turn (finding 1).
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.e2e import Server, descendants, is_cli, new_id, reply
from tests.test_scale_out import messages, running_cluster, start_slow_turn

pytestmark = [pytest.mark.e2e, pytest.mark.engine_agnostic]

SLOW = "Tell me slowly [slow]"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory, "crash")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """One worker on the embedded libSQL file (whatever the run's engine)."""
    server = Server(tmp_path_factory.mktemp("crash-embedded"), None)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def kill(server: Server) -> None:
    """SIGKILL the worker and everything it started (the machine's view of a crash)."""
    proc, server.proc = server.proc, None
    server.seen_cli.update(p for p in descendants(proc.pid) if is_cli(p))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def killed_mid_turn(server: Server, first_turn: bool) -> tuple[str, str, list[str], str]:
    """A thread whose turn (its first, or its second) is SIGKILLed mid-reply
    on ``server``: ``(resource, thread, the user texts sent, its session id)``."""
    resource, thread = new_id("user"), new_id("thread")
    said = [] if first_turn else ["What is 2+2?"]
    if said:
        server.chat(said[0], resource, thread).assert_ok()
    stream = start_slow_turn(server, resource, thread, SLOW)  # streaming its reply
    said.append(SLOW)
    session_id = stream.events[0]["sessionId"]
    kill(server)
    stream.close()
    return resource, thread, said, session_id


def assert_nothing_lost(server: Server, resource: str, thread: str, said: list[str], session_id: str):
    """The next message on ``server``: the thread's session resumed (no
    fresh one, no notice), the model sent every earlier message, the
    history holds them all."""
    result = server.chat("Where were we?", resource, thread).assert_ok()
    assert result.session["resumed"] is True and "notice" not in result.session, result.session
    assert result.session_id == session_id
    assert result.text == reply("Where were we?", *said)
    # the killed turn's message without a reply (none was finished), no
    # stand-in reply of the CLI's
    expected = [("user", said[0])]
    if len(said) == 2:
        expected += [("assistant", reply(said[0])), ("user", said[1])]
    assert messages(server, thread, resource) == [
        *expected, ("user", "Where were we?"), ("assistant", result.text)]


@pytest.mark.parametrize("first_turn", [False, True], ids=["later-turn", "first-turn"])
def test_a_turn_killed_on_one_worker_goes_on_on_the_other(cluster, first_turn):
    """PostgreSQL + Redis: A dies mid-turn, the thread's next message goes to B."""
    resource, thread, said, session_id = killed_mid_turn(cluster.a, first_turn)
    try:
        assert_nothing_lost(cluster.b, resource, thread, said, session_id)
    finally:
        cluster.a.start()  # for the next test (and the module's teardown)


@pytest.mark.parametrize("first_turn", [False, True], ids=["later-turn", "first-turn"])
def test_a_turn_killed_on_the_embedded_file_goes_on_after_a_restart(embedded, first_turn):
    """The embedded file: the one worker dies mid-turn and is started again."""
    resource, thread, said, session_id = killed_mid_turn(embedded, first_turn)
    embedded.start()
    assert_nothing_lost(embedded, resource, thread, said, session_id)
