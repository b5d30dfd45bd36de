"""What /metrics serves: the families of integration.observability.metrics (events that happened in
this process), the state read from the store at scrape time (outbox, delivery queues) and the lines
the edges add (DICOM refusals, journal fill).

State is read when scraped, not kept in gauges that code must remember to update: the store is the
truth, and any process of a cluster reads the same backlog.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from integration.db.store import Store
from integration.db.tables import DeliveryJob, OutboxEntry, utcnow
from integration.delivery.queue import aware
from integration.observability import multiprocess


class StoreState(Collector):
    """Outbox backlog and the age of its oldest row; delivery jobs by kind, destination and state, and the
    age of the oldest pending one per destination. Destinations are the configured EHR base URLs and
    PACS AE titles: bounded by the configuration."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = utcnow()
        with self.store.session() as s:
            backlog, oldest = s.execute(
                select(func.count(), func.min(OutboxEntry.created_at)).where(OutboxEntry.published_at.is_(None))
            ).one()
            jobs = s.execute(
                select(DeliveryJob.kind, DeliveryJob.destination, DeliveryJob.state, func.count(),
                       func.min(DeliveryJob.created_at))
                .group_by(DeliveryJob.kind, DeliveryJob.destination, DeliveryJob.state)
            ).all()
        yield GaugeMetricFamily("medbridge_outbox_backlog", "Outbox events not yet published", value=backlog)
        yield GaugeMetricFamily("medbridge_outbox_oldest_age_seconds",
                                "Age of the oldest outbox event not yet published (0 when none)",
                                value=_age(now, oldest))
        depth = GaugeMetricFamily(
            "medbridge_delivery_queue_depth", "Delivery jobs by kind (ehr, pacs), destination and state "
            "(pending, sent, dead)", labels=["kind", "destination", "state"])
        age = GaugeMetricFamily(
            "medbridge_delivery_oldest_pending_age_seconds", "Age of the oldest pending delivery job per "
            "destination", labels=["kind", "destination"])
        for kind, destination, state, count, first in jobs:
            depth.add_metric([kind, destination, state], count)
            if state == "pending":
                age.add_metric([kind, destination], _age(now, first))
        yield depth
        yield age


def _age(now: datetime, then: datetime | None) -> float:
    return max(0.0, (now - aware(then)).total_seconds()) if then is not None else 0.0


def exposition(store: Store, child_processes: Sequence[Path] = ()) -> str:
    """The Prometheus text of this process's families (with the counts of its child processes summed in, from
    their folders: integration.observability.multiprocess) and the store's state now."""
    state = CollectorRegistry(auto_describe=False)
    state.register(StoreState(store))
    return (multiprocess.exposition(child_processes) + generate_latest(state)).decode()
