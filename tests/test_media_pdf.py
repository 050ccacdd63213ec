"""PDF rendering with pypdfium2: pages, text, and the failure modes."""

from __future__ import annotations

import io
import threading

import pypdfium2 as pdfium
import pytest
from PIL import Image

from operators.media.pdf import (
    PdfCorruptError,
    PdfEmptyError,
    PdfEncryptedError,
    PdfError,
    PdfPageTooLargeError,
    PdfTooManyPagesError,
    PageFailure,
    pdf_page_count,
    render_pdf,
)
from tests.media_corpus import make_pdf

PAGES = ["Page one: apples", "Page two: bananas", "Page three: cherries"]


def test_render_pages_text_and_size() -> None:
    out = list(render_pdf(make_pdf(PAGES), dpi=144, max_pages=10))
    assert [n for n, _, _ in out] == [1, 2, 3]
    assert [t for _, _, t in out] == PAGES
    img = Image.open(io.BytesIO(out[0][1]))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (400, 300)  # 200x150 pt at 2x
    assert out[0][1] != out[1][1]


def test_page_count_and_cap() -> None:
    data = make_pdf(PAGES)
    assert pdf_page_count(data) == 3
    assert len(list(render_pdf(data, 72, 3))) == 3
    with pytest.raises(PdfTooManyPagesError, match="3 pages, over the cap of 2"):
        render_pdf(data, 72, 2)


def test_encrypted_corrupt_and_empty() -> None:
    with pytest.raises(PdfEncryptedError, match="password"):
        render_pdf(make_pdf(["secret"], encrypted=True), 72, 10)
    with pytest.raises(PdfCorruptError, match="corrupt"):
        render_pdf(b"%PDF-1.4\ngarbage", 72, 10)
    with pytest.raises(PdfEmptyError, match="no pages"):
        render_pdf(make_pdf([]), 72, 10)
    empty = io.BytesIO()
    pdfium.PdfDocument.new().save(empty)
    with pytest.raises(PdfEmptyError, match="no pages"):
        render_pdf(empty.getvalue(), 72, 10)
    assert issubclass(PdfError, ValueError)


def test_page_pixel_guard_fails_that_page_alone() -> None:
    [only] = render_pdf(make_pdf(["big"], size=(2000, 2000)), dpi=144, max_pages=5, max_pixels=1_000_000)
    assert isinstance(only, PageFailure) and only.number == 1
    assert isinstance(only.error, PdfPageTooLargeError) and "page 1 would render" in str(only.error)
    # Page 2 of 3 enlarged in place (same length, so the cross-reference table still holds).
    data = make_pdf(PAGES).replace(b"/MediaBox [0 0 200 150]", b"/MediaBox [0 0 900 950]", 2)
    data = data.replace(b"/MediaBox [0 0 900 950]", b"/MediaBox [0 0 200 150]", 1)
    out = list(render_pdf(data, dpi=72, max_pages=5, max_pixels=100_000))
    assert [type(p).__name__ for p in out] == ["tuple", "PageFailure", "tuple"]
    assert [out[0][0], out[1].number, out[2][0]] == [1, 2, 3] and out[2][2] == PAGES[2]


def test_threads_share_the_lock() -> None:
    data = make_pdf(PAGES)
    results: list[int] = []

    def work() -> None:
        results.append(len(list(render_pdf(data, 36, 10))))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [3, 3, 3, 3]


def test_abandoned_iterator_releases_lock() -> None:
    it = render_pdf(make_pdf(PAGES), 36, 10)
    next(it)
    it.close()
    assert pdf_page_count(make_pdf(PAGES)) == 3
