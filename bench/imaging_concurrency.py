"""Many small studies through the imaging worker: one study at a time against N in flight sharing forwards.

Records S one-image studies (pydicom's RG1_UNCR, a 1955 x 1841 CR, or ``--source``; each with its own noise) as
DICOM files in a SQLite store, as the DICOM listener records them, then runs the real
:class:`~inference.imaging.worker.ImagingWorker` on an embedded broker with an outbox relay, as ``medbridge run``
does, at three settings, interleaved round by round (the host's load moves between rounds):

  concurrency 1         one study at a time (the worker before issue 18's cross-study batching)
  concurrency N         N studies in flight sharing the model's forwards through the
                        :class:`~inference.imaging.batching.SharedBatcher` (``--batch-wait-ms``, default 5)
  concurrency N, wait 0 N in flight, each study's images run as soon as they are queued: what concurrency
                        alone gives, without waiting for another study's images

Each run: a warm-up study first (the consumer joins its group, the model warms up), then S StudyReceived events
queued at once and timed until every one is processed (its result event in the outbox). Prints images/s per
setting (median of rounds), the ratios to concurrency 1 per round, and the images per forward reached. Usage (the
demo bundle is trained quick if none is given):

    PYTHONPATH=$PWD python bench/imaging_concurrency.py [--studies 32] [--concurrency 4] [--rounds 2]
        [--explain-top 3] [--source RG1_UNCR.dcm] [--bundle var/models/demo-lesion-densenet] [--threads T]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from inference.imaging.bundle import load_bundle
from inference.imaging.operator import BundleOperator
from inference.imaging.registry import ModelRegistry, RoutingRule
from inference.imaging.worker import ImagingWorker
from integration.app.settings import Settings
from integration.db.store import Store
from integration.db.tables import DicomInstance, utcnow
from integration.events.consumer import ConsumerOptions
from integration.events.embedded import EmbeddedBroker
from integration.events.relay import OutboxRelay
from integration.events.topics import ensure_topics
from schemas.events import TOPIC_STUDY_RECEIVED, StudyReceived

_NO_QUERY_COLUMNS = {column.key: None for column in DicomInstance.__table__.columns}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_studies(store: Store, folder: Path, count: int, source: str) -> list[str]:
    """``count`` one-image studies of pydicom's ``source`` file (each with its own noise) recorded in ``store``;
    their Study Instance UIDs."""
    base = pydicom.dcmread(get_testdata_file(source, download=False))
    pixels = base.pixel_array
    limits = np.iinfo(pixels.dtype)
    # the noise stays within what the file can hold: no wrap-around at BitsStored, no sign flip
    low = 0 if pixels.min() >= 0 else limits.min
    high = min(limits.max, (1 << int(base.BitsStored)) - 1) if limits.min == 0 else limits.max
    rng = np.random.default_rng(0)
    rows, studies = [], []
    for i in range(count):
        ds = base.copy()
        noisy = pixels.astype(np.int64) + rng.integers(-20, 21, pixels.shape)
        ds.PixelData = np.clip(noisy, low, high).astype(pixels.dtype).tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"study-{i:03d}.dcm"
        ds.save_as(path)
        rows.append({**_NO_QUERY_COLUMNS, "sop_instance_uid": ds.SOPInstanceUID,
                     "study_instance_uid": ds.StudyInstanceUID, "series_instance_uid": ds.SeriesInstanceUID,
                     "sop_class_uid": ds.SOPClassUID, "transfer_syntax_uid": ds.file_meta.TransferSyntaxUID,
                     "modality": ds.Modality, "is_image": True, "path": str(path), "size": path.stat().st_size,
                     "received_at": utcnow()})
        studies.append(ds.StudyInstanceUID)
    store.add_instances(rows)
    return studies


def queue(store: Store, studies: list[str]) -> list[StudyReceived]:
    """A StudyReceived event per study into the outbox, as the study publisher writes them."""
    events = [StudyReceived(study_instance_uid=study, revision=1, instance_count=1) for study in studies]
    with store.session() as s:
        for event in events:
            Store.add_to_outbox(s, TOPIC_STUDY_RECEIVED, event, key=event.study_instance_uid)
    return events


async def until_processed(store: Store, consumer: str, events: list[StudyReceived], timeout: float) -> None:
    """Wait until each event is processed: one query per poll, off the event loop (the worker shares the loop,
    and a poll of every event every few ms slowed the one-at-a-time worker most, its run being the longest)."""
    deadline = time.monotonic() + timeout
    pending = list(events)
    while pending:
        if await asyncio.to_thread(store.is_processed, consumer, pending[-1].event_id):
            pending.pop()
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} studies not processed in {timeout:.0f} s")
        await asyncio.sleep(0.05)


Level = tuple[int, float]  # (MEDBRIDGE_IMAGING_CONCURRENCY, MEDBRIDGE_IMAGING_BATCH_WAIT_MS)


async def timed_run(store: Store, bootstrap: str, registry: ModelRegistry, folder: Path, studies: list[str],
                    warmup: str, level: Level, explain_top: int, run_no: int) -> tuple[float, int]:
    """Seconds for the worker at ``level`` to process one event per study, and its forwards."""
    settings = Settings(data_dir=folder / "var", imaging_concurrency=level[0],  # type: ignore[call-arg]
                        imaging_batch_wait_ms=level[1], imaging_explain_top=explain_top)
    relay = OutboxRelay(store, bootstrap, poll_seconds=0.02)
    await relay.start()
    options = ConsumerOptions(bootstrap=bootstrap, group_prefix=f"bench-{run_no}", max_attempts=1,
                              notify_outbox=relay.wake)
    worker = ImagingWorker(store, settings, options, registry=registry)
    await worker.start()
    try:
        warm = queue(store, [warmup])
        relay.wake()
        await until_processed(store, worker.name, warm, timeout=120)
        forwards = worker.batcher.forwards
        began = time.perf_counter()
        events = queue(store, studies)
        relay.wake()
        await until_processed(store, worker.name, events, timeout=1800)
        return time.perf_counter() - began, worker.batcher.forwards - forwards
    finally:
        await worker.stop()
        await relay.stop()


async def bench(args: argparse.Namespace, folder: Path) -> None:
    bundle = args.bundle
    if bundle is None:
        from inference.imaging.train import train_demo_model

        bundle = folder / "demo-bundle"
        train_demo_model(bundle, quick=True, log=lambda _m: None)
    registry = ModelRegistry([(BundleOperator(load_bundle(bundle, args.device), batch_size=32), RoutingRule())])
    store = Store(f"sqlite:///{folder / 'bench.db'}")
    store.start()
    broker = EmbeddedBroker(_free_port())
    broker.start()
    try:
        await ensure_topics(broker.bootstrap_servers)
        warmup, *studies = make_studies(store, folder, args.studies + 1, args.source)
        # the last: N in flight, but a batch wait of 0 runs each study's images as soon as they are queued, so
        # forwards are shared only by images queued at the same instant: what concurrency alone gives
        one, shared, unshared = (1, args.batch_wait_ms), (args.concurrency, args.batch_wait_ms), (args.concurrency, 0.0)
        levels = [one, shared, unshared]
        names = {one: "concurrency 1 (one study at a time)",
                 shared: f"concurrency {args.concurrency}, batcher {args.batch_wait_ms:g} ms",
                 unshared: f"concurrency {args.concurrency}, batch wait 0"}
        seconds: dict[Level, list[float]] = {level: [] for level in levels}
        forwards: dict[Level, list[int]] = {level: [] for level in levels}
        print(f"{args.studies} one-image studies of {args.source}, demo bundle on {args.device}, explain top "
              f"{args.explain_top}, torch threads {torch.get_num_threads()}, {args.rounds} rounds", flush=True)
        run_no = 0
        for round_no in range(args.rounds):
            for level in levels:
                run_no += 1
                took, ran = await timed_run(store, broker.bootstrap_servers, registry, folder, studies, warmup,
                                            level, args.explain_top, run_no)
                seconds[level].append(took)
                forwards[level].append(ran)
            print(f"  round {round_no + 1}: " + ", ".join(
                f"{names[level]} {seconds[level][-1]:.2f} s ({args.studies / forwards[level][-1]:.1f} img/forward)"
                for level in levels), flush=True)
        base = statistics.median(seconds[one])
        print(f"{'worker (median of rounds)':<38} {'total s':>8} {'images/s':>9} {'img/forward':>12} {'x conc 1':>9}")
        for level in levels:
            took = statistics.median(seconds[level])
            per_forward = args.studies / statistics.median(forwards[level])
            print(f"{names[level]:<38} {took:8.2f} {args.studies / took:9.2f} {per_forward:12.2f} {base / took:9.2f}")
        for level in (shared, unshared):
            ratios = [a / b for a, b in zip(seconds[one], seconds[level], strict=True)]
            print(f"throughput {names[level]} / concurrency 1, per round: {', '.join(f'{r:.2f}' for r in ratios)}")
    finally:
        broker.stop()
        store.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=32, help="one-image CR studies per run (default 32)")
    parser.add_argument("--concurrency", type=int, default=4, help="studies in flight to compare with 1 (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of each (default 2)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="MEDBRIDGE_IMAGING_BATCH_WAIT_MS (default 5)")
    parser.add_argument("--explain-top", type=int, default=3, help="MEDBRIDGE_IMAGING_EXPLAIN_TOP (default 3)")
    parser.add_argument("--source", default="RG1_UNCR.dcm",
                        help="pydicom test file each study holds (default RG1_UNCR.dcm, a 1955x1841 CR; "
                             "CT_small.dcm: 128x128, decoding costs little beside the forward)")
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="medbridge-imaging-concurrency-") as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
