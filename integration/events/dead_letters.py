"""The dead-letter store's rules beyond a consumer's own letters: what else is set aside there, how a
letter is replayed, and what /health and /metrics count.

Set aside here, each with its reason, so that one item never stalls the others and nothing is dropped
without a trace:

- an event its consumer never processed after the outbox published it ``max_publishes`` times
  (:func:`dead_letter_unprocessed`, called by the outbox relay);
- an outbox row the relay cannot send (:func:`set_aside_outbox_row`);
- a study or record whose announcement fails (:func:`set_aside_tracker`, called by the quiet-period
  publishers): the letter's topic is ``tracker:<kind>`` and its payload the tracker's key.

A replay (:func:`replay`) puts the letter's event back in the outbox (or the tracker back to due) once;
the consumer's "processed" mark keeps the event processed exactly once however often it arrives.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import orjson
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from integration.db.store import Store
from integration.db.tables import ChangeTracker, DeadLetter, OutboxEntry, ProcessedEvent, utcnow
from integration.errors import MedBridgeError

TRACKER_TOPIC_PREFIX = "tracker:"
RELAY = "outbox-relay"  # the consumer name of letters the relay sets aside (nothing records them processed)


class DeadLetterNotFoundError(MedBridgeError):
    """No dead letter has this id (HTTP 404)."""


class ReplayRefusedError(MedBridgeError):
    """The letter was replayed already, its event was processed meanwhile, or it names nothing to
    replay (HTTP 409); the message says which."""


def never_processed_reason(deliveries: int) -> str:
    return (f"never processed after {deliveries} deliveries: its consumer did not record it; check that the "
            "consumer runs (GET /health), then replay it")


def dead_letter_unprocessed(store: Store, consumers_by_topic: dict[str, str], older_than_seconds: float,
                            max_publishes: int) -> dict[str, int]:
    """Dead-letter every published event its topic's consumer has not processed although the outbox
    published it ``max_publishes`` times, the last more than ``older_than_seconds`` ago (the point where
    ``Store.requeue_unprocessed`` stops republishing it). Each such event gets one letter. Returns how
    many per topic."""
    cutoff = datetime.fromtimestamp(time.time() - older_than_seconds, UTC)
    found: dict[str, int] = {}
    with store.session() as s:
        for topic, consumer in consumers_by_topic.items():
            done = select(ProcessedEvent.event_id).where(ProcessedEvent.consumer == consumer)
            lettered = select(DeadLetter.event_id).where(DeadLetter.event_id.is_not(None),
                                                         DeadLetter.replayed_at.is_(None))
            rows = s.scalars(select(OutboxEntry).where(
                OutboxEntry.topic == topic,
                OutboxEntry.published_at.is_not(None),
                OutboxEntry.published_at < cutoff,
                OutboxEntry.publish_count >= max_publishes,
                OutboxEntry.event_id.not_in(done),
                OutboxEntry.event_id.not_in(lettered),
            ).order_by(OutboxEntry.id)).all()
            for row in rows:
                s.add(DeadLetter(consumer=consumer, topic=topic, event_id=row.event_id,
                                 error=never_processed_reason(row.publish_count), payload=row.payload))
            if rows:
                found[topic] = len(rows)
    return found


def set_aside_outbox_row(store: Store, row_id: int, error: str) -> None:
    """An outbox row the relay cannot send: marked published (so it is not sent again and again) and
    dead-lettered with ``error`` (so ``requeue_unprocessed`` leaves it until it is replayed)."""
    with store.session() as s:
        row = s.get(OutboxEntry, row_id)
        if row is None:
            return
        row.published_at = utcnow()
        s.add(DeadLetter(consumer=RELAY, topic=row.topic, event_id=row.event_id, error=error[:4000],
                         payload=row.payload))


def set_aside_tracker(store: Store, kind: str, key: str, revision: int, error: str) -> bool:
    """A study (or record) whose announcement failed at ``revision``: that revision is marked published,
    so it is not retried for ever ahead of the others, and dead-lettered with ``error``. A later change
    (a new instance) makes it due again. False when the tracker moved on meanwhile (nothing set aside)."""
    with store.session() as s:
        claimed = s.execute(update(ChangeTracker).where(
            ChangeTracker.kind == kind, ChangeTracker.key == key, ChangeTracker.revision == revision,
            ChangeTracker.published_revision < revision,
        ).values(published_revision=revision))
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return False
        s.add(DeadLetter(consumer=f"{kind}-publisher", topic=TRACKER_TOPIC_PREFIX + kind, event_id=None,
                         error=f"{error[:3900]} (revision {revision})", payload=key))
    return True


def replay(store: Store, letter_id: int, by: str) -> DeadLetter:
    """Owe the letter's event again: its outbox row goes back to pending with a fresh redelivery budget
    (or, for a set-aside tracker, the tracker becomes due). Marks the letter ``replayed_at``/``by``.

    Exactly once: the letter is claimed by a conditional UPDATE (one of two concurrent replays wins),
    and an event its consumer already processed is refused. Raises DeadLetterNotFoundError or
    ReplayRefusedError (and nothing changes)."""
    with store.session() as s:
        claimed = s.execute(update(DeadLetter).where(DeadLetter.id == letter_id, DeadLetter.replayed_at.is_(None))
                            .values(replayed_at=utcnow(), replayed_by=by[:256]))
        letter = s.get(DeadLetter, letter_id)
        if letter is None:
            raise DeadLetterNotFoundError(f"dead letter {letter_id} is not known; list them with GET /api/dead-letters")
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            raise ReplayRefusedError(f"dead letter {letter_id} was replayed already (at {letter.replayed_at}, by "
                                     f"{letter.replayed_by}); a replayed event is processed once")
        if letter.topic.startswith(TRACKER_TOPIC_PREFIX):
            _make_due(s, letter.topic.removeprefix(TRACKER_TOPIC_PREFIX), letter.payload)
            return letter
        if letter.event_id is None:
            raise ReplayRefusedError(f"dead letter {letter_id} could not be read as an event; nothing to replay "
                                     "(send the data again at its source)")
        if s.get(ProcessedEvent, (letter.consumer, letter.event_id)) is not None:
            raise ReplayRefusedError(f"the event of dead letter {letter_id} was processed already by "
                                     f"{letter.consumer}; nothing to replay")
        entry = s.scalars(select(OutboxEntry).where(OutboxEntry.event_id == letter.event_id)).one_or_none()
        if entry is None:  # an event that came by the broker alone (not through this store's outbox)
            s.add(OutboxEntry(event_id=letter.event_id, topic=letter.topic, key=None,
                              event_type=_event_type(letter.payload), payload=letter.payload))
        else:
            entry.published_at, entry.publish_count = None, 0
        return letter


def _make_due(s: Session, kind: str, key: str) -> None:
    s.execute(update(ChangeTracker).where(ChangeTracker.kind == kind, ChangeTracker.key == key,
                                          ChangeTracker.published_revision >= ChangeTracker.revision)
              .values(published_revision=ChangeTracker.revision - 1, last_change_at=0.0))


def _event_type(payload: str) -> str:
    try:
        value = orjson.loads(payload).get("event_type")
    except (orjson.JSONDecodeError, AttributeError):
        value = None
    return str(value)[:64] if value else "unknown"


def waiting_by_topic(store: Store) -> dict[str, int]:
    """Dead letters not replayed yet, per topic (what /health and /metrics show)."""
    with store.read_session() as s:
        rows = s.execute(select(DeadLetter.topic, func.count()).where(DeadLetter.replayed_at.is_(None))
                         .group_by(DeadLetter.topic)).all()
    return {topic: int(n) for topic, n in rows}
