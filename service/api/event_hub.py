"""One database poller per study per API process, feeding every live-stream subscriber of it.

``GET /studies/{id}/events`` subscribers do not query the database themselves: the hub
keeps one :class:`StudyFeed` per followed study, started when its first subscriber
arrives and stopped when its last one leaves. A feed polls the study's new events and
progress (one short query every ``poll_seconds``), encodes each message once, keeps the
most recent ``history`` events in memory and offers each message to every subscriber's
bounded queue.

Slow clients: offering never waits. A subscriber whose queue is full (its client reads
slower than events arrive) has the queue dropped and is marked behind; when its client
reads again it catches up by itself, from the feed's recent events or, if it fell
further back than those, from the database after the last event id it sent, and then
follows live again. So every subscriber receives every event once, in id order, and a
client that stops reading holds at most ``queue_limit`` messages and delays no one.

A subscriber that (re)joins after ``Last-Event-ID`` is caught up the same way. Only the
controller writes events; this process keeps nothing that is not in the database.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sse_starlette import ServerSentEvent

from service.db.models import Event, Study

if TYPE_CHECKING:
    from service.api.deps import AppState

log = logging.getLogger(__name__)
BATCH = 500  # events per query
HISTORY = 1024  # recent events a feed keeps for subscribers that (re)join
QUEUE_LIMIT = 256  # messages a subscriber may have waiting before it is marked behind
END_GRACE_POLLS = 4
PROGRESS_FIELDS = {"id", "status", "trials_done", "trials_failed", "max_trials", "max_seconds",
                   "elapsed_seconds", "best_trial_number", "best_value", "error", "status_reason", "cost"}


@dataclass(frozen=True)
class Message:
    """One server-sent event, encoded once for all subscribers. Stored events have an id;
    ``progress`` and ``end`` have none."""

    id: int | None
    kind: str
    chunk: bytes

    @classmethod
    def of_event(cls, event: Event) -> Message:
        payload = {"id": event.id, "at": event.at.isoformat(), "kind": event.kind, "data": event.data}
        sse = ServerSentEvent(data=json.dumps(payload), event=event.kind, id=str(event.id))
        return cls(event.id, event.kind, sse.encode())

    @classmethod
    def of_data(cls, kind: str, data: dict[str, Any]) -> Message:
        return cls(None, kind, ServerSentEvent(data=json.dumps(data), event=kind).encode())


class Snapshot(NamedTuple):
    """What one poll found: the study's progress (None: deleted), whether it is final, new events."""

    progress: dict[str, Any] | None
    finished: bool
    events: list[Message]


def _study_progress(state: AppState, study: Study | None) -> tuple[dict[str, Any] | None, bool]:
    from service.api.studies import study_out

    if study is None:
        return None, False
    out = study_out(state, study)
    return out.model_dump(mode="json", include=PROGRESS_FIELDS), out.status.finished


def read_events(state: AppState, study_id: str, after: int, limit: int = BATCH) -> list[Message]:
    """Up to ``limit`` events of the study with an id above ``after``, oldest first."""
    with state.sessions() as session:
        rows = session.scalars(select(Event).where(Event.study_id == study_id, Event.id > after)
                               .order_by(Event.id).limit(limit))
        return [Message.of_event(e) for e in rows]


def poll(state: AppState, study_id: str, after: int) -> Snapshot:
    """The study's progress and its events after ``after`` (at most BATCH); one session."""
    with state.sessions() as session:
        progress, finished = _study_progress(state, session.get(Study, study_id))
        rows = session.scalars(select(Event).where(Event.study_id == study_id, Event.id > after)
                               .order_by(Event.id).limit(BATCH))
        return Snapshot(progress, finished, [Message.of_event(e) for e in rows])


