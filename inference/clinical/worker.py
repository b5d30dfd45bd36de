"""The clinical-text worker: RecordReceived in, ClinicalInferenceCompleted out.

It gathers the patient's records from the store into an identifier-free PatientContext, asks the
RAG-backed LLM operator for an impression (off the event loop), and hands the result event back to
the consumer base, which writes it to the outbox in the transaction that marks the RecordReceived
event processed.

With a model server (MEDBRIDGE_LLM_BASE_URL) several records' generations are in flight at once,
up to MEDBRIDGE_LLM_CONCURRENCY; retrieval and prompt building still run one at a time (they are
CPU-bound here). In process, one record at a time. The language model's failures are translated
into the consumer's ack policy here: a server down, slow or overloaded pauses the consumer and the
event is retried; an answer that is not a completion, or a prompt that cannot fit, dead-letters it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from inference.clinical.operator import ClinicalImpressionOperator, ClinicalOperatorError
from integration.app.settings import Settings
from integration.db.store import Store
from integration.errors import PermanentEventError, TransientEventError
from integration.events.consumer import ConsumerOptions, ConsumerWorker, Outcome, Publish, handles
from integration.fhir.patient_context import build_patient_context
from integration.observability import metrics
from integration.phi import uid_hash
from knowledge.generation.backends import GeneratorConfig, open_text_generator
from knowledge.generation.protocol import (
    LLMInvalidResponseError,
    LLMUnavailableError,
    PromptTooLongError,
    TextGenerator,
)
from knowledge.ingest import ingest_default_corpus
from knowledge.store import KnowledgeBase
from schemas.events import (
    CLINICAL_WORKER,
    ClinicalInferenceCompleted,
    RecordReceived,
)

log = logging.getLogger(__name__)


def open_knowledge_base(chroma_dir: Path, chroma_url: str) -> KnowledgeBase:
    """Open the knowledge base and seed it with the shipped corpus when it is empty."""
    kb = KnowledgeBase(path=chroma_dir, chroma_url=chroma_url or None)
    if kb.count() == 0:
        added = ingest_default_corpus(kb)
        log.info("knowledge base seeded with %d passages", added)
    return kb


def generator_config(s: Settings) -> GeneratorConfig:
    """The LLM backend the settings name (see knowledge.generation.backends)."""
    return GeneratorConfig(
        base_url=s.llm_base_url,
        model=str(s.llm_model) if s.llm_model else None,
        api_key=s.llm_api_key.get_secret_value(),
        cache_dir=s.models_dir,
        device=s.device,
        concurrency=s.llm_concurrency,
        timeout_seconds=s.llm_timeout_seconds,
        max_retries=s.llm_max_retries,
        context_tokens=s.llm_context_tokens,
        tokenizer=s.llm_tokenizer,
    )


def generation_concurrency(s: Settings) -> int:
    """Records in flight per worker: the configured limit with a server, one in process."""
    return s.llm_concurrency if s.llm_base_url else 1


class ClinicalWorker(ConsumerWorker):
    name = CLINICAL_WORKER

    def __init__(
        self, store: Store, settings: Settings, options: ConsumerOptions, *, llm: TextGenerator | None = None
    ) -> None:
        """``llm`` replaces the backend the settings name (tests pass one); the worker then does not own it."""
        concurrency = llm.max_concurrency if llm is not None else generation_concurrency(settings)
        super().__init__(store, options, concurrency=concurrency)
        self.settings = settings
        self.operator: ClinicalImpressionOperator | None = None
        self._given_llm = llm
        self._prepare_lock = threading.Lock()  # the knowledge base and embedder: one query at a time
        self._threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="clinical")

    def _open_operator(self) -> ClinicalImpressionOperator:
        s = self.settings
        llm = self._given_llm or open_text_generator(generator_config(s))
        return ClinicalImpressionOperator(
            open_knowledge_base(s.chroma_dir, s.chroma_url),
            llm,
            k=s.retrieval_k,
            max_new_tokens=s.llm_max_new_tokens,
        )

    async def load(self) -> None:
        self.operator = await asyncio.to_thread(self._open_operator)

    async def stop(self) -> None:
        await super().stop()
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self.operator is not None and self._given_llm is None:
            self.operator.llm.close()

    def infer(self, event: RecordReceived) -> ClinicalInferenceCompleted | None:
        assert self.operator is not None
        ctx = build_patient_context(self.store, event.patient_ref)
        if not ctx.has_clinical_content():
            log.info("record %s has no clinical content yet", uid_hash(event.patient_ref))
            return None
        began = time.perf_counter()
        try:
            with self._prepare_lock:
                prepared = self.operator.prepare(ctx)
            result = self.operator.complete(prepared)
        except (ClinicalOperatorError, PromptTooLongError) as exc:  # this record can never fit the model
            raise PermanentEventError(str(exc)) from exc
        except LLMInvalidResponseError as exc:  # the server answers, but not with text: asking again won't help
            raise PermanentEventError(f"the language model's answer was unusable: {exc}") from exc
        except LLMUnavailableError as exc:  # down, slow or overloaded: pause and retry the event
            raise TransientEventError(str(exc)) from exc
        metrics.observe_inference(result.model_name, time.perf_counter() - began, 1)  # one record a call
        metrics.observe_generation(result.model_name, result.generated_tokens, result.generation_seconds)
        return ClinicalInferenceCompleted(
            source_event_id=event.event_id,
            patient_ref=event.patient_ref,
            revision=event.revision,
            model_name=result.model_name,
            impression=result.impression,
            evidence=result.evidence,
            input_refs=ctx.input_refs(),
            conclusion_codes=list(result.conclusion_codes),
            grounding=result.grounding,
        )

    @handles(RecordReceived)
    async def on_record(self, event: RecordReceived) -> Outcome | None:
        result = await asyncio.get_running_loop().run_in_executor(self._threads, self.infer, event)
        return Publish(result, key=event.patient_ref) if result is not None else None
