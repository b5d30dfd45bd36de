"""Settings: one object, built once by the composition root, passed down.

Every field can be set by an environment variable (name in the README). Nothing reads the
environment at import time.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class DicomPeer(BaseModel):
    """A DICOM application MedBridge knows: it may call us, and we may send to it (C-MOVE, export)."""

    ae_title: str
    host: str
    port: int | None = None  # where it listens; needed only to send to it
    export: bool = False  # receives MedBridge's AI results (SR + Secondary Capture)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(Path("var"), alias="MEDBRIDGE_DATA_DIR")

    # DICOM edge
    # loopback unless told otherwise: a remote modality needs MEDBRIDGE_DICOM_HOST and a peer list
    dicom_host: str = Field("127.0.0.1", alias="MEDBRIDGE_DICOM_HOST")
    dicom_port: int = Field(11112, alias="MEDBRIDGE_DICOM_PORT")
    dicom_ae_title: str = Field("MEDBRIDGE", alias="MEDBRIDGE_AE_TITLE")
    study_quiet_seconds: float = Field(3.0, alias="MEDBRIDGE_STUDY_QUIET_SECONDS")
    # Known peers, JSON: [{"ae_title": "PACS", "host": "10.0.0.5", "port": 104, "export": true}]
    dicom_peers: list[DicomPeer] = Field(default_factory=list, alias="MEDBRIDGE_DICOM_PEERS")
    # Accept callers that are not peers; unset means "yes while no peers are configured"
    dicom_allow_any_caller: bool | None = Field(None, alias="MEDBRIDGE_DICOM_ALLOW_ANY_CALLER")
    # Answer to a duplicate SOP Instance (the first is kept): "warning" (0xB000) or "success"
    dicom_duplicate_status: Literal["warning", "success"] = Field("warning", alias="MEDBRIDGE_DICOM_DUPLICATE_STATUS")
    # Optional DICOM TLS listener on a second port (same AE and store); client CA makes it mutual TLS
    dicom_tls_port: int | None = Field(None, alias="MEDBRIDGE_DICOM_TLS_PORT")
    dicom_tls_cert: Path | None = Field(None, alias="MEDBRIDGE_DICOM_TLS_CERT")
    dicom_tls_key: Path | None = Field(None, alias="MEDBRIDGE_DICOM_TLS_KEY")
    dicom_tls_client_ca: Path | None = Field(None, alias="MEDBRIDGE_DICOM_TLS_CLIENT_CA")
    min_free_bytes: int = Field(1024**3, alias="MEDBRIDGE_MIN_FREE_BYTES")
    max_associations: int = Field(32, alias="MEDBRIDGE_MAX_ASSOCIATIONS")
    # the largest PDU the listener takes (what it advertises; 0: no limit); a P-DATA-TF is held whole
    # while read. 64 KiB: dcmtk senders slow down with the advertised size (4 MiB halved the C-STORE
    # bench with storescu as the sender), and larger PDUs save little once the fast path reads them
    max_pdu_bytes: int = Field(64 * 1024, ge=0, alias="MEDBRIDGE_MAX_PDU_BYTES")
    # the largest instance taken (C-STORE answers 0xA700 above it, STOW-RS 413), as sent and, for the
    # deflated transfer syntax, inflated
    dicom_max_instance_bytes: int = Field(1024**3, ge=1, alias="MEDBRIDGE_DICOM_MAX_INSTANCE_BYTES")
    # a connection that sends no A-ASSOCIATE-RQ within this many seconds is closed (it never counts
    # against MEDBRIDGE_MAX_ASSOCIATIONS); associations per caller address; connections waiting to
    # associate, in all (past it, or past the per-address cap, the oldest waiting one is closed)
    dicom_associate_timeout: float = Field(5.0, gt=0, alias="MEDBRIDGE_DICOM_ASSOCIATE_TIMEOUT")
    dicom_max_connections_per_address: int = Field(16, ge=1, alias="MEDBRIDGE_DICOM_MAX_CONNECTIONS_PER_ADDRESS")
    dicom_max_pending_connections: int = Field(128, ge=1, alias="MEDBRIDGE_DICOM_MAX_PENDING_CONNECTIONS")
    # Receive journal (integration/dicom_journal.py): a C-STORE is durable after one sync into it;
    # 0 writes each instance durably on its own (two syncs). Instances above 1/8 of it bypass it.
    dicom_journal_bytes: int = Field(64 * 1024**2, ge=0, alias="MEDBRIDGE_DICOM_JOURNAL_BYTES")
    # DICOM listener processes sharing the port (integration/dicom_processes.py): one per core for
    # parallel associations; 1 keeps the listener in the main process only
    dicom_processes: int = Field(1, ge=1, le=64, alias="MEDBRIDGE_DICOM_PROCESSES")
    # the clinical-report debounce: a patient's record is announced (a clinical report drafted) once no
    # write that changes the impression (integration.fhir.clinical_change) arrived for this long; the
    # tracker is a table row, so a restart inside the window loses nothing. The older name still works.
    record_quiet_seconds: float = Field(30.0, gt=0, validation_alias=AliasChoices(
        "MEDBRIDGE_CLINICAL_DEBOUNCE_SECONDS", "MEDBRIDGE_RECORD_QUIET_SECONDS", "record_quiet_seconds"))
    # ... and at the latest this long after the first such write, even if writes keep coming (a device feeding
    # vitals every few seconds would otherwise hold the draft back for ever); 0 waits for quiet alone
    record_max_wait_seconds: float = Field(300.0, ge=0, alias="MEDBRIDGE_CLINICAL_DEBOUNCE_MAX_SECONDS")

    # HTTP edge
    http_host: str = Field("127.0.0.1", alias="MEDBRIDGE_HTTP_HOST")
    http_port: int = Field(8000, alias="MEDBRIDGE_HTTP_PORT")
    max_request_bytes: int = Field(20 * 1024 * 1024, alias="MEDBRIDGE_MAX_REQUEST_BYTES")
    # the largest STOW-RS request (413 above it); spooled to disk under the DICOM folder, read a part at a time
    stow_max_bytes: int = Field(1024 * 1024 * 1024, ge=1, alias="MEDBRIDGE_STOW_MAX_BYTES")
    # QIDO-RS answers at most this many matches (a Warning says when there are more: page with offset)
    qido_max_results: int = Field(1000, ge=1, alias="MEDBRIDGE_QIDO_MAX_RESULTS")
    # browser apps on other origins (an OHIF viewer) that may call the API, comma-separated; empty: none
    cors_origins: str = Field("", alias="MEDBRIDGE_CORS_ORIGINS")
    # FHIR search: Bundle.total is exact up to this many matches and left out above (_summary=count counts all)
    fhir_exact_total_limit: int = Field(1000, alias="MEDBRIDGE_FHIR_EXACT_TOTAL_LIMIT")
    # processes that validate part of each large transaction Bundle beside the request
    # (integration/fhir_validation.py); default: one per core this process may use beyond the first,
    # at most 4; 0: none
    fhir_validation_workers: int = Field(
        default_factory=lambda: max(0, min(4, len(os.sched_getaffinity(0)) - 1)), ge=0, le=64,
        alias="MEDBRIDGE_FHIR_VALIDATION_WORKERS")

    # Audit trail: an AuditEvent (IHE BALP) per FHIR, DICOMweb and review request; false turns it off
    # (for a measurement, or where another component audits the same requests)
    audit_enabled: bool = Field(True, alias="MEDBRIDGE_AUDIT")
    # a copy of each AuditEvent as RFC 5424 syslog over TLS (IHE ATNA) to host:port; empty: none
    audit_syslog: str = Field("", alias="MEDBRIDGE_AUDIT_SYSLOG")
    # CA bundle that signed the syslog server's certificate (default: the system's)
    audit_syslog_ca: Path | None = Field(None, alias="MEDBRIDGE_AUDIT_SYSLOG_CA")

    # Host names this server answers to (DNS rebinding), comma-separated, beside localhost, 127.0.0.1,
    # ::1 and MEDBRIDGE_HTTP_HOST; "*" turns the check off (behind a proxy that checks it)
    allowed_hosts: str = Field("", alias="MEDBRIDGE_ALLOWED_HOSTS")
    # /metrics without a token (for a Prometheus on a trusted network); otherwise it needs the admin role
    metrics_public: bool = Field(False, alias="MEDBRIDGE_METRICS_PUBLIC")
    # log lines as text or JSON lines with trace and span ids (integration.observability.logs)
    log_format: Literal["text", "json"] = Field("text", alias="MEDBRIDGE_LOG_FORMAT")
    # spans as JSON lines in this file (tests, a look without a collector); OTLP export is set by the
    # standard OTEL_* variables (integration.observability.tracing); neither: no tracing at all
    trace_file: Path | None = Field(None, alias="MEDBRIDGE_TRACE_FILE")

    # Identity (integration/auth): an external OpenID provider, or MedBridge's embedded issuer when empty
    oidc_issuer: str = Field("", alias="MEDBRIDGE_OIDC_ISSUER")
    # the "aud" tokens must carry (the embedded issuer uses the same value)
    oidc_audience: str = Field("medbridge", alias="MEDBRIDGE_OIDC_AUDIENCE")
    # the claim (dotted path) holding MedBridge roles: integration, reviewer, admin
    oidc_roles_claim: str = Field("roles", alias="MEDBRIDGE_OIDC_ROLES_CLAIM")
    # accepted signature algorithms, comma-separated (asymmetric only; never none or HS*)
    oidc_algorithms: str = Field("RS256,RS384,RS512,PS256,PS384,PS512,ES256,ES384,ES512,EdDSA",
                                 alias="MEDBRIDGE_OIDC_ALGORITHMS")
    oidc_leeway_seconds: float = Field(30.0, ge=0, le=300, alias="MEDBRIDGE_OIDC_LEEWAY_SECONDS")
    # at most one JWKS fetch per this many seconds when tokens name an unknown key
    oidc_jwks_refresh_seconds: float = Field(10.0, ge=0, alias="MEDBRIDGE_OIDC_JWKS_REFRESH_SECONDS")
    # the embedded issuer's signing key (made at first start); default data_dir/auth/signing-key.pem
    auth_signing_key: Path | None = Field(None, alias="MEDBRIDGE_AUTH_SIGNING_KEY")
    # lifetime of the tokens the embedded issuer gives at a password login
    login_token_ttl_seconds: int = Field(8 * 3600, ge=60, alias="MEDBRIDGE_LOGIN_TOKEN_TTL_SECONDS")

    # Viewer
    viewer_host: str = Field("127.0.0.1", alias="MEDBRIDGE_VIEWER_HOST")
    viewer_port: int = Field(8501, alias="MEDBRIDGE_VIEWER_PORT")
    viewer_enabled: bool = Field(True, alias="MEDBRIDGE_VIEWER")
    # how long a reviewer's claim on a report (POST /api/reports/{id}/claim) holds it for them
    review_claim_seconds: int = Field(300, ge=10, le=86400, alias="MEDBRIDGE_REVIEW_CLAIM_SECONDS")

    # Broker: empty means "start the embedded tansu broker"
    kafka_bootstrap_servers: str = Field("", alias="KAFKA_BOOTSTRAP_SERVERS")
    embedded_kafka_port: int = Field(19092, alias="MEDBRIDGE_EMBEDDED_KAFKA_PORT")
    kafka_group_prefix: str = Field("medbridge", alias="MEDBRIDGE_KAFKA_GROUP_PREFIX")
    consumer_max_attempts: int = Field(3, alias="MEDBRIDGE_CONSUMER_MAX_ATTEMPTS")
    outbox_poll_seconds: float = Field(0.5, alias="MEDBRIDGE_OUTBOX_POLL_SECONDS")
    redeliver_after_seconds: float = Field(300.0, alias="MEDBRIDGE_REDELIVER_AFTER_SECONDS")
    # partitions of each topic MedBridge creates: the most members of one consumer group that get work
    # (a topic that exists keeps its count: grow it with kafka-topics --alter, see the README)
    kafka_partitions: int = Field(12, ge=1, le=1000, alias="MEDBRIDGE_KAFKA_PARTITIONS")
    # a consumer that sends no heartbeat for this long leaves its group and its partitions move to the
    # others (a SIGKILLed worker's study is redone by a survivor after about this long); the interval
    # must stay below a third of it
    kafka_session_timeout_ms: int = Field(10_000, ge=1000, alias="MEDBRIDGE_KAFKA_SESSION_TIMEOUT_MS")
    kafka_heartbeat_interval_ms: int = Field(3_000, ge=100, alias="MEDBRIDGE_KAFKA_HEARTBEAT_INTERVAL_MS")

    # Store: empty means SQLite under data_dir
    database_url: str = Field("", alias="DATABASE_URL")

    # Knowledge base / LLM
    chroma_url: str = Field("", alias="CHROMA_URL")
    llm_model: Path | None = Field(None, alias="MEDBRIDGE_LLM_MODEL")
    llm_max_new_tokens: int = Field(160, alias="MEDBRIDGE_LLM_MAX_NEW_TOKENS")
    # An OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama, FastChat); empty = the in-process model.
    # With it set, MEDBRIDGE_LLM_MODEL is the served model's name, not a folder.
    llm_base_url: str = Field("", alias="MEDBRIDGE_LLM_BASE_URL")
    llm_api_key: SecretStr = Field(SecretStr(""), alias="MEDBRIDGE_LLM_API_KEY")
    # generations in flight per clinical worker (server backend only; in process it is always 1)
    llm_concurrency: int = Field(4, ge=1, le=64, alias="MEDBRIDGE_LLM_CONCURRENCY")
    llm_timeout_seconds: float = Field(120.0, gt=0, alias="MEDBRIDGE_LLM_TIMEOUT_SECONDS")
    llm_max_retries: int = Field(4, ge=0, le=20, alias="MEDBRIDGE_LLM_MAX_RETRIES")
    # the served model's context window (Meditron-7B: 2,048 tokens)
    llm_context_tokens: int = Field(2048, ge=256, alias="MEDBRIDGE_LLM_CONTEXT_TOKENS")
    # the served model's tokenizer folder, for servers without a /tokenize endpoint (TGI, Ollama)
    llm_tokenizer: Path | None = Field(None, alias="MEDBRIDGE_LLM_TOKENIZER")
    retrieval_k: int = Field(6, alias="MEDBRIDGE_RETRIEVAL_K")

    # Imaging model: empty means the demo weights under data_dir/models
    imaging_model: Path | None = Field(None, alias="MEDBRIDGE_IMAGING_MODEL")
    device: str = Field("cpu", alias="MEDBRIDGE_DEVICE")
    # imaging model registry (YAML/JSON: MONAI bundles and their routing rules); unset: the demo bundle alone
    models_file: Path | None = Field(None, alias="MEDBRIDGE_MODELS")
    imaging_batch_size: int = Field(32, ge=1, alias="MEDBRIDGE_IMAGING_BATCH_SIZE")
    # Grad-CAM overlays are rendered for this many top-scoring images of a study (per model), not every image
    imaging_explain_top: int = Field(3, ge=0, alias="MEDBRIDGE_IMAGING_EXPLAIN_TOP")
    # studies the imaging worker handles at once; their images share forward passes (inference/imaging/batching.py)
    imaging_concurrency: int = Field(4, ge=1, le=64, alias="MEDBRIDGE_IMAGING_CONCURRENCY")
    # how long queued images wait for another study's to fill a forward, when a study in flight is still busy
    imaging_batch_wait_ms: float = Field(5.0, ge=0, le=1000, alias="MEDBRIDGE_IMAGING_BATCH_WAIT_MS")

    # Whether this process runs the DICOM listener (workers-only processes in a cluster set false)
    dicom_enabled: bool = Field(True, alias="MEDBRIDGE_DICOM")

    # Which workers this process runs (comma list of imaging, clinical, reports, dicom-export); all by default
    workers: str = Field("imaging,clinical,reports,dicom-export", alias="MEDBRIDGE_WORKERS")
    # Whether this process runs the edges (HTTP, DICOM, publishers, outbox relay); false: only its workers,
    # against the broker (KAFKA_BOOTSTRAP_SERVERS) and database of an edges process elsewhere
    edges_enabled: bool = Field(True, alias="MEDBRIDGE_EDGES")
    # An edges process runs its imaging and clinical workers in processes of their own (supervised, dying
    # with it, at a lower priority), so inference does not slow the listeners; false: in this process
    inference_processes: bool = Field(True, alias="MEDBRIDGE_INFERENCE_PROCESSES")
    # the inference processes' niceness (0-19; higher yields more to the edges) and torch/OpenMP threads
    inference_nice: int = Field(10, ge=0, le=19, alias="MEDBRIDGE_INFERENCE_NICE")
    inference_threads: int = Field(
        default_factory=lambda: max(1, len(os.sched_getaffinity(0)) - 1), ge=1, le=256,
        alias="MEDBRIDGE_INFERENCE_THREADS")

    # DICOM export of AI results (SR + Secondary Capture) to the peers with export=true
    dicom_export_max_attempts: int = Field(8, ge=1, alias="MEDBRIDGE_DICOM_EXPORT_MAX_ATTEMPTS")
    dicom_export_backoff_seconds: float = Field(5.0, gt=0, alias="MEDBRIDGE_DICOM_EXPORT_BACKOFF_SECONDS")
    dicom_export_max_backoff_seconds: float = Field(600.0, gt=0, alias="MEDBRIDGE_DICOM_EXPORT_MAX_BACKOFF_SECONDS")
    dicom_export_timeout_seconds: float = Field(30.0, gt=0, alias="MEDBRIDGE_DICOM_EXPORT_TIMEOUT_SECONDS")
    # a failing export dies only after max_attempts AND this long (a PACS down for a day delays, not loses)
    dicom_export_retry_for_seconds: float = Field(86400.0, ge=0, alias="MEDBRIDGE_DICOM_EXPORT_RETRY_FOR_SECONDS")

    # Writeback to the upstream EHR (FHIR R4): empty URL means no writeback; comma-separate several
    upstream_fhir_url: str = Field("", alias="MEDBRIDGE_UPSTREAM_FHIR_URL")
    upstream_auth: str = Field("none", alias="MEDBRIDGE_UPSTREAM_AUTH")  # none | bearer | smart-backend
    upstream_token: str = Field("", alias="MEDBRIDGE_UPSTREAM_TOKEN")
    upstream_token_url: str = Field("", alias="MEDBRIDGE_UPSTREAM_TOKEN_URL")
    upstream_client_id: str = Field("", alias="MEDBRIDGE_UPSTREAM_CLIENT_ID")
    upstream_private_key: Path | None = Field(None, alias="MEDBRIDGE_UPSTREAM_PRIVATE_KEY")
    upstream_key_id: str = Field("", alias="MEDBRIDGE_UPSTREAM_KEY_ID")
    upstream_scope: str = Field(
        "system/DiagnosticReport.cruds system/Observation.cruds system/Device.cruds system/Provenance.cruds",
        alias="MEDBRIDGE_UPSTREAM_SCOPE",
    )
    upstream_timeout_seconds: float = Field(10.0, alias="MEDBRIDGE_UPSTREAM_TIMEOUT_SECONDS")
    upstream_max_attempts: int = Field(20, alias="MEDBRIDGE_UPSTREAM_MAX_ATTEMPTS")
    # a failing writeback dies only after max_attempts AND this long (an EHR down for hours delays, not loses)
    upstream_retry_for_seconds: float = Field(86400.0, ge=0, alias="MEDBRIDGE_UPSTREAM_RETRY_FOR_SECONDS")
    upstream_backoff_base_seconds: float = Field(1.0, alias="MEDBRIDGE_UPSTREAM_BACKOFF_BASE_SECONDS")
    upstream_backoff_max_seconds: float = Field(300.0, alias="MEDBRIDGE_UPSTREAM_BACKOFF_MAX_SECONDS")
    upstream_poll_seconds: float = Field(1.0, alias="MEDBRIDGE_UPSTREAM_POLL_SECONDS")

    @property
    def dicom_dir(self) -> Path:
        return self.data_dir / "dicom"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def chroma_dir(self) -> Path:
        return self.data_dir / "chroma"

    @property
    def signing_key_path(self) -> Path:
        return self.auth_signing_key or self.data_dir / "auth" / "signing-key.pem"

    @property
    def imaging_model_path(self) -> Path:
        return self.imaging_model or self.models_dir / "demo-lesion-densenet"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'medbridge.db').resolve()}"

    @property
    def enabled_workers(self) -> set[str]:
        return {w.strip() for w in self.workers.split(",") if w.strip()}

    @property
    def upstream_urls(self) -> tuple[str, ...]:
        return tuple(u.strip().rstrip("/") for u in self.upstream_fhir_url.split(",") if u.strip())


@lru_cache
def get_settings() -> Settings:
    return Settings()
