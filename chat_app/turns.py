"""The turn pipeline: one conversation turn through the Claude Agent SDK.

Both transports (SSE views, the websocket consumer) call :func:`start_turn`
and read the returned :class:`Turn`'s events; nothing else runs the SDK.

A turn runs in an asyncio task of its own, not in the request that started
it: its events are buffered, any number of listeners read them from the
start (the transport that started it, a websocket ``follow``), and a client
that goes away does not cut the turn short: it runs to its end, its
transcript and mapping are saved and its CLI process exits.

A turn runs on a process from :mod:`chat_app.pool`: its thread's warm
client, a spare, or a CLI started for it, within the server's process budget.
:class:`TurnRegistry` is the one-turn-per-thread lock of this process; across
processes ``start_turn`` takes the thread's lease (:mod:`chat_app.leases`)
before anything else touches the thread, the turn renews it while it runs and
lets it go just before its last event. Every event carries ``seq``;
:mod:`chat_app.streams` lets listeners and interrupts on other workers reach
the turn.
"""

import asyncio
import contextlib
import contextvars
import logging
import sys
import uuid
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from claude_agent_sdk import AssistantMessage, ClaudeSDKClient, ClaudeSDKError, ResultMessage
from django.conf import settings
from django.db import close_old_connections

from sessions_app import services
from sessions_app.errors import (
    ApiError, BadRequest, Conflict, NotFound, RateLimited, ServerBusy, TooLarge,
)
from sessions_app.resources import resolve_resource

from . import events, leases, limits
from .pool import Slot, WarmClient, pool
from .sdk import agent_preset, build_options, workspace_dir

log = logging.getLogger("omni.chat")

MISSING_SESSION = "No conversation found with session ID"
# AssistantMessage.error values that mean the model endpoint failed us, not the request.
MODEL_UNAVAILABLE = {"server_error", "rate_limit"}


@dataclass
class TurnSpec:
    """A validated turn: who, which thread, what to say, how."""

    resource_id: str
    thread_id: str
    message: str
    agent: str
    preset: dict
    resume_session_id: str | None = None  # the thread's (or fork parent's) session
    fork_from_thread_id: str | None = None
    at_message_uuid: str | None = None
    forked_from_thread_id: str | None = None  # the mapping's value, kept on later turns
    version: int | None = None  # the mapping's version at turn start (warm-client staleness)

    @property
    def key(self) -> tuple[str, str]:
        return (self.resource_id, self.thread_id)