def poll_latest(state: AppState, study_id: str, limit: int) -> Snapshot:
    """The study's progress and its newest ``limit`` events, oldest first (a feed's first poll)."""
    with state.sessions() as session:
        progress, finished = _study_progress(state, session.get(Study, study_id))
        rows = list(session.scalars(select(Event).where(Event.study_id == study_id)
                                    .order_by(Event.id.desc()).limit(limit)))
        return Snapshot(progress, finished, [Message.of_event(e) for e in reversed(rows)])


@dataclass(eq=False)
class Subscriber:
    """One client's bounded queue. ``live`` is False while it catches up (or fell behind):
    the feed then offers it nothing, and it reads what it missed from memory or the database."""

    limit: int
    items: deque[Message] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    live: bool = False
    closed: bool = False
    dropped: int = 0  # how often it fell behind

    def offer(self, message: Message) -> None:
        if not self.live:
            return
        if len(self.items) >= self.limit:  # its client reads too slowly: it will catch up by itself
            self.items.clear()
            self.live = False
            self.dropped += 1
        else:
            self.items.append(message)
        self.wake.set()

    def take(self) -> list[Message]:
        items = list(self.items)
        self.items.clear()
        self.wake.clear()
        return items

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class StudyFeed:
    """The one poller of a study in this process; a task that ends with ``end`` (study final and
    quiet, or deleted), on a database error, or when the hub cancels it (no subscriber left)."""

    def __init__(self, hub: EventHub, study_id: str) -> None:
        self.hub, self.study_id = hub, study_id
        self.subscribers: set[Subscriber] = set()
        self.recent: deque[Message] = deque()  # every event with floor < id <= cursor
        self.floor = 0
        self.cursor = 0
        self.progress: Message | None = None
        self.ended: Message | None = None
        self.failed = False
        self.ready = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"event feed {study_id}")

    def since(self, after: int) -> list[Message]:
        """The recent events with an id above ``after`` (all of them only if ``after >= floor``)."""
        newer: list[Message] = []
        for message in reversed(self.recent):
            if message.id is not None and message.id <= after:
                break
            newer.append(message)
        newer.reverse()
        return newer

    async def _run(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the event feed of study %s failed; its subscribers are closed (they reconnect)",
                          self.study_id)
            self.failed = True
            for sub in self.subscribers:
                sub.close()
        finally:
            self.ready.set()
            self.hub.forget(self)

    async def _follow(self) -> None:
        state, hub = self.hub.state, self.hub
        loop = asyncio.get_running_loop()
        grace = END_GRACE_POLLS * state.poll_seconds
        quiet_since: float | None = None
        snap = await run_in_threadpool(poll_latest, state, self.study_id, hub.history)
        if len(snap.events) == hub.history:
            self.floor = self.cursor = snap.events[0].id - 1  # type: ignore[operator]
        while True:
            hub.polls[self.study_id] += 1
            self._publish(snap)
            self.ready.set()
            if snap.progress is None:
                self._end(Message.of_data("end", {"id": self.study_id, "status": "deleted"}))
                return
            if snap.events or not snap.finished:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = loop.time()
            if len(snap.events) < BATCH:  # else more are waiting: poll again at once
                if quiet_since is not None and loop.time() - quiet_since >= grace:
                    self._end(Message.of_data("end", snap.progress))
                    return
                await asyncio.sleep(state.poll_seconds)
            snap = await run_in_threadpool(poll, state, self.study_id, self.cursor)

    def _publish(self, snap: Snapshot) -> None:
        """Remember and offer the new events, then the progress if it changed (no await: every
        subscriber sees the same order, and a joining one either gets a message here or in
        :meth:`since`)."""
        for message in snap.events:
            self.recent.append(message)
            self.cursor = message.id  # type: ignore[assignment]
            for sub in self.subscribers:
                sub.offer(message)
        while len(self.recent) > self.hub.history:
            self.floor = self.recent.popleft().id  # type: ignore[assignment]
        if snap.progress is not None:
            progress = Message.of_data("progress", snap.progress)
            if self.progress is None or progress.chunk != self.progress.chunk:
                self.progress = progress
                for sub in self.subscribers:
                    sub.offer(progress)

    def _end(self, message: Message) -> None:
        self.ended = message
        for sub in self.subscribers:
            sub.offer(message)


