"""Real native crashes and hangs for the resilience tests: a marked file makes its decoder die or hang.

Loaded by every Python process (Ray workers included) of a test's own Ray instance whose PYTHONPATH
starts with this folder and whose environment sets QVL_TEST_NATIVE_CRASH=1. It stands in for a file
that crashes PDFium or FFmpeg inside C code (the process dies of SIGSEGV at once, and no Python
handler runs), or that sends it into an endless loop (here: an hour's sleep).
- PDFs: pypdfium2 given bytes that contain b"qvl-crash" / b"qvl-hang" (the expansion stage renders PDFs);
- videos: decord opening a path that contains "qvl-crash" / "qvl-hang" (the embedding stage decodes videos);
- images: Pillow opening bytes that contain b"qvl-crash" / b"qvl-hang" (the expansion stage checks a
  manifest's images);
- Parquet manifests: pyarrow opening bytes that contain b"qvl-crash" / b"qvl-hang" (the run parses
  manifests before it, and the expansion stage parses one that failed there).
"""

import os

if os.environ.get("QVL_TEST_NATIVE_CRASH") == "1":
    import signal
    import time

    import decord
    import pypdfium2

    MARK, HANG = "qvl-crash", "qvl-hang"

    def _die() -> None:
        os.kill(os.getpid(), signal.SIGSEGV)

    def _hang() -> None:
        time.sleep(3600)

    class _PdfDocument(pypdfium2.PdfDocument):
        def __init__(self, input, *args, **kwargs):
            if isinstance(input, (bytes, bytearray)) and MARK.encode() in input:
                _die()
            if isinstance(input, (bytes, bytearray)) and HANG.encode() in input:
                _hang()
            super().__init__(input, *args, **kwargs)

    _VideoReader = decord.VideoReader

    def _video_reader(uri, *args, **kwargs):
        if MARK in str(uri):
            _die()
        if HANG in str(uri):
            _hang()
        return _VideoReader(uri, *args, **kwargs)

    import io

    from PIL import Image

    _image_open = Image.open

    def _open_image(fp, *args, **kwargs):
        data = fp.getvalue() if isinstance(fp, io.BytesIO) else b""
        if MARK.encode() in data:
            _die()
        if HANG.encode() in data:
            _hang()
        return _image_open(fp, *args, **kwargs)

    import pyarrow.parquet as pq

    class _ParquetFile(pq.ParquetFile):
        def __init__(self, source, *args, **kwargs):
            data = source.getvalue() if isinstance(source, io.BytesIO) else b""
            if MARK.encode() in data:
                _die()
            if HANG.encode() in data:
                _hang()
            super().__init__(source, *args, **kwargs)

    pq.ParquetFile = _ParquetFile
    pypdfium2.PdfDocument = _PdfDocument
    decord.VideoReader = _video_reader
    Image.open = _open_image
