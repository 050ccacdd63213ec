"""Fault injection for the resilience tests: a flaky Qdrant client, a flaky S3 proxy, a hostile
"Qdrant" server, and helpers to inspect runs (points, reports, processes).

Nothing here is imported by production code. ``FlakyQdrantClient`` reaches the Ray
workers through ``QdrantSettings.client_wrapper`` (a callable): the tests register this
module with ``cloudpickle.register_pickle_by_value`` because ``tests`` is not importable
in Ray workers.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

# --------------------------------------------------------------------------- configs


def config_dict(uri: str, ckpt: str, tmp: Path, storage_options: dict | None = None, **sections: dict) -> dict:
    """A job config (as a dict) for a tiny checkpoint, embedded Qdrant in tmp/qdrant and runs in tmp/runs."""
    data: dict[str, Any] = {
        "source": {"uri": str(uri), "storage_options": storage_options or {}},
        "embedder": {"model": str(ckpt), "mrl_dims": [16]},
        "expand": {"chunk_tokens": 64, "overlap_tokens": 8, "video_segment_s": 1.0},
        "compute": {"batch_size": 8},
        "qdrant": {"path": str(tmp / "qdrant"), "collection": "media"},
        "output": {"dir": str(tmp / "runs")},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


def write_yaml(data: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return str(path)


def write_notes(folder: Path) -> Path:
    """A source folder of two short text files, a.txt and b.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("A short note about lanterns.")
    (folder / "b.txt").write_text("Rivers, boats and a harbour at night.")
    return folder


REPO = Path(__file__).resolve().parents[1]


def run_json_script(code: str, *args: str, env: dict[str, str], timeout_s: float = 300) -> dict:
    """Run `code` in a fresh interpreter from the repository root (`args` as sys.argv[1:], `env` as its
    whole environment); its last stdout line, read as JSON."""
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def free_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------- reading results


def all_points(path: Path, collection: str = "media", vectors: bool = False) -> list:
    """Every point of an embedded collection (opens the folder: no owner may hold it)."""
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(path))
    try:
        if not client.collection_exists(collection):
            return []
        points, offset = [], None
        while True:
            batch, offset = client.scroll(collection, limit=512, offset=offset, with_payload=True,
                                          with_vectors=vectors)
            points += batch
            if offset is None:
                return points
    finally:
        client.close()


