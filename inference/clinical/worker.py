"""The clinical-text worker: RecordReceived in, ClinicalInferenceCompleted out.

It gathers the patient's records from the store into an identifier-free PatientContext, asks the
RAG-backed LLM operator for an impression (off the event loop), and hands the result event back to
the consumer base, which writes it to the outbox in the transaction that marks the RecordReceived
event processed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from inference.clinical.operator import ClinicalImpressionOperator, ClinicalOperatorError
from integration.app.settings import Settings
from integration.db.store import Store
from integration.errors import PermanentEventError
from integration.events.consumer import ConsumerOptions, ConsumerWorker, Outcome, Publish, handles
from integration.fhir.patient_context import build_patient_context
from integration.observability import metrics
from integration.phi import uid_hash
from knowledge.ingest import ingest_default_corpus
from knowledge.llm import load_text_generator
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


class ClinicalWorker(ConsumerWorker):
    name = CLINICAL_WORKER

    def __init__(self, store: Store, settings: Settings, options: ConsumerOptions) -> None:
        super().__init__(store, options)
        self.settings = settings
        self.operator: ClinicalImpressionOperator | None = None

    def _open_operator(self) -> ClinicalImpressionOperator:
        s = self.settings
        return ClinicalImpressionOperator(
            open_knowledge_base(s.chroma_dir, s.chroma_url),
            load_text_generator(s.llm_model, s.models_dir, s.device),
            k=s.retrieval_k,
            max_new_tokens=s.llm_max_new_tokens,
        )

    async def load(self) -> None:
        self.operator = await asyncio.to_thread(self._open_operator)

    def infer(self, event: RecordReceived) -> ClinicalInferenceCompleted | None:
        assert self.operator is not None
        ctx = build_patient_context(self.store, event.patient_ref)
        if not ctx.has_clinical_content():
            log.info("record %s has no clinical content yet", uid_hash(event.patient_ref))
            return None
        began = time.perf_counter()
        try:
            result = self.operator.run(ctx)
        except ClinicalOperatorError as exc:  # this record can never fit the model: do not retry it
            raise PermanentEventError(str(exc)) from exc
        metrics.observe_inference(result.model_name, time.perf_counter() - began, 1)  # one record a call
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
        result = await asyncio.to_thread(self.infer, event)
        return Publish(result, key=event.patient_ref) if result is not None else None
