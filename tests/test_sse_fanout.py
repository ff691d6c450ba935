"""Live streams fan out (issue 19, item 3), on SQLite and PostgreSQL: one poller per study feeds
every subscriber of `GET /studies/{id}/events`; each gets every event in order; a client that stops
reading delays no one and catches up when it reads again; resume by Last-Event-ID; the poller stops
with its last subscriber.

Subscribers are driven straight through the ASGI app on one event loop (no sockets): a stalled
client is a `send` that does not return, as uvicorn's does when the peer stops reading."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from service.api import event_hub
from service.app import create_app
from service.db import Event, StudyStatus
from tests import api_fixtures as fx

db_url, llama = fx.db_url, fx.llama  # fixtures
POLL = 0.05
LIMIT_S = 60  # every test's bound


class Listener:
    """One subscriber: a GET of the stream through the app, its messages parsed as they come.
    ``stalled``: its first body chunk is not acknowledged until :meth:`release` (a client that
    stopped reading)."""

    def __init__(self, app: Any, sid: str, *, headers: dict[str, str] | None = None,
                 after: int | None = None, stalled: bool = False) -> None:
        self.app, self.sid, self.after = app, sid, after
        self.headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self.status: int | None = None
        self.buffer = b""
        self.messages: list[dict[str, str]] = []
        self.gone = asyncio.Event()
        self.released = asyncio.Event()
        if not stalled:
            self.released.set()
        self.first_chunk = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": f"/studies/{self.sid}/events", "raw_path": b"", "root_path": "",
                 "query_string": b"" if self.after is None else f"after={self.after}".encode(),
                 "headers": [(b"host", b"127.0.0.1"), *self.headers],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
        await self.app(scope, self._receive, self._send)

    async def _receive(self) -> dict[str, Any]:
        if not hasattr(self, "_asked"):
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            return
        self.buffer += message.get("body", b"")
        while b"\r\n\r\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            fields = dict(line.split(": ", 1) for line in block.decode().split("\r\n") if ": " in line)
            if "data" in fields:
                self.messages.append(fields)
        self.first_chunk.set()
        await self.released.wait()

    def release(self) -> None:
        self.released.set()

    async def leave(self) -> None:
        self.gone.set()
        await asyncio.wait_for(self.task, 10)

    def ids(self) -> list[int]:
        return [int(m["id"]) for m in self.messages if "id" in m]

    def kinds(self) -> list[str]:
        return [m.get("event", "") for m in self.messages]

    def ended(self) -> bool:
        return self.task.done()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, LIMIT_S))


async def started(db_url: str, tmp_path, model_root, llama):
    """The app (its lifespan is entered by the caller) and a fake controller on its database."""
    app = create_app(fx.make_settings(db_url, tmp_path, model_root), start_controller=False,
                     poll_seconds=POLL)
    ctl = fx.FakeController(db_url)
    return app, ctl


async def submit(app: Any, ctl: fx.FakeController, llama, status: StudyStatus | None) -> str:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
        r = await http.post("/studies", json=fx.spec_data(llama))
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    if status is not None:
        await asyncio.to_thread(ctl.set_status, sid, status)
    return sid


def stored_ids(ctl: fx.FakeController, sid: str) -> list[int]:
    with ctl.sessions() as s:
        return [e.id for e in s.query(Event).filter_by(study_id=sid).order_by(Event.id)]


async def until(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def write_trials(ctl: fx.FakeController, sid: str, first: int, count: int, pause: float = 0.0) -> None:
    for n in range(first, first + count):
        await asyncio.to_thread(ctl.add_trial, sid, n, n / 100)
        if pause:
            await asyncio.sleep(pause)


def count_reads(monkeypatch) -> list[str]:
    """The database catch-up reads of subscribers (not the feed's polls), by study id."""
    reads: list[str] = []
    original = event_hub.read_events

    def counted(state, study_id, after, limit=event_hub.BATCH):
        reads.append(study_id)
        return original(state, study_id, after, limit)

    monkeypatch.setattr(event_hub, "read_events", counted)
    return reads


# ---- many subscribers, one poller ------------------------------------------------------------------
def test_every_subscriber_gets_every_event_in_order_from_one_poller(db_url, tmp_path, model_root, llama,
                                                                   monkeypatch):
    reads = count_reads(monkeypatch)

    async def main() -> None:
        app, ctl = await started(db_url, tmp_path, model_root, llama)
        async with app.router.lifespan_context(app):
            hub = app.state.evomerge.hub
            sid = await submit(app, ctl, llama, StudyStatus.RUNNING)
            began = time.monotonic()
            listeners = [Listener(app, sid) for _ in range(30)]
            await until(lambda: all(lst.messages for lst in listeners), "every subscriber's first message")
            assert len(hub.feeds) == 1 and len(hub.feeds[sid].subscribers) == 30
            await write_trials(ctl, sid, 0, 40, pause=0.005)  # while they listen
            late = [Listener(app, sid) for _ in range(5)]  # join mid-way: history from the feed's memory
            await write_trials(ctl, sid, 40, 10)
            await asyncio.to_thread(ctl.set_status, sid, StudyStatus.COMPLETED)
            await asyncio.gather(*(lst.task for lst in listeners + late))
            elapsed = time.monotonic() - began
            ids = stored_ids(ctl, sid)
            assert len(ids) == 53  # submitted, running, 50 trials, completed
            for lst in listeners + late:
                assert lst.status == 200 and lst.ids() == ids, lst.kinds()
                assert lst.kinds()[-1] == "end"
                assert json.loads(lst.messages[-1]["data"])["status"] == "completed"
                progress = [json.loads(m["data"]) for m in lst.messages if m.get("event") == "progress"]
                assert progress[-1]["trials_done"] == 50 and progress[-1]["best_value"] == 0.49
                assert set(progress[-1]) == event_hub.PROGRESS_FIELDS  # the dashboard reads these
            # one poll per POLL seconds for the study, whatever the number of subscribers
            assert hub.polls[sid] <= elapsed / POLL + 2, (hub.polls[sid], elapsed)
            assert reads == []  # no subscriber read the database itself
            assert hub.feeds == {}  # the feed ended with the study
        ctl.close()

    run(main())


# ---- a client that stops reading -------------------------------------------------------------------
def test_a_stalled_subscriber_delays_no_one_and_catches_up_later(db_url, tmp_path, model_root, llama):
    async def main() -> None:
        app, ctl = await started(db_url, tmp_path, model_root, llama)
        async with app.router.lifespan_context(app):
            hub = app.state.evomerge.hub
            hub.queue_limit = 4
            sid = await submit(app, ctl, llama, StudyStatus.RUNNING)
            stalled = Listener(app, sid, stalled=True)
            await until(lambda: stalled.first_chunk.is_set(), "the stalled subscriber's first chunk")
            others = [Listener(app, sid) for _ in range(5)]
            await until(lambda: all(lst.messages for lst in others), "the others' first message")
            feed = hub.feeds[sid]
            await write_trials(ctl, sid, 0, 30, pause=0.002)
            await until(lambda: all(len(lst.ids()) == 32 for lst in others), "the others' events")
            behind = [sub for sub in feed.subscribers if not sub.live]
            assert len(behind) == 1 and behind[0].dropped >= 1  # the stalled one, and only it
            assert all(len(sub.items) <= hub.queue_limit for sub in feed.subscribers)  # memory stays bounded
            await asyncio.to_thread(ctl.set_status, sid, StudyStatus.COMPLETED)
            await asyncio.gather(*(lst.task for lst in others))  # while the stalled one still is
            ids = stored_ids(ctl, sid)
            assert all(lst.ids() == ids and lst.kinds()[-1] == "end" for lst in others)
            assert not stalled.ended() and len(stalled.messages) == 1
            stalled.release()  # it reads again: it catches up on its own, in order, and ends
            await asyncio.wait_for(stalled.task, 20)
            assert stalled.ids() == ids and stalled.kinds()[-1] == "end"
        ctl.close()

    run(main())


# ---- resume --------------------------------------------------------------------------------------
def test_resume_by_last_event_id_from_memory_and_from_the_database(db_url, tmp_path, model_root, llama,
                                                                  monkeypatch):
    reads = count_reads(monkeypatch)

    async def main() -> None:
        app, ctl = await started(db_url, tmp_path, model_root, llama)
        async with app.router.lifespan_context(app):
            hub = app.state.evomerge.hub
            hub.history = 5  # the feed remembers the last 5 events
            sid = await submit(app, ctl, llama, StudyStatus.RUNNING)
            await write_trials(ctl, sid, 0, 20)
            ids = stored_ids(ctl, sid)
            watcher = Listener(app, sid)  # keeps the feed up
            await until(lambda: len(watcher.ids()) == len(ids), "the first subscriber's history")
            assert reads == [sid]  # it started before the feed's memory: one database read
            recent = Listener(app, sid, headers={"Last-Event-ID": str(ids[-3])})
            old = Listener(app, sid, headers={"Last-Event-ID": str(ids[3])})
            query = Listener(app, sid, after=ids[10])
            await until(lambda: len(old.ids()) == len(ids) - 4, "the resumed subscribers")
            await write_trials(ctl, sid, 20, 3)
            await asyncio.to_thread(ctl.set_status, sid, StudyStatus.COMPLETED)
            await asyncio.gather(*(lst.task for lst in (watcher, recent, old, query)))
            ids = stored_ids(ctl, sid)
            assert watcher.ids() == ids
            assert recent.ids() == ids[20:]  # the 2 after ids[-3] of then, 3 trials, completed
            assert old.ids() == ids[4:] and query.ids() == ids[11:]
            assert reads.count(sid) == 3  # the first subscriber, `old` and `query`; `recent` from memory
        ctl.close()

    run(main())


# ---- the feed's lifetime ---------------------------------------------------------------------------
def test_the_poller_stops_with_its_last_subscriber(db_url, tmp_path, model_root, llama):
    async def main() -> None:
        app, ctl = await started(db_url, tmp_path, model_root, llama)
        async with app.router.lifespan_context(app):
            hub = app.state.evomerge.hub
            sid = await submit(app, ctl, llama, StudyStatus.RUNNING)
            listeners = [Listener(app, sid) for _ in range(3)]
            await until(lambda: all(lst.messages for lst in listeners), "the first messages")
            feed = hub.feeds[sid]
            await listeners[0].leave()
            await listeners[1].leave()
            assert hub.feeds.get(sid) is feed and not feed.task.done()
            await listeners[2].leave()
            await until(feed.task.done, "the feed to stop")
            assert sid not in hub.feeds
            polls = hub.polls[sid]
            await asyncio.sleep(5 * POLL)
            assert hub.polls[sid] == polls  # no poller left
            again = Listener(app, sid)  # a new subscriber starts a new one
            await until(lambda: bool(again.messages), "the new subscriber's first message")
            assert hub.feeds[sid] is not feed and hub.polls[sid] > polls
        # shutting down closes the stream without `end` (a client reconnects to the next server)
        await asyncio.wait_for(again.task, 10)
        assert "end" not in again.kinds() and hub.feeds == {}
        ctl.close()

    run(main())


@pytest.mark.parametrize("status", [StudyStatus.COMPLETED, None])
def test_a_deleted_or_final_study_ends_every_stream(db_url, tmp_path, model_root, llama, status,
                                                    monkeypatch):
    if status is None:  # the cancelled study's streams stay open until the delete
        monkeypatch.setattr(event_hub, "END_GRACE_POLLS", 200)

    async def main() -> None:
        app, ctl = await started(db_url, tmp_path, model_root, llama)
        async with app.router.lifespan_context(app):
            sid = await submit(app, ctl, llama, StudyStatus.CANCELLED if status is None else status)
            listeners = [Listener(app, sid) for _ in range(4)]
            if status is None:
                await until(lambda: all(lst.messages for lst in listeners), "the first messages")
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                             base_url="http://127.0.0.1") as http:
                    assert (await http.delete(f"/studies/{sid}")).status_code == 204
            await asyncio.gather(*(lst.task for lst in listeners))
            for lst in listeners:
                end = json.loads(lst.messages[-1]["data"])
                assert lst.kinds()[-1] == "end"
                assert end["status"] == ("deleted" if status is None else "completed")
        ctl.close()

    run(main())