class Turn:
    def __init__(self, spec: TurnSpec, slot: Slot):
        self.spec = spec
        self.slot = slot  # the live process this turn runs on (pool)
        self._kept: WarmClient | None = None  # the client to keep warm after the turn
        self._version: int | None = None  # the mapping's version after this turn's writes
        self._first_save: asyncio.Future | None = None  # a follow-up's save at its session event
        self.events: list[dict] = []
        self.finished = False
        self.session_id: str | None = None
        self._wake = asyncio.Event()
        self._client: ClaudeSDKClient | None = None
        self._interrupted = False
        self._streaming_id: str | None = None
        self.task: asyncio.Task | None = None
        self.on_finish = lambda turn: None
        # Across processes: the thread's lease (its fencing token names the
        # turn), and a hook the streams hub sets to send events to followers
        # on other workers.
        self.lease: leases.Lease | None = None
        self.on_event = None
        self._final: dict | None = None  # the done/error event, published last
        self._lease_lost = False

    @property
    def token(self) -> int | None:
        return self.lease.token if self.lease else None

    # --- listeners -------------------------------------------------------
    async def listen(self, start: int = 0):
        """Every event from ``start`` on, as they come, until the turn ends."""
        index = start
        while True:
            wake = self._wake
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.finished:
                return
            await wake.wait()

    def _publish(self, event: dict) -> None:
        if event.get("type") in ("done", "error") and not self.finished:
            # The last event waits until the thread is free (lease and
            # registry, in ``run``): a client may send its next message, to
            # any worker, the moment it reads it.
            if self._final is None:
                self._final = event
            return
        event["seq"] = len(self.events)
        self.events.append(event)
        self._wake.set()
        self._wake = asyncio.Event()
        if self.on_event is not None:
            self.on_event(event)

    async def _lease_was_lost(self) -> None:
        self._lease_lost = True
        await self.interrupt()

    async def interrupt(self) -> None:
        self._interrupted = True
        if self._client is not None:
            try:
                await self._client.interrupt()
            except Exception:  # the CLI may be gone already
                log.debug("interrupt failed", exc_info=True)

    # --- the turn ------------------------------------------------------------
    async def run(self) -> None:
        spec = self.spec
        try:
            if spec.resume_session_id and not spec.fork_from_thread_id:
                log.info("[CHAT] Resuming session: %s", spec.resume_session_id)
            if spec.resume_session_id and self.slot.kind != "warm":
                if self.lease is not None:
                    await self.lease.check()  # nothing moves the session without it
                # The database is the truth: a session last written under
                # another working directory (another machine, data dir or
                # server) moves to this one's project key first, so the CLI
                # resumes it from the store and not from a stale local file.
                # (A warm client needs none of this: it is current.)
                await adopt_session(spec.resume_session_id)
            try:
                await self._converse(spec.resume_session_id)
            except ResumeMissing:
                notice = (
                    f"The stored session {spec.resume_session_id} could not be resumed; "
                    "a new session was started without the earlier context."
                )
                log.warning("[CHAT] %s thread=%s", notice, spec.thread_id)
                await self._converse(None, notice=notice)
        except ApiError as exc:
            self._publish(events.error_event(exc.code, exc.message, exc.retry_after))
        except leases.LeaseLost as exc:
            self._lease_lost = True
            log.error("[CHAT] %s", exc)
            if self._kept is not None:  # its context is another worker's now
                await asyncio.shield(pool.close(self._kept.client))
                self._kept = None
        except Exception as exc:  # never leave a listener hanging
            log.exception("turn failed thread=%s", spec.thread_id)
            self._publish(events.error_event("turn_failed", f"{type(exc).__name__}: {exc}"))
        finally:
            # Give the process back and free the thread before the last event
            # is read: a client may send its next message, to any worker, the
            # moment it sees "done" (and find its warm client here).
            if self._kept is not None:
                pool.checkin(self.slot, spec.key, self._kept, agent=spec.agent,
                             session_id=self.session_id, version=self._version)
            else:
                pool.discard(self.slot, "turn did not end cleanly")
            try:
                if self.lease is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.lease.release())
            finally:
                self.on_finish(self)
                # Like a request's end: a turn runs outside any request, so close
                # its database connection if it is past CONN_MAX_AGE or broken.
                try:
                    with contextlib.suppress(Exception):
                        await sync_to_async(close_old_connections)()
                finally:
                    self._publish_final()

    def _publish_final(self) -> None:
        final = self._final
        if self._lease_lost:
            final = events.error_event(
                "lease_lost", "this worker lost the thread's lease; the turn was stopped")
        elif final is None:
            final = events.error_event("turn_failed", "the turn ended without a result")
        self.finished = True
        final["seq"] = len(self.events)
        self.events.append(final)
        self._wake.set()
        if self.on_event is not None:
            self.on_event(final)

    async def _converse(self, resume: str | None, notice: str | None = None) -> None:
        spec = self.spec
        fork = bool(spec.fork_from_thread_id) and resume is not None
        pending = []  # messages before the session id is known
        streamed: set[str] = set()
        reply: list[str] = []
        result: ResultMessage | None = None
        api_error: str | None = None  # the CLI's stand-in reply for a failed model call
        warm = self.slot.take()  # the thread's warm client or a spare: connected already
        started = warm is None
        if started:
            options = build_options(
                spec.preset,
                resume=resume,
                fork=fork,
                resume_at=spec.at_message_uuid if fork else None,
                session_store=session_store(),
            )
            warm = WarmClient(ClaudeSDKClient(options), spec.agent)
        client = warm.client
        self._client = client
        keep = hung = False
        try:
            if started:
                async with silence():
                    await pool.room()  # never more CLIs than the budget, exiting ones included
                    await client.connect()
            await client.query(spec.message)
            if self._interrupted:  # asked for before the CLI was up
                await client.interrupt()
            async for message in until_silent(client.receive_response()):
                if self.session_id is None:
                    sid = events.init_session_id(message)
                    if sid is None:
                        pending.append(message)
                        continue
                    await self._on_session(sid, resumed=resume is not None and not fork, notice=notice)
                    for earlier in pending:
                        self._publish(events.chunk_event(sid, earlier))
                elif (sid := events.init_session_id(message)) and sid != self.session_id:
                    self.session_id = sid
                self._emit_text(message, streamed, reply)
                self._publish(events.chunk_event(self.session_id, message))
                if isinstance(message, ResultMessage):
                    result = message
                elif isinstance(message, AssistantMessage) and message.error:
                    api_error = message.error
        except Silent:
            hung = True
            raise
        except ClaudeSDKError as exc:
            if self.session_id is None and MISSING_SESSION in str(exc) and resume:
                raise ResumeMissing() from exc
            if result is None:  # after a result the CLI's non-zero exit adds nothing
                raise
        else:
            # A client whose turn ended with its result (an interrupt included)
            # can take the thread's next turn; after an error it cannot.
            keep = result is not None and not result.is_error
        finally:
            self._client = None
            if keep:
                self._kept = warm
            else:
                await asyncio.shield(pool.close(client, kill=hung))
        if self.session_id is None:
            raise ApiError("the CLI ended without starting a session", code="turn_failed")
        # A failed model call's "API Error" text is not a message of the thread.
        answered = result is not None and not result.is_error
        if self._first_save is not None:
            await self._first_save
        if self.lease is not None:
            await self.lease.check()  # a worker that lost the thread saves nothing more
        mapping = await services.save_session(
            spec.thread_id, spec.resource_id, self.session_id,
            assistant_message="".join(reply) if answered else None,
        )
        self._version = mapping.version
        if settings.OMNI_SESSION_STORE:
            try:
                await sync_to_async(services.drop_mirrored_local_transcript)(self.session_id)
            except OSError:
                log.warning("could not drop the local transcript of %s", self.session_id, exc_info=True)
        if result is not None and result.is_error and api_error in MODEL_UNAVAILABLE:
            # The model could not be reached (after the CLI's retries): the
            # stream's 503. The session and the user's message are kept.
            self._publish(events.error_event("model_unavailable", result.result or api_error))
        elif result is not None:
            self._publish(events.done_event(self.session_id, result))
        else:
            self._publish(events.error_event("turn_failed", "the turn ended without a result"))

    async def _on_session(self, session_id: str, resumed: bool, notice: str | None) -> None:
        spec = self.spec
        self.session_id = session_id
        # Saved as soon as it is known, so a turn cut short still resumes.
        save = services.save_session(
            spec.thread_id,
            spec.resource_id,
            session_id,
            agent=spec.agent,
            user_message=spec.message,
            forked_from_thread_id=spec.fork_from_thread_id,
        )
        if session_id == spec.resume_session_id and not spec.fork_from_thread_id:
            # A follow-up: the mapping exists and names this session already,
            # so the text need not wait for the write (the turn's last save
            # waits for it).
            self._first_save = asyncio.ensure_future(save)
            self._first_save.add_done_callback(_log_failed_save)
        else:
            await save  # a new mapping: its insert may find the thread taken
        self._publish(
            events.session_event(
                spec.thread_id, spec.resource_id, session_id, resumed,
                spec.forked_from_thread_id or spec.fork_from_thread_id, notice,
            )
        )

    def _emit_text(self, message, streamed: set[str], reply: list[str]) -> None:
        """Text events from the stream's deltas, or from a whole assistant
        message when none were streamed for it (e.g. a synthetic API error)."""
        if message_id := events.stream_message_id(message):
            self._streaming_id = message_id
        if (delta := events.text_delta(message)) is not None:
            streamed.add(self._streaming_id)
            reply.append(delta)
            self._publish(events.text_event(self.session_id, delta))
        elif (text := events.assistant_text(message)) and message.message_id not in streamed:
            reply.append(text)
            self._publish(events.text_event(self.session_id, text))


