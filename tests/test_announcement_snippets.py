"""The announcement's two usage snippets run unchanged except the import line and model paths.

The snippets are stored verbatim (tests/snippets/, copied from the announcement).
One more substitution is forced by this sandbox having no internet: the demo image
URL is served from a loopback HTTP server, so the http(s) image path is still used.
"""

import http.server
import threading
from pathlib import Path

import pytest

from tests.media_gen import image_bytes, pattern_image

SNIPPETS = Path(__file__).parent / "snippets"
DEMO_URL = "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg"


@pytest.fixture(scope="module")
def demo_url():
    payload = image_bytes(pattern_image(7, (120, 90)), "JPEG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/demo.jpeg"
    server.shutdown()


def run_snippet(name: str, replacements: dict[str, str]) -> dict:
    code = (SNIPPETS / name).read_text()
    for old, new in replacements.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, name, "exec"), namespace)  # noqa: S102 - the user-facing snippet itself
    return namespace


def test_embedding_snippet(tiny_embedding_ckpt, demo_url, capsys):
    ns = run_snippet("embedding_snippet.py.txt", {
        "from scripts.qwen3_vl_embedding import": "from operators.qwen3vl import",
        '"Qwen/Qwen3-VL-Embedding-2B"': repr(str(tiny_embedding_ckpt)),
        DEMO_URL: demo_url,
    })
    assert tuple(ns["embeddings"].shape) == (7, ns["model"].hidden_size)
    assert len(ns["similarity_scores"]) == 4 and len(ns["similarity_scores"][0]) == 3
    assert "[[" in capsys.readouterr().out


def test_reranker_snippet(tiny_reranker_ckpt, demo_url, capsys):
    ns = run_snippet("reranker_snippet.py.txt", {
        "from scripts.qwen3_vl_reranker import": "from operators.qwen3vl import",
        '"Qwen/Qwen3-VL-Reranker-2B"': repr(str(tiny_reranker_ckpt)),
        DEMO_URL: demo_url,
    })
    assert len(ns["scores"]) == 3 and all(0.0 < s < 1.0 for s in ns["scores"])
    assert capsys.readouterr().out.startswith("[")
