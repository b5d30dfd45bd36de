"""Counts of child processes summed into /metrics: the DICOM listener processes
(``MEDBRIDGE_DICOM_PROCESSES`` > 1) and the inference worker processes (``MEDBRIDGE_INFERENCE_PROCESSES``).

Each child counts associations, instances, bytes and journal syncs in prometheus-client's
multiprocess mode: its values live in memory-mapped files under ``<data dir>/metrics/dicom-processes``
(``PROMETHEUS_MULTIPROC_DIR``, set in the child before prometheus-client is imported). The main process
keeps its own values in memory as usual; at each scrape it adds the children's files to its own families,
sample by sample (same name, same labels), so /metrics shows one total per series whichever process
served the association. A child that dies keeps its counts (its files stay); the folder is emptied when
the listener processes start, with the main process's own counters starting from zero alike.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # prometheus_client is imported only once a process has chosen its mode (count_into_files)
    from prometheus_client.metrics_core import Metric

ENV = "PROMETHEUS_MULTIPROC_DIR"


DICOM_PROCESSES = "dicom-processes"
INFERENCE_PROCESSES = "inference-processes"


def folder(data_dir: Path, kind: str = DICOM_PROCESSES) -> Path:
    """Where the children of one kind keep their files (a folder per kind: each is emptied by its own starter)."""
    return data_dir / "metrics" / kind


def prepare(path: Path) -> None:
    """In the main process, before the children start: an empty folder for their files."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()


def count_into_files(path: Path) -> None:
    """In a child process, first thing: its families will keep their values in files under ``path``."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the child process chose multiprocess mode")
    os.environ[ENV] = str(path)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def exposition(children: Sequence[Path] = ()) -> bytes:
    """This process's families in Prometheus text, with the counts of the children (their folders) added in."""
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    files = sorted(str(p) for folder in children for p in folder.glob("*.db"))
    if not files:
        return generate_latest(REGISTRY)
    families = {family.name: family for family in REGISTRY.collect()}
    for child in MultiProcessCollector.merge(files, accumulate=True):
        mine = families.get(child.name)
        if mine is None:
            families[child.name] = child
            continue
        index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(mine.samples)}
        for sample in child.samples:
            at = index.get((sample.name, tuple(sorted(sample.labels.items()))))
            if at is None:
                mine.samples.append(sample)
            else:
                mine.samples[at] = mine.samples[at]._replace(value=mine.samples[at].value + sample.value)
    return generate_latest(_Families(list(families.values())))  # type: ignore[arg-type]
