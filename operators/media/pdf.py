"""Render PDF pages to PNG (and extract their text) with pypdfium2.

PDFium is not thread-safe: every PDFium call in this module runs under one
module lock. Pages are rendered lazily (one at a time under the lock, PNG
encoding outside it) and the document is closed when the iterator finishes or
is closed. Document-level problems (password, corrupt, no pages, too many
pages) raise before the first page is yielded; a page that cannot be rendered
(too large, a PDFium error) is yielded as a PageFailure, and the others still are.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

PDFIUM_LOCK = threading.RLock()  # re-entrant: an abandoned page iterator may be finalised inside a locked call
_COUNT_ZERO = re.compile(rb"/Count\s*0(?![0-9])")
_COUNT_NONZERO = re.compile(rb"/Count\s*[1-9]")
DEFAULT_MAX_PAGE_PIXELS = 89_478_485  # same default as the image bomb guard


class PdfError(ValueError):
    """A PDF cannot be used."""


class PdfEncryptedError(PdfError):
    """The PDF needs a password."""


class PdfCorruptError(PdfError):
    """PDFium cannot parse the file."""


class PdfEmptyError(PdfError):
    """The PDF has no pages."""


class PdfTooManyPagesError(PdfError):
    """More pages than the configured cap."""


class PdfPageTooLargeError(PdfError):
    """A page would render to more pixels than allowed."""


@dataclass(frozen=True)
class PageFailure:
    """A page that could not be rendered: its 1-based number and why."""

    number: int
    error: Exception


def _open_document(data: bytes) -> pdfium.PdfDocument:
    """Open a PDF from bytes (caller holds the lock), mapping PDFium errors to PdfError subclasses."""
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        # PDFium refuses to load zero-page documents at all, sometimes with a PASSWORD error
        # code: an unencrypted file whose page tree says /Count 0 has no pages.
        if _declares_no_pages(data) and b"/Encrypt" not in data:
            raise PdfEmptyError("PDF has no pages") from exc
        if getattr(exc, "err_code", None) == pdfium_c.FPDF_ERR_PASSWORD:
            raise PdfEncryptedError("PDF is encrypted and needs a password") from exc
        if _declares_no_pages(data):
            raise PdfEmptyError("PDF has no pages") from exc
        raise PdfCorruptError(f"corrupt or unreadable PDF: {exc}") from exc


def _declares_no_pages(data: bytes) -> bool:
    """Whether the file's page tree says /Count 0 (and never a non-zero count)."""
    return bool(_COUNT_ZERO.search(data)) and not _COUNT_NONZERO.search(data)


def pdf_page_count(data: bytes) -> int:
    """Number of pages of a PDF (raises PdfError subclasses for unusable files)."""
    with PDFIUM_LOCK:
        doc = _open_document(data)
        try:
            return len(doc)
        finally:
            doc.close()


def _check_pages(n_pages: int, max_pages: int) -> None:
    """Zero pages and the page cap."""
    if n_pages <= 0:
        raise PdfEmptyError("PDF has no pages")
    if n_pages > max_pages:
        raise PdfTooManyPagesError(f"PDF has {n_pages} pages, over the cap of {max_pages} pages")


def _render_page(doc: pdfium.PdfDocument, index: int, scale: float, max_pixels: int) -> tuple[Image.Image, str]:
    """Render one page to a PIL RGB image and get its text (caller holds the lock)."""
    page = doc[index]
    try:
        width, height = page.get_size()
        pixels = int(width * scale) * int(height * scale)
        if pixels > max_pixels:
            raise PdfPageTooLargeError(f"page {index + 1} would render to {pixels} pixels, over the limit of {max_pixels}")
        textpage = page.get_textpage()
        try:
            text = textpage.get_text_range()
        finally:
            textpage.close()
        bitmap = page.render(scale=scale, may_draw_forms=True)
        try:
            image = bitmap.to_pil().convert("RGB").copy()
        finally:
            bitmap.close()
    finally:
        page.close()
    return image, text


def _page_text(raw: str) -> str:
    """Page text with normalised line endings and no trailing whitespace."""
    return raw.replace("\r\n", "\n").replace("\r", "\n").strip()


def render_pdf(
    data: bytes, dpi: int, max_pages: int, max_pixels: int = DEFAULT_MAX_PAGE_PIXELS
) -> Iterator[tuple[int, bytes, str] | PageFailure]:
    """Yield (1-based page number, RGB PNG bytes, page text) for every page of a PDF, or its PageFailure."""
    if dpi <= 0:
        raise ValueError(f"dpi must be > 0, got {dpi}")
    with PDFIUM_LOCK:
        doc = _open_document(data)
        try:
            n_pages = len(doc)
            _check_pages(n_pages, max_pages)
        except BaseException:
            doc.close()
            raise
    return _iter_pages(doc, n_pages, dpi / 72.0, max_pixels)


def _iter_pages(doc: pdfium.PdfDocument, n_pages: int, scale: float,
                max_pixels: int) -> Iterator[tuple[int, bytes, str] | PageFailure]:
    """The lazy part of render_pdf: one page at a time, document closed at the end."""
    try:
        for index in range(n_pages):
            try:
                with PDFIUM_LOCK:
                    image, text = _render_page(doc, index, scale, max_pixels)
            except Exception as exc:  # one oversized or broken page must not cost the document's others
                yield PageFailure(index + 1, exc)
                continue
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            yield index + 1, buf.getvalue(), _page_text(text)
    finally:
        with PDFIUM_LOCK:
            doc.close()
