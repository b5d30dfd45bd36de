"""``medbridge kb ingest PATH...``: load a hospital's documents into the knowledge base.

Every supported file under the given paths (folders are walked recursively) is read, split into
sections and overlapping chunks, and upserted with the source ``Hospital documents`` and metadata
path, title, section and date. A chunk's id is ``doc:<path hash>:<chunk index>:<content hash>``:
re-ingesting an unchanged file writes nothing, and a changed file replaces its old chunks. With
``sync``, the chunks of files that disappeared from the given paths are removed as well.

A file that cannot be read is skipped, counted and named in the report; it never stops the run,
and its previously ingested chunks are kept (the file is still there, only unreadable now).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from knowledge.documents.chunking import chunk_text
from knowledge.documents.readers import SUFFIXES, Document, DocumentError, read_document
from knowledge.store import SOURCE_DOCUMENTS, KnowledgeBase, Passage

logger = logging.getLogger(__name__)


class SkippedFile(BaseModel):
    path: str
    reason: str


class IngestReport(BaseModel):
    """What one ingestion did: files read, chunks written or removed, files skipped and why."""

    files_read: int = 0
    chunks: int = 0
    chunks_written: int = 0
    chunks_removed: int = 0
    files_removed: int = 0
    skipped: list[SkippedFile] = Field(default_factory=list)


def document_files(paths: Iterable[Path]) -> list[Path]:
    """The supported files under ``paths`` (files as given, folders walked), resolved and sorted.

    Hidden files and folders (``.git``, editor swap files) are left out. A path that does not
    exist is returned as is, so the caller reports it as unreadable.
    """
    found: set[Path] = set()
    for root in paths:
        root = Path(root).resolve()
        if root.is_dir():
            for path in root.rglob("*"):
                hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
                if path.is_file() and not hidden and path.suffix.lower() in SUFFIXES:
                    found.add(path)
        else:
            found.add(root)
    return sorted(found)


def document_passages(path: str, document: Document, *, max_chars: int = 900, overlap: int = 150) -> list[Passage]:
    """The chunks of ``document`` as passages with stable ids (see the module docstring)."""
    path_key = hashlib.sha256(path.encode()).hexdigest()[:12]
    passages: list[Passage] = []
    for section in document.sections:
        for chunk in chunk_text(section.text, max_chars, overlap):
            content = hashlib.sha256(chunk.encode()).hexdigest()[:12]
            passages.append(
                Passage(
                    id=f"doc:{path_key}:{len(passages)}:{content}",
                    source=SOURCE_DOCUMENTS,
                    title=f"{document.title}: {section.heading}" if section.heading else document.title,
                    text=chunk,
                    path=path,
                    section=section.heading,
                    date=document.date,
                )
            )
    return passages


def ingest_documents(
    kb: KnowledgeBase,
    paths: Sequence[Path],
    *,
    sync: bool = False,
    progress: bool = True,
    max_chars: int = 900,
    overlap: int = 150,
) -> IngestReport:
    """Bring ``kb`` up to date with the documents under ``paths``.

    Args:
        sync: also remove the chunks of documents, previously ingested from under ``paths``,
            whose files no longer exist there.
        progress: show a progress bar (tqdm, on standard error; hidden when it is not a terminal).

    Raises:
        knowledge.store.KnowledgeBaseError: the knowledge base cannot be written (unreadable
            documents are reported in the result instead).
    """
    from tqdm import tqdm

    report = IngestReport()
    files = document_files(paths)
    for file in tqdm(files, desc="kb ingest", unit="file", disable=None if progress else True):
        key = str(file)
        try:
            passages = document_passages(key, read_document(file), max_chars=max_chars, overlap=overlap)
        except DocumentError as exc:
            report.skipped.append(SkippedFile(path=key, reason=str(exc)))
            continue
        except OSError as exc:  # a path that vanished or a folder we may not list
            report.skipped.append(SkippedFile(path=key, reason=f"cannot read the file: {exc.strerror or exc}"))
            continue
        report.files_read += 1
        report.chunks += len(passages)
        report.chunks_written += kb.add(passages)
        # A changed file's chunks have new ids: the old ones must not be retrieved any more.
        stale = kb.ids(path=key) - {p.id for p in passages}
        kb.delete(sorted(stale))
        report.chunks_removed += len(stale)
    if sync:
        roots = [Path(p).resolve() for p in paths]
        for stored in sorted(kb.document_paths()):
            if not Path(stored).exists() and any(_under(Path(stored), root) for root in roots):
                stale = kb.ids(path=stored)
                kb.delete(sorted(stale))
                report.chunks_removed += len(stale)
                report.files_removed += 1
    for skipped in report.skipped:
        logger.warning("kb ingest skipped %s: %s", skipped.path, skipped.reason)
    return report


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