def _log_failed_save(future: asyncio.Future) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.error("[CHAT] Could not save the session mapping: %s", exc)


class ResumeMissing(Exception):
    """The stored session is gone (no local file, nothing in the store)."""


class Silent(ApiError):
    """The CLI sent nothing for ``OMNI_TURN_SILENCE_SECONDS``."""

    status, code = 504, "turn_timeout"


@contextlib.asynccontextmanager
async def silence():
    """A CLI that sends nothing for ``OMNI_TURN_SILENCE_SECONDS`` ends the
    turn with :class:`Silent` instead of holding it (and its thread) forever."""
    try:
        async with asyncio.timeout(settings.OMNI_TURN_SILENCE_SECONDS):
            yield
    except TimeoutError:
        raise Silent(
            f"the Claude process sent nothing for {settings.OMNI_TURN_SILENCE_SECONDS:g} s; "
            "the turn was stopped"
        ) from None


async def until_silent(messages):
    """``messages``, each within the silence timeout."""
    iterator = aiter(messages)
    while True:
        try:
            async with silence():
                message = await anext(iterator)
        except StopAsyncIteration:
            return
        yield message


async def fork_point(session_id: str, message_uuid: str | None) -> str | None:
    """Where to cut a fork at ``atMessageUuid``: the last transcript entry of
    that message (a reply can span several entries, named by the first)."""
    if message_uuid is None or not settings.OMNI_SESSION_STORE:
        return message_uuid
    from sessions_app.transcripts import fork_point as stored_fork_point

    cut = await stored_fork_point(session_id, message_uuid)
    if cut is None:
        raise BadRequest(f"atMessageUuid {message_uuid!r} is not a message of the thread being forked")
    return cut


