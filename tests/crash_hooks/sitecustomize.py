"""Real native crashes for tests/test_resilience_faults.py: a marked file makes the decoder's process die of SIGSEGV.

Loaded by every Python process (Ray workers included) of a test's own Ray instance whose PYTHONPATH
starts with this folder and whose environment sets QVL_TEST_NATIVE_CRASH=1. It stands in for a file
that crashes PDFium or FFmpeg inside C code: the process dies at once, and no Python handler runs.
- PDFs: pypdfium2 given bytes that contain b"qvl-crash" (the expansion stage renders PDFs);
- videos: decord opening a path that contains "qvl-crash" (the embedding stage decodes videos).
"""

import os

if os.environ.get("QVL_TEST_NATIVE_CRASH") == "1":
    import signal

    import decord
    import pypdfium2

    MARK = "qvl-crash"

    def _die() -> None:
        os.kill(os.getpid(), signal.SIGSEGV)

    class _PdfDocument(pypdfium2.PdfDocument):
        def __init__(self, input, *args, **kwargs):
            if isinstance(input, (bytes, bytearray)) and MARK.encode() in input:
                _die()
            super().__init__(input, *args, **kwargs)

    _VideoReader = decord.VideoReader

    def _video_reader(uri, *args, **kwargs):
        if MARK in str(uri):
            _die()
        return _VideoReader(uri, *args, **kwargs)

    pypdfium2.PdfDocument = _PdfDocument
    decord.VideoReader = _video_reader
