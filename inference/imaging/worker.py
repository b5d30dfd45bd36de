"""The imaging worker: StudyReceived in, ImagingInferenceCompleted out.

A thin adapter around the model registry (:mod:`inference.imaging.registry`): it parses each of the study's new
image instances once (the pixel data left in the file until the image is decoded from that same header), groups
them by series, asks the registry which bundles run on each series, and runs them: 2D classifiers on every
image in batches (each image decoded once, whatever the number of models),
segmentation and 3D bundles on the series assembled into a volume (:mod:`inference.imaging.volume`).
Explanation maps are rendered only for the top-scoring images of the study (``MEDBRIDGE_IMAGING_EXPLAIN_TOP``
per model): encoding a heatmap for every image cost most of the pipeline's time and nobody looks at them. Each
overlay PNG and heatmap layer is stored in the artifact store (the database, so the report writer needs no
access to this host's files); the result event names them by artifact id and goes back to the consumer base,
which writes it to the outbox in the transaction that records the StudyReceived event as processed.
Segmentation outputs are returned beside the event (:class:`StudyAnalysis`) for the DICOM SEG builder.
The map of an image outside the top N is rendered when a reviewer asks (ExplanationRequested, published by the
API: :mod:`integration.reports.explanations` says why an event) by the same code, and recorded against the result.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pydicom
import torch
from pydicom.errors import InvalidDicomError

from inference.imaging.batching import SharedBatcher
from inference.imaging.operator import BundleOperator
from inference.imaging.outputs import SegmentationOutput
from inference.imaging.pixels import NotAnImageError, PixelDecodeError, dataset_to_image
from inference.imaging.registry import (
    ModelEntry,
    ModelRegistry,
    RoutingRule,
    SeriesInfo,
    load_registry,
    read_models_file,
)
from inference.imaging.segmentation import SegmentationInputError, record_segmentation
from inference.imaging.volume import VolumeError, assemble_volume
from integration.app.settings import Settings
from integration.db.artifacts import ArtifactRefusedError, put_artifact
from integration.db.store import Store
from integration.errors import PermanentEventError
from integration.events.consumer import ConsumerOptions, ConsumerWorker, Outcome, Publish, handles
from integration.observability import metrics
from integration.phi import uid_hash
from integration.reports.explanations import ExplanationRecord
from schemas.events import (
    IMAGING_WORKER,
    ExplanationRequested,
    ImagingInferenceCompleted,
    InstanceFinding,
    StudyReceived,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_DECODE_ERRORS = (NotAnImageError, PixelDecodeError, InvalidDicomError, OSError)
# Elements longer than this (the pixel data of any real image) stay in the file when the header is parsed and are
# read from it when the image is decoded: each file is parsed once, for routing and decoding alike, and a study's
# headers stay small in memory meanwhile.
_DEFER_BYTES = 16 * 1024
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def store_overlay(store: Store, png: bytes) -> str:
    """Store one overlay (or heatmap layer) PNG in the artifact store; its artifact id.

    Committed before the result event (``ConsumerWorker.finish``): an event never names an artifact the store
    lacks. A crash in between leaves rows no event names, which the redelivery, inferring the same images
    again, finds in place or stores anew (content-addressed)."""
    with store.session() as s:
        return put_artifact(s, png, "image/png")


def registry_from_settings(settings: Settings) -> ModelRegistry:
    """The registry ``MEDBRIDGE_MODELS`` describes, or the demo bundle alone for every series; loads every
    bundle now (a bad one raises :class:`~inference.imaging.bundle.BundleError` naming it)."""
    entries = (read_models_file(settings.models_file) if settings.models_file is not None
               else [ModelEntry(settings.imaging_model_path, RoutingRule())])
    return load_registry(entries, settings.device, settings.imaging_batch_size)


@dataclass(frozen=True)
class StudyAnalysis:
    event: ImagingInferenceCompleted
    segmentations: list[SegmentationOutput] = field(default_factory=list)


@dataclass
class SeriesMember:
    """One image instance of a series, its file parsed once (:func:`read_member`): the pixel data is read from
    the file when the image is decoded."""

    sop_instance_uid: str
    series_instance_uid: str
    path: str
    header: pydicom.Dataset


def read_member(sop_instance_uid: str, series_instance_uid: str, path: str) -> SeriesMember:
    """The instance at ``path`` parsed, its pixel data deferred; InvalidDicomError or OSError when unreadable."""
    return SeriesMember(sop_instance_uid, series_instance_uid, path, pydicom.dcmread(path, defer_size=_DEFER_BYTES))


def _decode(header: pydicom.Dataset) -> np.ndarray:
    """The image of a parsed header (:func:`dataset_to_image`), its pixel data read from the file for this and
    left deferred again afterwards: a long series holds headers, not pixels, while it runs."""
    deferred = [(keyword, header.get_item(keyword, keep_deferred=True)) for keyword in _PIXEL_KEYWORDS
                if keyword in header]
    try:
        return dataset_to_image(header)
    finally:
        for keyword, element in deferred:
            header[keyword] = element


@dataclass(frozen=True)
class _Candidate:
    """An image a model scored, ranked for an explanation map."""

    score: float
    sop_instance_uid: str
    operator: BundleOperator
    class_idx: int
    header: pydicom.Dataset


def _prepare(members: Sequence[SeriesMember], operators: Sequence[BundleOperator], keep_images: bool
             ) -> tuple[list[SeriesMember], list[np.ndarray | None], dict[int, list[torch.Tensor]], list[str]]:
    """The members that decode, their images (when ``keep_images``; None otherwise), each one's input for every
    operator (by ``id``), and the SOP Instance UIDs of those that do not decode (logged by hash). Each image is
    decoded from the header routing read (:func:`_decode`)."""
    decoded: list[SeriesMember] = []
    images: list[np.ndarray | None] = []
    inputs: dict[int, list[torch.Tensor]] = {id(op): [] for op in operators}
    skipped: list[str] = []
    for inst in members:
        try:
            image = _decode(inst.header)
            prepared = [(op, op.model_input(image)) for op in operators]
        except (*_DECODE_ERRORS, ValueError) as exc:
            log.warning("instance %s not analysed: %s", uid_hash(inst.sop_instance_uid), type(exc).__name__)
            skipped.append(inst.sop_instance_uid)
            continue
        decoded.append(inst)
        images.append(image if keep_images else None)
        for op, tensor in prepared:
            inputs[id(op)].append(tensor)
    return decoded, images, inputs, skipped


def _series_info(members: Sequence[SeriesMember]) -> SeriesInfo:
    first = members[0].header
    frames = int(first.get("NumberOfFrames", 1) or 1)
    return SeriesInfo(
        modality=str(first.get("Modality", "")),
        body_part=str(first.get("BodyPartExamined", "")),
        sop_class_uid=str(first.get("SOPClassUID", "")),
        series_description=str(first.get("SeriesDescription", "")),
        slices=frames if len(members) == 1 else len(members),
    )


def _alone(op: BundleOperator, inputs: Sequence[torch.Tensor]) -> list[dict[str, float]]:
    return op.classify_inputs(inputs)


Classify = Callable[[BundleOperator, Sequence[torch.Tensor]], list[dict[str, float]]]


class StudyRun:
    """One study's inference: what each model said about each image, and what could not be read.

    ``classify`` scores prepared 2D inputs: the model's own batches by default, or a :class:`SharedBatcher`'s
    (the forward shared with the other studies in flight). 3D volumes, segmentation and Grad-CAM stay per study:
    they are one forward (or one backward) per series or image, with nothing of another study to share it."""

    def __init__(self, explain_top: int, classify: Classify = _alone) -> None:
        self.classify = classify
        self.probabilities: dict[str, dict[str, float]] = {}
        self.series_of: dict[str, str] = {}
        self.skipped: list[str] = []
        self.models: dict[str, str] = {}
        self.candidates: list[_Candidate] = []
        self.segmentations: list[SegmentationOutput] = []
        self.explain_top = explain_top
        # the image and model input of each model's current top candidates where scoring kept them, so that
        # explaining them does not decode and preprocess them again: per model a min-heap of (score, -order, SOP UID)
        self._top: dict[int, list[tuple[float, int, str]]] = {}
        self._kept: dict[tuple[int, str], tuple[np.ndarray, torch.Tensor]] = {}

    def record(self, op: BundleOperator, inst: SeriesMember, probabilities: dict[str, float],
               decoded: tuple[np.ndarray, torch.Tensor] | None = None) -> None:
        """What ``op`` said about ``inst``; ``decoded`` (its image and ``op``'s input) is kept while it ranks
        among ``op``'s top ``explain_top``."""
        self.models[op.model_name] = op.model_version
        merged = self.probabilities.setdefault(inst.sop_instance_uid, {})
        for name, value in probabilities.items():
            merged[name if name not in merged else f"{op.model_name}:{name}"] = value
        self.series_of[inst.sop_instance_uid] = inst.series_instance_uid
        if op.explains and probabilities and op.bundle.spatial_dims == 2:  # Grad-CAM maps are drawn on one image
            best = max(range(len(op.findings)), key=lambda i: probabilities.get(op.findings[i], 0.0))
            self.candidates.append(_Candidate(probabilities.get(op.findings[best], 0.0), inst.sop_instance_uid,
                                              op, best, inst.header))
            if decoded is not None:
                self._keep_if_top(op, self.candidates[-1], decoded)

    def _keep_if_top(self, op: BundleOperator, candidate: _Candidate,
                     decoded: tuple[np.ndarray, torch.Tensor]) -> None:
        """Keep ``decoded`` while ``candidate`` ranks as :meth:`explanations` ranks (score, then order)."""
        if self.explain_top < 1:
            return
        heap = self._top.setdefault(id(op), [])
        entry = (candidate.score, -len(self.candidates), candidate.sop_instance_uid)
        self._kept[(id(op), candidate.sop_instance_uid)] = decoded
        if len(heap) < self.explain_top:
            heapq.heappush(heap, entry)
            return
        dropped = heapq.heappushpop(heap, entry)
        del self._kept[(id(op), dropped[2])]

    def classify_series(self, members: Sequence[SeriesMember], operators: Sequence[BundleOperator]) -> None:
        """Each image decoded once, prepared for every 2D model, scored ``batch_size`` at a time.

        The next batch is decoded on a helper thread while this one is scored: decoding (pixel data read,
        windowing, the bundle's resize) costs about what the forward does, and torch releases the GIL. A series
        no larger than the explained top keeps its decoded images for the explanation (all of them may be
        explained: a CR's one image is not decoded twice); a longer one does not, because holding two batches of
        full-size images costs fresh memory for each (0.4 ms per 512 x 512 image, measured), more than decoding
        the few top images again from their headers."""
        size = min(op.batch_size for op in operators)
        chunks = [members[start:start + size] for start in range(0, len(members), size)]
        if not chunks:
            return
        keep = len(members) <= self.explain_top
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imaging-decode") as decoder:
            pending = decoder.submit(_prepare, chunks[0], operators, keep)
            for following in [*chunks[1:], None]:
                chunk, images, inputs, skipped = pending.result()
                if following is not None:
                    pending = decoder.submit(_prepare, following, operators, keep)
                self.skipped.extend(skipped)
                if chunk:
                    self._score(chunk, images, inputs, operators)

    def _score(self, chunk: list[SeriesMember], images: list[np.ndarray | None],
               inputs: dict[int, list[torch.Tensor]], operators: Sequence[BundleOperator]) -> None:
        for op in operators:
            began = time.perf_counter()
            scored = self.classify(op, inputs[id(op)])
            metrics.observe_inference(op.model_name, time.perf_counter() - began, len(chunk))
            for inst, image, tensor, probabilities in zip(chunk, images, inputs[id(op)], scored, strict=True):
                self.record(op, inst, probabilities, (image, tensor) if image is not None else None)

    def volume_series(self, members: Sequence[SeriesMember], operators: Sequence[BundleOperator]) -> None:
        """Segmentation and 3D bundles on the series assembled into a volume."""
        try:
            volume = assemble_volume([inst.header for inst in members])
        except (*_DECODE_ERRORS, VolumeError, ValueError, AttributeError) as exc:
            log.warning("series %s not assembled into a volume: %s", uid_hash(members[0].series_instance_uid),
                        type(exc).__name__)
            return
        for op in operators:
            self.models[op.model_name] = op.model_version
            began = time.perf_counter()
            if op.bundle.task == "segmentation":
                self.segmentations.append(op.segment(volume))
                metrics.observe_inference(op.model_name, time.perf_counter() - began, 1)
                continue
            probabilities = op.classify_volume(volume)
            metrics.observe_inference(op.model_name, time.perf_counter() - began, 1)
            centre = volume.sop_instance_uids[len(volume.sop_instance_uids) // 2]
            middle = next(m for m in members if m.sop_instance_uid == centre)
            self.record(op, middle, probabilities)

    def explanations(self, put: Callable[[bytes], str]) -> dict[str, tuple[str, str]]:
        """Overlay and layer ids (as ``put`` stores each PNG) for the top images of each explaining model."""
        chosen: dict[str, tuple[str, str]] = {}
        for op_id in {id(c.operator) for c in self.candidates}:
            ranked = sorted((c for c in self.candidates if id(c.operator) == op_id), key=lambda c: -c.score)
            for c in ranked[: self.explain_top]:
                if c.sop_instance_uid in chosen:
                    continue
                kept = self._kept.get((op_id, c.sop_instance_uid))
                try:
                    explanation = (c.operator.explain(kept[0], c.class_idx, prepared=kept[1]) if kept is not None
                                   else c.operator.explain(_decode(c.header), c.class_idx))
                except (*_DECODE_ERRORS, ValueError):
                    continue
                chosen[c.sop_instance_uid] = (put(explanation.overlay_png), put(explanation.heatmap_layer_png))
        return chosen


def _per_image(op: BundleOperator) -> bool:
    """A 2D classifier: scored (and explained) image by image."""
    return op.bundle.spatial_dims == 2 and op.bundle.task == "classification"


def explain_on_demand(store: Store, registry: ModelRegistry, event: ExplanationRequested) -> ExplanationRecord:
    """The explanation map of the one image a reviewer asked for, rendered as the top images' are
    (:meth:`StudyRun.explanations`: scored again by the result's 2D models that explain, the map of the first one's
    most probable finding), its PNGs stored before the outcome that names them. A failure is an outcome too
    (``reason``), shown to the reviewer: asking again retries."""
    def failed(reason: str) -> ExplanationRecord:
        log.info("explanation map of image %s not rendered: %s", uid_hash(event.sop_instance_uid), reason)
        return ExplanationRecord(event.report_id, event.sop_instance_uid, reason=reason)

    result = store.get_ai_result(event.report_id)
    if result is None:
        return failed("the report is no longer stored")
    done = next((i for i in result.details.get("instances", [])
                 if i.get("sop_instance_uid") == event.sop_instance_uid and i.get("heatmap_artifact_id")), None)
    if done is not None:  # rendered meanwhile (a redelivery, or the study's own run): nothing to compute
        return ExplanationRecord(event.report_id, event.sop_instance_uid, done["heatmap_artifact_id"],
                                 done.get("heatmap_layer_artifact_id"))
    models = {m.strip() for m in str(result.details.get("model_name") or "").split(",")}
    operators = [op for op in registry.operators if op.model_name in models and op.explains and _per_image(op)]
    if not operators:
        return failed(f"no model of this result that this worker runs renders an explanation map "
                      f"(the result's models: {', '.join(sorted(models)) or 'none'})")
    stored = store.get_instance(event.sop_instance_uid)
    if stored is None:
        return failed("the image is no longer in MedBridge's store")
    run = StudyRun(explain_top=1)
    try:
        member = read_member(stored.sop_instance_uid, stored.series_instance_uid, str(stored.path))
    except (InvalidDicomError, OSError):
        return failed("the image could not be decoded")
    run.classify_series([member], operators)
    heatmaps = run.explanations(lambda png: store_overlay(store, png))
    if event.sop_instance_uid not in heatmaps:
        return failed("the image could not be decoded")
    overlay, layer = heatmaps[event.sop_instance_uid]
    log.info("explanation map of image %s rendered on demand", uid_hash(event.sop_instance_uid))
    return ExplanationRecord(event.report_id, event.sop_instance_uid, overlay, layer)


def _read_headers(store: Store, event: StudyReceived) -> tuple[list[SeriesMember], list[str], int]:
    images = [i for i in store.study_instances(event.study_instance_uid) if i.is_image]
    # None: an instance stored before announcements recorded their revision, inferred as before
    instances = [i for i in images if i.announced_revision in (event.revision, None)]
    earlier = sum(i.announced_revision is not None and i.announced_revision < event.revision for i in images)
    read, unreadable = [], []
    for inst in instances:
        try:
            read.append(read_member(inst.sop_instance_uid, inst.series_instance_uid, str(inst.path)))
        except (InvalidDicomError, OSError) as exc:
            log.warning("instance %s not analysed: %s", uid_hash(inst.sop_instance_uid), type(exc).__name__)
            unreadable.append(inst.sop_instance_uid)
    return read, unreadable, earlier


def analyse_study(store: Store, registry: ModelRegistry, event: StudyReceived,
                  explain_top: int = 3, batcher: SharedBatcher | None = None) -> StudyAnalysis | None:
    """Run the routed models on the image instances this revision of the study brought; None when it brought
    none. Images an earlier revision brought have that revision's result already. With ``batcher``, the study's
    2D images share forwards with the other studies in flight on it (same results as alone)."""
    if batcher is None:
        return _analyse(store, registry, event, explain_top, _alone)
    with batcher.study():
        return _analyse(store, registry, event, explain_top, batcher.classify)


def _analyse(store: Store, registry: ModelRegistry, event: StudyReceived, explain_top: int,
             classify: Classify) -> StudyAnalysis | None:
    instances, unreadable, earlier = _read_headers(store, event)
    if not instances and not unreadable:
        log.info("study %s revision %d brought no image instance; nothing to infer",
                 uid_hash(event.study_instance_uid), event.revision)
        return None
    run = StudyRun(explain_top, classify)
    run.skipped.extend(unreadable)
    series: dict[str, list[SeriesMember]] = {}
    for inst in instances:
        series.setdefault(inst.series_instance_uid, []).append(inst)
    for members in series.values():
        operators = registry.route(_series_info(members))
        if not operators:
            log.info("series %s: no model routes to it", uid_hash(members[0].series_instance_uid))
            run.skipped.extend(m.sop_instance_uid for m in members)
            continue
        per_image = [op for op in operators if _per_image(op)]
        per_volume = [op for op in operators if op not in per_image]
        if per_image:
            run.classify_series(members, per_image)
        if per_volume:
            run.volume_series(members, per_volume)
    heatmaps = run.explanations(lambda png: store_overlay(store, png))
    # images a 2D model could explain: a reviewer may ask for those outside the top N (explain_on_demand)
    explainable = {c.sop_instance_uid for c in run.candidates if _per_image(c.operator)}
    findings = [
        InstanceFinding(
            sop_instance_uid=sop,
            series_instance_uid=run.series_of[sop],
            probabilities=probabilities,
            heatmap_artifact_id=heatmaps.get(sop, (None, None))[0],
            heatmap_layer_artifact_id=heatmaps.get(sop, (None, None))[1],
            explainable=sop in explainable,
        )
        for sop, probabilities in run.probabilities.items()
    ]
    models = run.models or {op.model_name: op.model_version for op in registry.operators}
    try:  # each SEG stored (its own transaction) before the event that names it, as the heatmaps are
        segmentations = [record_segmentation(store, output, study_instance_uid=event.study_instance_uid,
                                             revision=event.revision) for output in run.segmentations]
    except (SegmentationInputError, ArtifactRefusedError) as exc:  # the same input fails the same way again
        raise PermanentEventError(f"segmentation not recorded: {exc}") from exc
    event_out = ImagingInferenceCompleted(
        source_event_id=event.event_id,
        study_instance_uid=event.study_instance_uid,
        revision=event.revision,
        patient_ref=event.patient_ref,
        imaging_study_ref=event.imaging_study_ref,
        model_name=", ".join(models),
        model_version=", ".join(models.values()),
        findings=findings,
        skipped_instances=len(run.skipped),
        skipped_sop_instance_uids=run.skipped,
        earlier_images=earlier,
        segmentations=segmentations,
    )
    return StudyAnalysis(event_out, run.segmentations)


def infer_study(store: Store, registry: ModelRegistry, event: StudyReceived,
                explain_top: int = 3) -> ImagingInferenceCompleted | None:
    """:func:`analyse_study`'s result event alone."""
    analysis = analyse_study(store, registry, event, explain_top)
    return analysis.event if analysis is not None else None


class ImagingWorker(ConsumerWorker):
    """Up to ``MEDBRIDGE_IMAGING_CONCURRENCY`` studies at once, on threads of its own; their 2D images share
    forward passes through one :class:`SharedBatcher` (``MEDBRIDGE_IMAGING_BATCH_WAIT_MS``)."""

    name = IMAGING_WORKER

    def __init__(self, store: Store, settings: Settings, options: ConsumerOptions, *,
                 registry: ModelRegistry | None = None) -> None:
        """``registry`` replaces the one the settings describe (tests pass one already loaded)."""
        super().__init__(store, options, concurrency=settings.imaging_concurrency)
        self.settings = settings
        self.registry: ModelRegistry | None = registry
        self.batcher = SharedBatcher(settings.imaging_batch_wait_ms / 1000.0)
        # as many threads as studies in flight: a study waiting on the batcher holds its thread, and the
        # default executor (shared with the consumer's store calls) may have fewer
        self._threads = ThreadPoolExecutor(max_workers=settings.imaging_concurrency, thread_name_prefix="imaging")

    async def load(self) -> None:
        if self.registry is None:
            self.registry = await asyncio.to_thread(registry_from_settings, self.settings)

    async def stop(self) -> None:
        await super().stop()
        # a study still running finishes on its thread (its event is redelivered, then skipped or redone)
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _in_thread(self, fn: Callable[[], _T]) -> _T:
        # in the caller's context, as asyncio.to_thread runs it: the event's "process" span stays the parent
        # of what the study does (run_in_executor alone would start the thread with an empty context)
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._threads, context.run, fn)

    @handles(StudyReceived)
    async def on_study(self, event: StudyReceived) -> Outcome | None:
        registry = self.registry
        assert registry is not None, "load() runs before the first event"
        analysis = await self._in_thread(lambda: analyse_study(
            self.store, registry, event, self.settings.imaging_explain_top, self.batcher))
        if analysis is None:
            return None
        return Publish(analysis.event, key=event.study_instance_uid)

    @handles(ExplanationRequested)
    async def on_explanation_requested(self, event: ExplanationRequested) -> Outcome | None:
        assert self.registry is not None, "load() runs before the first event"
        registry = self.registry
        return await self._in_thread(lambda: explain_on_demand(self.store, registry, event))
