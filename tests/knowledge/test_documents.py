"""`medbridge kb ingest PATH...`: a hospital's documents into a real Chroma and BM25 index."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from integration.app.cli import main as cli_main
from knowledge.documents.chunking import chunk_text
from knowledge.documents.ingest import ingest_documents
from knowledge.store import SOURCE_DOCUMENTS, KnowledgeBase


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` in Helvetica, with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def write_documents(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sepsis.md").write_text(
        "# Sepsis pathway\n\nStart within the first hour.\n\n## Antibiotics\n\n"
        "Give piperacillin-tazobactam within one hour of recognising sepsis.\n",
        encoding="utf-8",
    )
    (folder / "stroke.html").write_text(
        "<html><head><title>Stroke protocol</title><style>p{}</style></head><body>"
        "<h2>Thrombolysis</h2><p>Alteplase within 4.5 hours of symptom onset.</p>"
        "<script>var x = 'hidden';</script></body></html>",
        encoding="utf-8",
    )
    (folder / "ward.txt").write_text("Ward 7 visiting hours are from 14:00 to 20:00.\n", encoding="utf-8")
    (folder / "warfarin.pdf").write_bytes(minimal_pdf("Warfarin dosing follows the INR target of 2 to 3."))
    note = "# Discharge letter template\n\nList every new medication with its indication."
    (folder / "discharge.json").write_text(
        json.dumps(
            {
                "resourceType": "DocumentReference",
                "status": "current",
                "date": "2026-03-01T09:00:00Z",
                "description": "Discharge guidance",
                "content": [
                    {"attachment": {"contentType": "text/markdown", "data": base64.b64encode(note.encode()).decode()}}
                ],
            }
        ),
        encoding="utf-8",
    )


@pytest.fixture
def kb(tmp_path: Path) -> KnowledgeBase:
    return KnowledgeBase(tmp_path / "kb")


def test_every_format_is_ingested_with_metadata_and_found(kb: KnowledgeBase, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    write_documents(docs)
    report = ingest_documents(kb, [docs], progress=False)
    assert report.skipped == [] and report.files_read == 5
    assert report.chunks == report.chunks_written == kb.count() == len(kb.ids(source=SOURCE_DOCUMENTS))
    assert kb.document_paths() == {str((docs / n).resolve()) for n in
                                   ("sepsis.md", "stroke.html", "ward.txt", "warfarin.pdf", "discharge.json")}

    [pdf] = kb.get(sorted(kb.ids(path=str((docs / "warfarin.pdf").resolve()))))
    assert "INR target" in pdf.text and pdf.section == "page 1"
    [html] = kb.get(sorted(kb.ids(path=str((docs / "stroke.html").resolve()))))
    assert html.title == "Stroke protocol: Thrombolysis" and "hidden" not in html.text
    [ref] = kb.get(sorted(kb.ids(path=str((docs / "discharge.json").resolve()))))
    assert ref.date == "2026-03-01T09:00:00Z" and "new medication" in ref.text

    assert kb.query("piperacillin tazobactam", 1)[0].section == "Antibiotics"
    assert kb.query("warfarin INR", 1, source=SOURCE_DOCUMENTS)[0].path == str((docs / "warfarin.pdf").resolve())


def test_reingest_is_idempotent_and_sync_removes_a_deleted_file(kb: KnowledgeBase, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    write_documents(docs)
    first = ingest_documents(kb, [docs], progress=False)
    ids = kb.ids()
    again = ingest_documents(kb, [docs], progress=False)
    assert again.chunks_written == 0 and again.chunks_removed == 0 and kb.ids() == ids

    (docs / "ward.txt").write_text("Ward 7 visiting hours are from 10:00 to 20:00.\n", encoding="utf-8")
    changed = ingest_documents(kb, [docs], progress=False)
    assert changed.chunks_written == 1 and changed.chunks_removed == 1 and kb.count() == first.chunks

    (docs / "stroke.html").unlink()
    without_sync = ingest_documents(kb, [docs], progress=False)
    assert without_sync.chunks_removed == 0
    synced = ingest_documents(kb, [docs], sync=True, progress=False)
    assert synced.files_removed == 1 and synced.chunks_removed == 1
    assert str((docs / "stroke.html").resolve()) not in kb.document_paths()
    assert kb.lexical_ranking("alteplase thrombolysis", 3) == []


def test_unreadable_files_are_skipped_counted_and_named(kb: KnowledgeBase, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    write_documents(docs)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    (docs / "latin1.txt").write_bytes("Caf\xe9 menu".encode("latin-1"))
    (docs / "patient.json").write_text('{"resourceType": "Patient"}', encoding="utf-8")
    report = ingest_documents(kb, [docs, tmp_path / "missing.md"], progress=False)
    assert report.files_read == 5
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert set(reasons) == {"broken.pdf", "latin1.txt", "patient.json", "missing.md"}
    assert "UTF-8" in reasons["latin1.txt"] and "DocumentReference" in reasons["patient.json"]


def test_cli_ingests_paths_and_exits_1_naming_skipped_files(
    tmp_path: Path, seeded_chroma: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    write_documents(docs)
    (docs / "broken.pdf").write_bytes(b"not a pdf")
    # The command seeds an empty knowledge base with the shipped corpus first: start from the seeded copy.
    shutil.copytree(seeded_chroma, tmp_path / "var" / "chroma")
    # Settings come from the environment, as in a deployment.
    monkeypatch.setenv("MEDBRIDGE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CHROMA_URL", "")
    from integration.app.settings import get_settings

    get_settings.cache_clear()
    try:
        assert cli_main(["kb", "ingest", "--no-progress", str(docs)]) == 1
    finally:
        get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert "5 documents read" in out
    assert "1 files skipped" in err and "broken.pdf" in err


def test_chunks_overlap_and_fit_the_window() -> None:
    text = " ".join(f"Sentence number {i} says something clinical." for i in range(60))
    chunks = chunk_text(text, max_chars=300, overlap=80)
    assert len(chunks) > 5 and all(len(c) <= 300 for c in chunks)
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after.split(". ")[0] in before  # the next chunk starts with the previous one's last sentence