async def adopt_session(session_id: str) -> bool:
    """Move a stored session to this process's project key; True if moved."""
    if not settings.OMNI_SESSION_STORE:
        return False
    from claude_agent_sdk import project_key_for_directory
    from sessions_app.transcripts import rekey_session

    key = project_key_for_directory(str(workspace_dir()))
    moved = await sync_to_async(rekey_session)(session_id, key)
    if moved:
        log.info("[CHAT] Adopted stored session %s into project %s", session_id, key)
    return bool(moved)


def session_store():
    if not settings.OMNI_SESSION_STORE:
        return None
    from sessions_app.transcripts import DjangoSessionStore

    return DjangoSessionStore()


class TurnRegistry:
    """The turns of this process: the running one of each ``(resource,
    thread)``, and the last finished one for ``OMNI_STREAM_LINGER_SECONDS``
    (so a client that reconnects right after the end still gets the tail)."""

    def __init__(self):
        self._turns: dict[tuple[str, str], Turn] = {}
        self._recent: dict[tuple[str, str], Turn] = {}
        self.draining = False  # the server is stopping: no new turns

    def get(self, resource_id: str, thread_id: str) -> Turn | None:
        """The thread's running turn in this process."""
        return self._turns.get((resource_id, thread_id))

    def find(self, resource_id: str, thread_id: str, finished: bool = False) -> Turn | None:
        """The running turn, or with ``finished`` the one that just ended."""
        key = (resource_id, thread_id)
        return self._turns.get(key) or (self._recent.get(key) if finished else None)

    def start(self, spec: TurnSpec, lease: leases.Lease | None = None) -> Turn:
        """Start a turn on a process of the pool (synchronous: checking the
        thread, the resource's limit and the budget cannot race)."""
        if spec.key in self._turns:
            raise Conflict(f"thread {spec.thread_id!r} is busy with another turn", code="thread_busy")
        limit = settings.OMNI_MAX_TURNS_PER_RESOURCE
        if sum(key[0] == spec.resource_id for key in self._turns) >= limit:
            raise RateLimited(
                f"resource {spec.resource_id!r} already runs {limit} turns; wait for one to end",
                retry_after=settings.OMNI_BUSY_RETRY_AFTER,
            )
        _stop_turns_on_server_shutdown()
        slot = pool.checkout(
            spec.key, agent=spec.agent, session_id=spec.resume_session_id, version=spec.version,
            fork=bool(spec.fork_from_thread_id),
        )
        turn = Turn(spec, slot)
        turn.lease = lease
        turn.on_finish = self._release
        self._turns[spec.key] = turn
        self._recent.pop(spec.key, None)
        # A context of its own: the turn outlives the request that started
        # it, so it must not use that request's thread-sensitive executor.
        loop = asyncio.get_running_loop()
        turn.task = loop.create_task(self._run(turn), context=contextvars.Context())
        turn.task.add_done_callback(lambda _: self._release(turn))  # even if cancelled early
        return turn

    async def _run(self, turn: Turn) -> None:
        from .streams import hub

        renewal = None
        if turn.lease is not None:
            renewal = asyncio.create_task(leases.keep_renewed(turn.lease, turn._lease_was_lost))
        try:
            await hub.attach(turn)
            await turn.run()
        finally:
            if renewal is not None:
                renewal.cancel()
            if not turn.finished:  # cancelled before its run could clean up
                if turn.lease is not None:
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(turn.lease.release())
                self._release(turn)
                turn._publish_final()

    def _release(self, turn: Turn) -> None:
        pool.discard(turn.slot, "turn cancelled")  # no-op once the turn gave it back
        key = turn.spec.key
        if self._turns.get(key) is not turn:
            return
        del self._turns[key]
        self._recent[key] = turn
        linger = float(settings.OMNI_STREAM_LINGER_SECONDS)
        with contextlib.suppress(RuntimeError):  # no loop: nothing lingers
            asyncio.get_running_loop().call_later(linger, self._forget, turn)

    def _forget(self, turn: Turn) -> None:
        from .streams import hub

        key = turn.spec.key
        if self._recent.get(key) is turn:
            del self._recent[key]
            asyncio.ensure_future(hub.detach(key))

    def running(self) -> list[Turn]:
        return list(self._turns.values())

    async def shutdown(self, grace: float | None = None, timeout: float = 5) -> None:
        """The server is stopping: take no new turns (503 ``server_busy``),
        let the running ones finish for up to ``grace`` seconds
        (``OMNI_SHUTDOWN_GRACE_SECONDS``), then interrupt the rest and wait
        for them to end (their CLI exits, their mapping is saved and their
        lease released, so they resume on any worker). Without this a turn's
        task never finishes, its CLI outlives the loop and the SDK's anyio
        worker thread (non-daemon, stopped only when that task is done)
        keeps the process from exiting."""
        from .streams import hub

        self.draining = True
        pool.stopping = True  # turns ending now keep no warm client
        grace = settings.OMNI_SHUTDOWN_GRACE_SECONDS if grace is None else grace
        try:
            turns = self.running()
            if not turns:
                return
            tasks = [turn.task for turn in turns if turn.task is not None]
            log.info("[CHAT] Server stopping: waiting up to %ss for %d running turn(s)",
                     grace, len(turns))
            if grace > 0:
                _, pending = await asyncio.wait(tasks, timeout=grace)
            else:
                pending = set(tasks)
            if not pending:
                return
            log.info("[CHAT] Server stopping: interrupting %d running turn(s)", len(pending))
            for turn in turns:
                if turn.task in pending:
                    await turn.interrupt()
            _, pending = await asyncio.wait(pending, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        finally:
            await pool.shutdown()  # every warm client and spare: no CLI outlives the worker
            await hub.stop()


def _stop_turns_on_server_shutdown() -> None:
    """Under daphne (a Twisted reactor), run :meth:`TurnRegistry.shutdown`
    when it is asked to stop (SIGTERM), before it stops listening: the
    requests that come meanwhile get 503 ``server_busy``. Registered once,
    on the first turn (a server that never ran a turn has nothing to wait for)."""
    global _shutdown_hooked
    if _shutdown_hooked or "twisted.internet.reactor" not in sys.modules:
        return  # not under daphne: never install a reactor from here
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: Deferred.fromFuture(asyncio.ensure_future(registry.shutdown()))
    )
    _shutdown_hooked = True


