"""Job-completion events: from the store's outbox to webhooks and a local command.

``record_complete`` writes the event in the same transaction that makes the job
complete (an outbox), so none is lost across restarts. ``EventDelivery`` polls the
outbox and delivers each event to every configured webhook (HTTP POST, JSON body)
and command (the JSON on standard input). The outbox remembers which targets took
an event; a retry (exponential backoff) goes only to the others, and the event is
done once all have it. Delivery is at least once (a target may see an event again
if the server stops between its answer and the record): receivers drop duplicates
by the event's stable ``id``.
"""

from __future__ import annotations

import json
import random
import shlex
from io import BytesIO
from typing import Any

from twisted.internet import defer, task, utils
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from filedock.store.metadata import DeferredStore
from filedock.store.model import Event

log = Logger(namespace="filedock.events")


class DeliveryError(Exception):
    """A target did not accept an event."""


class EventDelivery:
    """Delivers outbox events; ``poke()`` after a completion for a prompt first try."""

    def __init__(self, store: DeferredStore, reactor: Any, webhooks: list[str], commands: list[str],
                 interval: float = 2.0, max_backoff: float = 300.0, timeout: float = 30.0) -> None:
        self.store, self.reactor = store, reactor
        self.webhooks, self.commands = list(webhooks), list(commands)
        self.interval, self.max_backoff, self.timeout = interval, max_backoff, timeout
        self.agent = Agent(reactor, connectTimeout=timeout)
        self._next_try: dict[str, float] = {}
        self._running: defer.Deferred | None = None
        self._loop = task.LoopingCall(self.poke)
        self._loop.clock = reactor
        self.delivered = 0

    @property
    def enabled(self) -> bool:
        return bool(self.webhooks or self.commands)

    def start(self) -> None:
        if self.enabled:
            self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def poke(self) -> defer.Deferred:
        """Deliver what is due now; overlapping calls share one pass."""
        if not self.enabled:
            return defer.succeed(0)
        if self._running is None:
            self._running = self._pass()
            self._running.addErrback(lambda f: log.failure("event delivery pass failed", f))
            self._running.addBoth(self._done)
        return self._running

    def _done(self, result: Any) -> Any:
        self._running = None
        return result

    @defer.inlineCallbacks
    def _pass(self):
        events = yield self.store.pending_events(100)
        now = self.reactor.seconds()
        sent = 0
        for event in events:
            if self._next_try.get(event.id, 0) > now:
                continue
            accepted = yield self._deliver(event)
            ok = set(accepted) >= set(self.targets())
            yield self.store.mark_event(event.id, ok, sorted(accepted))
            if ok:
                sent += 1
                self.delivered += 1
                self._next_try.pop(event.id, None)
            else:
                delay = min(self.max_backoff, 2 ** min(event.attempts + 1, 16)) * random.uniform(0.8, 1.2)
                self._next_try[event.id] = now + delay
        return sent

    def targets(self) -> list[str]:
        """Every configured target, named as the outbox remembers them."""
        return [f"webhook {url}" for url in self.webhooks] + [f"command {cmd}" for cmd in self.commands]

    @defer.inlineCallbacks
    def _deliver(self, event: Event):
        """Offer the event to each target that has not taken it yet; returns every target that has."""
        body = json.dumps(event.payload, sort_keys=True).encode()
        accepted = list(event.delivered_to)
        for url in self.webhooks:
            if f"webhook {url}" in accepted:
                continue
            try:
                yield self._post(url, event, body)
                accepted.append(f"webhook {url}")
            except Exception as exc:  # noqa: BLE001 - any failure means "try again later"
                log.warn("webhook {url} refused event {id}: {why}", url=url, id=event.id, why=str(exc)[:200])
        for command in self.commands:
            if f"command {command}" in accepted:
                continue
            out, err, code = yield utils.getProcessOutputAndValue(
                "/bin/sh", ["-c", command], env=None, reactor=self.reactor, stdinBytes=body)
            if code == 0:
                accepted.append(f"command {command}")
            else:
                log.warn("command {cmd} failed on event {id} with status {code}: {err}",
                         cmd=shlex.quote(command), id=event.id, code=code, err=err[-200:])
        return accepted

    @defer.inlineCallbacks
    def _post(self, url: str, event: Event, body: bytes):
        headers = Headers({b"Content-Type": [b"application/json"], b"X-Filedock-Event": [event.kind.encode()],
                           b"X-Filedock-Event-Id": [event.id.encode()]})
        d = self.agent.request(b"POST", url.encode(), headers, FileBodyProducer(BytesIO(body)))
        d.addTimeout(self.timeout, self.reactor)
        response = yield d
        yield readBody(response)
        if not 200 <= response.code < 300:
            raise DeliveryError(f"HTTP {response.code}")