def sqlite_point_count(qdrant_path: Path, collection: str = "media") -> int:
    """Points persisted so far by an embedded store, read from its SQLite file while another process owns it."""
    db = Path(qdrant_path) / "collection" / collection / "storage.sqlite"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2)
        try:
            return int(con.execute("SELECT count(*) FROM points").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:  # table not created yet, or busy
        return 0


def latest_run(runs_dir: Path) -> tuple[dict, list[dict]]:
    """(report.json, dead letters) of the newest run folder."""
    run = sorted(p for p in Path(runs_dir).iterdir() if p.is_dir())[-1]
    report = json.loads((run / "report.json").read_text())
    dead = [json.loads(line) for line in (run / "dead_letters.jsonl").read_text().splitlines() if line.strip()]
    return report, dead


def point_keys(points: list) -> list[tuple[str, str]]:
    """(source_uri, position) of every point."""
    return [(p.payload["source_uri"], p.payload["position"]) for p in points]


# ------------------------------------------------------------- a flaky Qdrant client


class FlakyQdrantClient:
    """A QdrantClient proxy whose upserts fail with transient errors (HTTP 503 and timeouts, alternating).

    ``fail_upserts``: how many upsert calls fail before they succeed again; None = every one
    (a store that never comes back). Everything else is passed through. Used as
    ``QdrantSettings.client_wrapper=functools.partial(FlakyQdrantClient, fail_upserts=n)``.
    """

    def __init__(self, client: Any, settings: Any = None, *, fail_upserts: int | None = 3,
                 refuse_deletes: bool = False) -> None:
        self._client = client
        self._left = fail_upserts
        self._refuse_deletes = refuse_deletes
        self.failures = 0

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        """With refuse_deletes, every delete fails for good (HTTP 400: not retried)."""
        if self._refuse_deletes:
            import httpx
            from qdrant_client.http.exceptions import UnexpectedResponse

            raise UnexpectedResponse(status_code=400, reason_phrase="Bad Request",
                                     content=b"injected: delete refused", headers=httpx.Headers())
        return self._client.delete(*args, **kwargs)

    def upsert(self, *args: Any, **kwargs: Any) -> Any:
        if self._left is None or self._left > 0:
            if self._left is not None:
                self._left -= 1
            self.failures += 1
            raise self._error()
        return self._client.upsert(*args, **kwargs)

    def _error(self) -> Exception:
        import httpx
        from qdrant_client.http.exceptions import UnexpectedResponse

        if self.failures % 2:
            return UnexpectedResponse(status_code=503, reason_phrase="Service Unavailable",
                                      content=b"injected: store overloaded", headers=httpx.Headers())
        return httpx.ReadTimeout("injected: timed out")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


# -------------------------------------------------------------- a flaky S3 endpoint


class FlakyProxy:
    """A loopback HTTP proxy in front of an S3 endpoint that answers 503 SlowDown to chosen requests.

    - the first ``fail_first`` requests of all;
    - with ``fail_each_once``, the first request of each (method, path) pair as well (so every
      object read, HEAD and GET, meets one 503 and must be retried);
    - GET requests whose path contains one of ``deny_paths`` get a 403 whose message echoes the
      request's Authorization header (a hostile endpoint: tests that such text is redacted).
    Bounded: threads are daemons, the server stops on ``close()``.
    """

    def __init__(self, upstream: str, fail_first: int = 0, fail_each_once: bool = False,
                 deny_paths: tuple[str, ...] = ()) -> None:
        host, port = upstream.split("://", 1)[1].rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.fail_first = fail_first
        self.fail_each_once = fail_each_once
        self.deny_paths = deny_paths
        self.lock = threading.Lock()
        self.requests = 0
        self.failed: list[tuple[str, str]] = []
        self.seen: set[tuple[str, str]] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                with proxy.lock:
                    proxy.requests += 1
                    key = (self.command, path)
                    fail = proxy.requests <= proxy.fail_first or (proxy.fail_each_once and key not in proxy.seen)
                    proxy.seen.add(key)
                    if fail:
                        proxy.failed.append(key)
                if self.command == "GET" and any(d in path for d in proxy.deny_paths):
                    auth = self.headers.get("Authorization", "")
                    self._reply(403, b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                                     b"<Message>denied for " + auth.encode() + b"</Message></Error>")
                    return
                if fail:
                    self._reply(503, b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                                     b"<Message>injected 503</Message></Error>")
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FlakyProxy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class EchoingQdrant:
    """A hostile stand-in for a Qdrant server on loopback: every request gets a 500 whose body
    echoes the request headers (so an API key sent to it comes back in the error text)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = json.dumps({"status": {"error": f"boom; you sent {dict(self.headers.items())}"}}).encode()
                self.send_response(500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------- processes


def session_pids(sid: int) -> list[int]:
    """PIDs of the live processes in session `sid` (a subprocess started with start_new_session=True)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields: state ppid pgrp session ...; zombies are dead already
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def reap_session(sid: int, grace_s: float = 30.0) -> list[str]:
    """Wait for the processes of session `sid` to exit; SIGKILL those still alive after grace_s.

    Returns "pid cmdline" of each process that had to be killed (each one by its id)."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not session_pids(sid):
            return []
        time.sleep(0.25)
    left = session_pids(sid)
    killed = [f"{pid} {_cmdline(pid)}" for pid in left]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + 10
    while session_pids(sid) and time.monotonic() < end:
        time.sleep(0.1)
    return killed


def semaphores() -> set[str]:
    """Names of multiprocessing's named semaphores on this machine (they live in /dev/shm)."""
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


def semaphores_left(before: set[str], wait_s: float = 20.0) -> set[str]:
    """Semaphores made since `before` that are still there after up to wait_s (Ray lets idle actors
    go in the background, so their clean-up may follow the run by a few seconds)."""
    deadline = time.monotonic() + wait_s
    while (left := semaphores() - before) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def grep_tree(root: Path, needles: list[str]) -> list[tuple[str, str]]:
    """(file, needle) for every readable file under root that contains a needle (bytes match)."""
    hits = []
    encoded = [(n, n.encode()) for n in needles]
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                with open(path, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            hits += [(path, n) for n, b in encoded if b in data]
    return hits
