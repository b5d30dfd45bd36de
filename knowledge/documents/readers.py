"""Read a document file into titled sections of plain text.

Formats, chosen by extension: Markdown (``.md``, ``.markdown``: ``#`` headings start sections),
HTML (``.html``, ``.htm``: ``<h1>``-``<h6>`` start sections, scripts and styles dropped), PDF
(``.pdf``, text of each page through pypdf; a page is a section), plain text (``.txt``), and FHIR
``DocumentReference`` JSON (``.json``) whose ``content[].attachment.data`` (base64) holds one of the
other formats, named by ``contentType``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

from pydantic import BaseModel, ConfigDict

SUFFIXES = frozenset({".md", ".markdown", ".html", ".htm", ".pdf", ".txt", ".json"})

_CONTENT_TYPES = {
    "text/markdown": ".md",
    "text/html": ".html",
    "application/pdf": ".pdf",
    "text/plain": ".txt",
}


class DocumentError(Exception):
    """A file cannot be read as a document; the message says why and what to do."""


class Section(BaseModel):
    model_config = ConfigDict(frozen=True)

    heading: str | None
    text: str


class Document(BaseModel):
    """A document's title, optional date (ISO 8601, from a DocumentReference) and sections in order."""

    model_config = ConfigDict(frozen=True)

    title: str
    date: str | None = None
    sections: list[Section]


def read_document(path: Path) -> Document:
    """Read ``path`` by its extension.

    Raises:
        DocumentError: unknown extension, unreadable or undecodable file, malformed content.
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DocumentError(f"unsupported file type {suffix or '(none)'}: use one of {', '.join(sorted(SUFFIXES))}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(f"cannot read the file: {exc.strerror or exc}") from exc
    if suffix == ".json":
        return _document_reference(data, path.stem)
    return _parse(data, suffix, path.stem)


def _parse(data: bytes, suffix: str, fallback_title: str, date: str | None = None) -> Document:
    if suffix == ".pdf":
        title, sections = _pdf(data)
    else:
        text = _decode(data)
        if suffix in (".md", ".markdown"):
            title, sections = _markdown(text)
        elif suffix in (".html", ".htm"):
            title, sections = _html(text)
        else:
            title, sections = None, [Section(heading=None, text=text.strip())]
    sections = [s for s in sections if s.text.strip()]
    if not sections:
        raise DocumentError("the document holds no text (a scanned PDF needs OCR first)")
    return Document(title=title or fallback_title, date=date, sections=sections)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"not UTF-8 text (byte {exc.start}): convert the file to UTF-8") from exc


def _markdown(text: str) -> tuple[str | None, list[Section]]:
    title: str | None = None
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines():
        heading = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if heading:
            if len(heading.group(1)) == 1 and title is None:
                title = heading.group(2)
                continue
            sections.append((heading.group(2), []))
        else:
            sections[-1][1].append(line)
    return title, [Section(heading=h, text="\n".join(body).strip()) for h, body in sections]


class _HtmlSections(HTMLParser):
    _SKIP = frozenset({"script", "style", "noscript", "template"})
    _BLOCK = frozenset({"p", "div", "br", "li", "tr", "section", "article", "table", "ul", "ol", "blockquote"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title: str | None = None
        self.sections: list[tuple[str | None, list[str]]] = [(None, [])]
        self._skip = 0
        self._in_title = False
        self._heading: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif re.fullmatch(r"h[1-6]", tag):
            self._heading = []
        elif tag in self._BLOCK:
            self.sections[-1][1].append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skip:
            self._skip -= 1
        elif tag == "title":
            self._in_title = False
        elif re.fullmatch(r"h[1-6]", tag) and self._heading is not None:
            heading = " ".join("".join(self._heading).split())
            self._heading = None
            if tag == "h1" and self.title is None:
                self.title = heading
            elif heading:
                self.sections.append((heading, []))
        elif tag in self._BLOCK:
            self.sections[-1][1].append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._in_title:
            self.title = self.title or data.strip() or None
        elif self._heading is not None:
            self._heading.append(data)
        else:
            self.sections[-1][1].append(data)


def _html(text: str) -> tuple[str | None, list[Section]]:
    parser = _HtmlSections()
    parser.feed(text)
    parser.close()
    sections = []
    for heading, parts in parser.sections:
        paragraphs = [" ".join(p.split()) for p in "".join(parts).split("\n")]
        sections.append(Section(heading=heading, text="\n\n".join(p for p in paragraphs if p)))
    return parser.title, sections


def _pdf(data: bytes) -> tuple[str | None, list[Section]]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        title = reader.metadata.title if reader.metadata else None
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        raise DocumentError(f"not a readable PDF ({exc}): re-export it, or save it as text") from exc
    return title, [Section(heading=f"page {i}", text=t.strip()) for i, t in enumerate(pages, 1)]


def _document_reference(data: bytes, fallback_title: str) -> Document:
    try:
        resource = json.loads(_decode(data))
    except json.JSONDecodeError as exc:
        raise DocumentError(f"not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    if not isinstance(resource, dict) or resource.get("resourceType") != "DocumentReference":
        raise DocumentError("JSON files must be FHIR DocumentReference resources (resourceType)")
    doc_type = resource.get("type") if isinstance(resource.get("type"), dict) else {}
    title = resource.get("description") or doc_type.get("text") or fallback_title
    date = resource.get("date") if isinstance(resource.get("date"), str) else None
    for i, content in enumerate(resource.get("content") or []):
        attachment = content.get("attachment") if isinstance(content, dict) else None
        if not isinstance(attachment, dict) or "data" not in attachment:
            continue
        content_type = str(attachment.get("contentType", "text/plain")).split(";")[0].strip().lower()
        suffix = _CONTENT_TYPES.get(content_type)
        if suffix is None:
            continue
        try:
            raw = base64.b64decode(attachment["data"], validate=True)
        except (binascii.Error, TypeError) as exc:
            raise DocumentError(f"DocumentReference.content[{i}].attachment.data is not base64") from exc
        doc = _parse(raw, suffix, str(attachment.get("title") or title), date)
        return doc.model_copy(update={"title": str(attachment.get("title") or title)})
    raise DocumentError(
        "the DocumentReference has no inline attachment (content[].attachment.data) of type "
        f"{', '.join(sorted(_CONTENT_TYPES))}; attachments by url are not fetched"
    )
