"""Every Prometheus family MedBridge reports, defined once (README, "Metrics").

prometheus-client keeps families in a process-wide registry; that is its idiom, and the reason these
are module-level objects: a second definition of a name would be an error, so every part of
MedBridge imports the family from here rather than making its own. Values that are state rather than
events (outbox backlog, delivery queues, journal fill) are read at scrape time instead
(integration.app.metrics). Labels are bounded: topics, consumer groups, route templates, configured
destinations, SOP Class UIDs, status codes; never a study, instance or patient identifier.

The ``observe_*`` functions are the calls the code makes; a family that several places feed gets one.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# latency buckets from 1 ms (a FHIR read) to 5 min (inference on a slow CPU)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# DICOM edge ------------------------------------------------------------------------------------------
DICOM_ASSOCIATIONS = Counter(
    "medbridge_dicom_associations", "DICOM associations asked for, by calling AE (a configured peer's title, "
    "else 'other') and outcome (accepted, or the rejection)", ["calling_ae", "outcome"])
DICOM_INSTANCES = Counter(
    "medbridge_dicom_instances", "C-STORE and STOW-RS instances answered, by SOP Class UID and DIMSE status "
    "(0x0000 stored, 0xb000 duplicate, 0xa700 out of resources, ...)", ["sop_class", "status"])
DICOM_RECEIVED_BYTES = Counter("medbridge_dicom_received_bytes", "Bytes of DICOM data sets received")
DICOM_JOURNAL_SYNC_SECONDS = Histogram(
    "medbridge_dicom_journal_sync_seconds", "Time of one receive-journal fdatasync (a group commit)",
    buckets=_SECONDS)

# HTTP edge (FHIR, DICOMweb, API) -----------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "medbridge_http_requests", "HTTP requests by route template (never the raw path), method and status",
    ["route", "method", "status"])
HTTP_REQUEST_SECONDS = Histogram(
    "medbridge_http_request_duration_seconds", "HTTP request latency by route template and method",
    ["route", "method"], buckets=_SECONDS)

# events -----------------------------------------------------------------------------------------------
EVENTS_PUBLISHED = Counter("medbridge_events_published", "Events the outbox relay published, by topic", ["topic"])
EVENTS_CONSUMED = Counter(
    "medbridge_events_consumed", "Events a consumer finished, by consumer, topic and outcome "
    "(processed, duplicate, dead_lettered)", ["consumer", "topic", "outcome"])
EVENT_PROCESSING_SECONDS = Histogram(
    "medbridge_event_processing_seconds", "Time from taking an event to committing its outcome",
    ["consumer", "topic"], buckets=_SECONDS)
EVENT_RETRIES = Counter(
    "medbridge_event_retries", "Retries of an event by a consumer: transient (paused) or failure (counted "
    "against max attempts)", ["consumer", "kind"])
EVENTS_DEAD_LETTERED = Counter(
    "medbridge_events_dead_lettered", "Events set aside as dead letters since start, by topic", ["topic"])
CONSUMER_LAG = Gauge(
    "medbridge_consumer_lag", "Messages behind the partition's end, per consumer group and partition "
    "(as kafka_consumergroup_lag), measured after each fetch", ["group", "topic", "partition"],
    multiprocess_mode="livemostrecent")  # in worker child processes: the partition's latest owner, no pid label

# inference and generation ------------------------------------------------------------------------------
INFERENCE_SECONDS = Histogram(
    "medbridge_inference_seconds", "Time of one inference call, by model", ["model"], buckets=_SECONDS)
INFERENCE_BATCH_SIZE = Histogram(
    "medbridge_inference_batch_size", "Inputs in one inference call, by model", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
LLM_TOKENS_PER_SECOND = Histogram(
    "medbridge_llm_tokens_per_second", "Generated tokens per second of one generation, by model", ["model"],
    buckets=(0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
LLM_TIME_TO_FIRST_TOKEN_SECONDS = Histogram(
    "medbridge_llm_time_to_first_token_seconds", "Time from a generation's request to its first token",
    ["model"], buckets=_SECONDS)

# review ----------------------------------------------------------------------------------------------
REVIEW_DECISIONS = Counter("medbridge_review_decisions", "Clinician review decisions, by action", ["action"])


def observe_inference(model: str, seconds: float, batch_size: int) -> None:
    """One inference call of ``model`` over ``batch_size`` inputs."""
    INFERENCE_SECONDS.labels(model).observe(seconds)
    INFERENCE_BATCH_SIZE.labels(model).observe(batch_size)


def observe_generation(model: str, tokens: int, seconds: float, first_token_seconds: float | None = None) -> None:
    """One LLM generation of ``tokens`` tokens in ``seconds`` (request to last token); a backend that
    streams also gives the time to its first token. ``model`` is the configured model's name, not a path."""
    if seconds > 0 and tokens > 0:
        LLM_TOKENS_PER_SECOND.labels(model).observe(tokens / seconds)
    if first_token_seconds is not None:
        LLM_TIME_TO_FIRST_TOKEN_SECONDS.labels(model).observe(first_token_seconds)


def observe_instance(sop_class: str, status: int, size: int) -> None:
    """One DICOM instance answered with ``status`` (its data set ``size`` bytes)."""
    DICOM_INSTANCES.labels(sop_class[:64], f"0x{status:04x}").inc()
    DICOM_RECEIVED_BYTES.inc(size)
