"""Topic setup: MedBridge's topics exist on whichever cluster the runtime talks to.

A topic's partition count is the most members of one consumer group that get work: 12 by default
(``MEDBRIDGE_KAFKA_PARTITIONS``), enough for a department's worker processes. Topics that exist keep
the count they were made with: Kafka only grows a topic by an admin command (see the README).
"""

from __future__ import annotations

import contextlib

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from schemas.events import ALL_TOPICS

DEFAULT_PARTITIONS = 12


async def ensure_topics(
    bootstrap: str, partitions: int = DEFAULT_PARTITIONS, topics: tuple[str, ...] = ALL_TOPICS,
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


async def partition_counts(bootstrap: str, topics: tuple[str, ...] = ALL_TOPICS) -> dict[str, int]:
    """How many partitions each of ``topics`` has on the cluster (absent topics left out)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    return {d["topic"]: len(d["partitions"]) for d in described if not d.get("error_code")}
