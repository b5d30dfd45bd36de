"""The clinical-text worker: RecordReceived in, ClinicalInferenceCompleted out.

It gathers the patient's records from the store into an identifier-free PatientContext, asks the
RAG-backed LLM operator for an impression (off the event loop), and writes the result event to
the outbox in the same transaction that marks the RecordReceived event processed.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from inference.clinical.operator import ClinicalImpressionOperator, ClinicalOperatorError
from integration.db.store import Store
from integration.errors import PermanentEventError
from integration.events.broker import ConsumerOptions, ConsumerWorker
from integration.fhir.patient_context import build_patient_context
from integration.phi import uid_hash
from knowledge.ingest import ingest_default_corpus
from knowledge.llm import load_text_generator
from knowledge.store import KnowledgeBase
from schemas.events import (
    CLINICAL_WORKER,
    TOPIC_CLINICAL_COMPLETED,
    TOPIC_RECORD_RECEIVED,
    ClinicalInferenceCompleted,
    MedBridgeEvent,
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
    topics = (TOPIC_RECORD_RECEIVED,)

    def __init__(
        self,
        store: Store,
        *,
        chroma_dir: Path,
        chroma_url: str,
        llm_model: Path | None,
        llm_cache_dir: Path,
        device: str,
        retrieval_k: int,
        max_new_tokens: int,
        options: ConsumerOptions,
    ) -> None:
        super().__init__(store, options)
        self._open = lambda: ClinicalImpressionOperator(
            open_knowledge_base(chroma_dir, chroma_url),
            load_text_generator(llm_model, llm_cache_dir, device),
            k=retrieval_k,
            max_new_tokens=max_new_tokens,
        )
        self.operator: ClinicalImpressionOperator | None = None

    async def load(self) -> None:
        self.operator = await asyncio.to_thread(self._open)

    def infer(self, event: RecordReceived) -> ClinicalInferenceCompleted | None:
        assert self.operator is not None
        ctx = build_patient_context(self.store, event.patient_ref)
        if not ctx.has_clinical_content():
            log.info("record %s has no clinical content yet", uid_hash(event.patient_ref))
            return None
        try:
            result = self.operator.run(ctx)
        except ClinicalOperatorError as exc:  # this record can never fit the model: do not retry it
            raise PermanentEventError(str(exc)) from exc
        return ClinicalInferenceCompleted(
            source_event_id=event.event_id,
            patient_ref=event.patient_ref,
            revision=event.revision,
            model_name=result.model_name,
            impression=result.impression,
            evidence=result.evidence,
            input_refs=ctx.input_refs(),
            conclusion_codes=list(result.conclusion_codes),
        )

    async def handle(self, event: MedBridgeEvent) -> None:
        if not isinstance(event, RecordReceived):
            return
        result = await asyncio.to_thread(self.infer, event)
        self.finish(event.event_id, result, TOPIC_CLINICAL_COMPLETED, key=event.patient_ref)