_shutdown_hooked = False


registry = TurnRegistry()


def process_counts() -> dict:
    """This process's live Claude CLI processes, for ``GET /api/health``:
    ``running`` (turns in progress), ``warm`` (idle warm clients), ``spare``
    (started for new threads), ``exiting`` (closed, not yet exited),
    ``budget`` (their limit), and ``draining``."""
    return {**pool.counts(), "draining": registry.draining}


async def start_turn(user, body, *, fork: bool = False) -> Turn:
    """Validate a chat or fork request (a ``ChatIn``/``ForkIn``), and start it.

    Raises the contract's errors: 400 unknown agent, 401/403 from resource
    resolution, 404 fork parent missing, 409 fork target exists or thread
    busy, 413 message too long.
    """
    if len(body.message) > settings.OMNI_MAX_MESSAGE_CHARS:
        raise TooLarge(f"message is over {settings.OMNI_MAX_MESSAGE_CHARS} characters")
    resource = resolve_resource(user, body.resourceId)
    agent, preset = agent_preset(body.agent)
    thread_id = body.threadId or f"thread-{uuid.uuid4().hex}"
    spec = TurnSpec(resource, thread_id, body.message, agent, preset)
    if registry.draining:
        raise ServerBusy("the server is shutting down; try again (another worker will answer)",
                         retry_after=1)
    if registry.get(resource, thread_id):
        raise Conflict(f"thread {thread_id!r} is busy with another turn", code="thread_busy")
    # One turn per thread across every process, from here to the turn's end:
    # the checks below and everything the turn does to the stored session.
    lease = await leases.acquire(resource, thread_id)
    try:
        await _resolve_thread(spec, body, fork=fork)
        limits.turn_rate.check(resource)  # 429 rate_limited: turns a minute
        return registry.start(spec, lease)
    except BaseException:
        await asyncio.shield(lease.release())
        raise


async def _resolve_thread(spec: TurnSpec, body, *, fork: bool) -> None:
    """What the turn resumes: the fork parent's session or the thread's own."""
    resource, thread_id = spec.resource_id, spec.thread_id
    if fork:
        parent = await services.get_mapping(body.forkFromThreadId, resource)
        if parent is None:
            raise NotFound(f"no thread {body.forkFromThreadId!r} to fork from")
        if await services.get_mapping(thread_id, resource):
            raise Conflict(f"thread {thread_id!r} already exists", code="thread_exists")
        spec.resume_session_id = parent.session_id
        spec.fork_from_thread_id = parent.thread_id
        spec.at_message_uuid = await fork_point(parent.session_id, body.atMessageUuid)
    elif mapping := await services.get_mapping(thread_id, resource):
        spec.resume_session_id = mapping.session_id
        spec.forked_from_thread_id = mapping.forked_from_thread_id
        spec.version = mapping.version
        if body.agent is None:
            spec.agent, spec.preset = agent_preset(mapping.agent)