class EventHub:
    """The feeds of this API process, by study id; started and closed by the app's lifespan."""

    def __init__(self, state: AppState, *, queue_limit: int = QUEUE_LIMIT, history: int = HISTORY) -> None:
        self.state = state
        self.queue_limit = queue_limit
        self.history = history
        self.feeds: dict[str, StudyFeed] = {}
        self.polls: Counter[str] = Counter()  # database polls per study (all its feeds together)
        self.closed = False

    def join(self, study_id: str, sub: Subscriber) -> StudyFeed:
        """Register ``sub`` with the study's feed, starting one if none runs."""
        if self.closed:
            raise RuntimeError("the event hub is closed (the service is shutting down)")
        feed = self.feeds.get(study_id)
        if feed is None or feed.ended is not None or feed.failed:
            feed = self.feeds[study_id] = StudyFeed(self, study_id)
        feed.subscribers.add(sub)
        return feed

    def leave(self, feed: StudyFeed, sub: Subscriber) -> None:
        """Unregister ``sub``; the last one to leave stops the feed."""
        feed.subscribers.discard(sub)
        if not feed.subscribers and feed.ended is None:
            feed.task.cancel()
            self.forget(feed)

    def forget(self, feed: StudyFeed) -> None:
        if self.feeds.get(feed.study_id) is feed:
            del self.feeds[feed.study_id]

    async def close(self) -> None:
        """Stop every feed and close its subscribers' streams (without ``end``: they reconnect)."""
        self.closed = True
        feeds = list(self.feeds.values())
        for feed in feeds:
            feed.task.cancel()
            for sub in feed.subscribers:
                sub.close()
        await asyncio.gather(*(feed.task for feed in feeds), return_exceptions=True)
        self.feeds.clear()

    async def follow(self, study_id: str, after: int) -> AsyncIterator[bytes]:
        """The encoded messages of one subscriber: the events after ``after``, the progress, then
        live until ``end``. Its queue and catching up are described in the module's docstring."""
        if self.closed:  # shutting down: no stream (the client reconnects to the next server)
            return
        sub = Subscriber(self.queue_limit)
        sent = _Sent(after)
        feed = self.join(study_id, sub)
        try:
            await feed.ready.wait()
            while not (sub.closed or feed.failed):
                while sent.after < feed.floor:  # further back than the feed remembers: read the database
                    batch = await run_in_threadpool(read_events, self.state, study_id, sent.after)
                    for message in batch:
                        if sent.fresh(message):
                            yield message.chunk
                    if len(batch) < BATCH:
                        break
                # no await from here to `live = True`: nothing published meanwhile is missed
                backlog = feed.since(sent.after) + [m for m in (feed.progress, feed.ended) if m is not None]
                sub.take()
                sub.live = True
                while True:
                    for message in backlog:
                        if sent.fresh(message):
                            yield message.chunk
                            if message.kind == "end":
                                return
                    if not sub.live or sub.closed or feed.failed:
                        break  # fell behind (or closing): catch up again
                    await sub.wake.wait()
                    backlog = sub.take()
        finally:
            self.leave(feed, sub)


@dataclass
class _Sent:
    """What a subscriber has sent: the last event id and the last progress."""

    after: int
    progress: bytes | None = None

    def fresh(self, message: Message) -> bool:
        """Whether ``message`` is new to this subscriber (and note it as sent)."""
        if message.id is not None:
            if message.id <= self.after:
                return False
            self.after = message.id
        elif message.kind == "progress":
            if message.chunk == self.progress:
                return False
            self.progress = message.chunk
        return True
