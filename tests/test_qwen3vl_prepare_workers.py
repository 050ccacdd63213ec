"""Preparation in worker processes: the same items, vectors and scores as in threads; failures stay per item."""

import pytest
import torch

from operators.qwen3vl import Qwen3VLEmbedder, Qwen3VLReranker
from operators.qwen3vl import prepare_workers
from operators.qwen3vl.prepare_workers import ShmArray, pack, remove_shm_files, unpack
from operators.qwen3vl.runner import resolve_prepare_processes
from tests.media_gen import pattern_image, write_video
from tests.resilience_helpers import run_json_script, semaphores, semaphores_left


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare_workers")
    paths = {}
    # "big": about 5 MB of float32 pixels, handed over in /dev/shm rather than the pipe.
    for i, (name, size) in enumerate([("a", (96, 64)), ("b", (300, 40)), ("big", (640, 480))]):
        paths[name] = root / f"{name}.png"
        pattern_image(i, size, "RGB").save(paths[name])
    paths["video"] = write_video(root / "clip.mp4", seconds=2.0)
    paths["broken"] = root / "broken.png"
    paths["broken"].write_bytes(b"not an image")
    return paths


def test_worker_processes_give_the_thread_results(tiny_embedding_ckpt, media):
    items = [{"text": "hello"}, {"image": str(media["a"]), "text": "caption"}, {"video": str(media["video"])},
             {"image": str(media["broken"])}, {"image": str(media["b"])}, {"image": str(media["big"])}]
    threads = Qwen3VLEmbedder(str(tiny_embedding_ckpt), prepare_processes=0)
    procs = Qwen3VLEmbedder(str(tiny_embedding_ckpt), prepare_processes=2)
    try:
        a, b = threads.embed(items), procs.embed(items)
        assert [r.ok for r in a] == [r.ok for r in b] == [True, True, True, False, True, True]
        assert "broken.png" in b[3].error and b[3].error == a[3].error
        for x, y in zip(a, b):
            if x.ok:
                assert abs(x.vector - y.vector).max() < 1e-6
        # The item a worker prepares is the item a thread prepares, field for field.
        p_thread, p_proc = threads.prepare(items[2]), procs.submit_prepare(items[2]).result()
        assert p_proc.input_ids == p_thread.input_ids and p_proc.prompt == p_thread.prompt
        assert torch.equal(p_proc.positions, p_thread.positions)
        assert p_proc.vision.keys() == p_thread.vision.keys()
        assert all(torch.equal(p_proc.vision[k], p_thread.vision[k]) for k in p_thread.vision)
        big = procs.submit_prepare(items[5]).result()
        assert torch.equal(big.vision["pixel_values"], threads.prepare(items[5]).vision["pixel_values"])
    finally:
        threads.close()
        procs.close()
    assert not _handover_files()  # every file was read and deleted


def test_first_calls_from_several_threads_start_one_pool_of_workers(tiny_embedding_ckpt):
    # A server's threads sharing one embedder: their first calls raced to start the pool, each
    # started its own, and each pool's workers died with the thread that had started them.
    import multiprocessing
    import threading

    earlier = set(multiprocessing.active_children())  # other tests' workers may still be exiting
    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt), prepare_processes=2)
    start = threading.Barrier(4)
    results = []

    def first_call(k):
        start.wait()
        results.append(emb.embed([{"text": f"thread {k} item {i}"} for i in range(4)]))

    callers = [threading.Thread(target=first_call, args=(k,), daemon=True) for k in range(4)]
    try:
        for t in callers:
            t.start()
        for t in callers:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in callers), "the first calls never returned"
        assert len(results) == 4 and all(r.ok for rs in results for r in rs)
        assert 1 <= len(set(multiprocessing.active_children()) - earlier) <= 2
        assert emb._processes.restarts == 0
    finally:
        emb.close()


def test_workers_outlive_the_thread_whose_call_started_them(tiny_embedding_ckpt, caplog):
    # A pool spawns its workers from the thread that submits, and their parent-death signal
    # follows that thread: a request thread that ended took the workers with it.
    import logging
    import threading

    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt), prepare_processes=1)
    try:
        request = threading.Thread(target=lambda: emb.embed([{"text": "the first request"}]))
        request.start()
        request.join()
        with caplog.at_level(logging.WARNING):
            assert all(r.ok for r in emb.embed([{"text": "a later request"}, {"text": "and another"}]))
        assert emb._processes.restarts == 0 and "died" not in caplog.text
    finally:
        emb.close()


def test_reranker_in_worker_processes(tiny_reranker_ckpt, media):
    docs = [{"text": "a"}, {"image": str(media["a"])}, {"image": str(media["broken"])}, {"text": "b " * 50}]
    threads = Qwen3VLReranker(str(tiny_reranker_ckpt), prepare_processes=0)
    procs = Qwen3VLReranker(str(tiny_reranker_ckpt), prepare_processes=2)
    try:
        a, b = threads.score({"text": "q"}, docs), procs.score({"text": "q"}, docs)
        assert [r.ok for r in b] == [True, True, False, True] and b[2].error == a[2].error
        assert max(abs(x.score - y.score) for x, y in zip(a, b) if x.ok) < 1e-6
    finally:
        threads.close()
        procs.close()


def test_image_query_pixels_are_processed_once_in_the_model_process(tiny_reranker_ckpt, media, caplog):
    # Workers leave the query image's pixel rows out of each pair; the model process puts back its own.
    query = {"image": str(media["big"]), "text": "like this"}
    docs = [{"text": "a"}, {"image": str(media["a"])}, {"image": str(media["broken"])}, {"text": "b " * 50},
            {"image": str(media["b"]), "text": "c"}]
    threads = Qwen3VLReranker(str(tiny_reranker_ckpt), prepare_processes=0)
    procs = Qwen3VLReranker(str(tiny_reranker_ckpt), prepare_processes=2)
    try:
        a, b = threads.score(query, docs), procs.score(query, docs)
        assert [r.ok for r in b] == [True, True, False, True, True] and b[2].error == a[2].error
        assert max(abs(x.score - y.score) for x, y in zip(a, b) if x.ok) < 1e-6
        rebuilt = [k for k in procs._vision_cache._items if k[0] == "in model dtype"]
        assert len(rebuilt) == 1  # one processing of the query image for the whole call
        # The same pair, whole from a thread and rebuilt from a worker, field for field.
        args = (query, docs[1], None, None, None, "scope")
        whole, part = threads.prepare(*args), procs.submit_prepare(*args).result()
        assert part.input_ids == whole.input_ids and torch.equal(part.positions, whole.positions)
        assert all(torch.equal(part.vision[k], whole.vision[k]) for k in whole.vision)
        # Pairs whose document has no image get the model process's own rows, not a copy each.
        one, two = (procs.submit_prepare(query, d, None, None, None, "scope").result() for d in (docs[0], docs[3]))
        assert one.vision["pixel_values"].data_ptr() == two.vision["pixel_values"].data_ptr()

        # If the rows cannot be rebuilt, the pair is prepared again in a thread: same scores.
        procs.close()
        procs = Qwen3VLReranker(str(tiny_reranker_ckpt), prepare_processes=2)

        def broken(item, marker, args):
            raise ValueError("differs")

        procs.attach_shared = broken
        with caplog.at_level("WARNING"):
            c = procs.score(query, docs)
        assert [r.ok for r in c] == [r.ok for r in a]
        assert max(abs(x.score - y.score) for x, y in zip(a, c) if x.ok) < 1e-6
        assert "could not rebuild a prepared item" in caplog.text
    finally:
        threads.close()
        procs.close()


def test_pack_round_trips_bfloat16_and_errors():
    from operators.qwen3vl.preprocess import Prepared
    p = Prepared([1, 2], {"pixel_values": torch.randn(3, 4).to(torch.bfloat16),
                          "image_grid_thw": torch.tensor([[1, 2, 2]])}, {}, "x", torch.arange(6).view(3, 2))
    q = unpack(pack(p))
    assert q.vision["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(q.vision["pixel_values"], p.vision["pixel_values"])
    assert torch.equal(q.vision["image_grid_thw"], p.vision["image_grid_thw"]) and torch.equal(q.positions, p.positions)
    assert unpack(pack("input 3: unreadable")) == "input 3: unreadable"


def _handover_files(pid=None):
    import glob
    import os
    return glob.glob(os.path.join(prepare_workers.SHM_DIR, f"qvl-prep-{pid or os.getpid()}-*"))


def _big_item():
    from operators.qwen3vl.preprocess import Prepared
    pixels = torch.randn(1024, 512).to(torch.bfloat16)  # 1 MiB: over the threshold
    return Prepared([1, 2], {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 32, 32]])}, {}, "x",
                    torch.arange(6).view(3, 2))


def test_large_arrays_cross_in_shared_memory_and_are_deleted():
    import os
    p = _big_item()
    packed = pack(p, shm_owner=os.getpid())
    ref = packed[1]["pixel_values"][1]
    assert isinstance(ref, ShmArray) and os.path.exists(ref.path)
    assert isinstance(packed[1]["image_grid_thw"][1], type(p.vision["image_grid_thw"].numpy()))  # small: pipe
    q = unpack(packed)
    assert not os.path.exists(ref.path)
    assert q.vision["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(q.vision["pixel_values"], p.vision["pixel_values"])


def test_no_shared_memory_means_the_pipe(monkeypatch, tmp_path):
    import os
    monkeypatch.setattr(prepare_workers, "SHM_DIR", str(tmp_path / "missing"))
    packed = pack(_big_item(), shm_owner=os.getpid())
    assert not isinstance(packed[1]["pixel_values"][1], ShmArray)
    # A full tmpfs: the reservation fails, nothing is left behind, the array takes the pipe.
    monkeypatch.setattr(prepare_workers, "SHM_DIR", str(tmp_path))

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    item = _big_item()
    packed = pack(item, shm_owner=os.getpid())
    assert not isinstance(packed[1]["pixel_values"][1], ShmArray) and not list(tmp_path.iterdir())
    assert torch.equal(unpack(packed).vision["pixel_values"], item.vision["pixel_values"])


def test_orphaned_handover_files_are_removed(monkeypatch, tmp_path):
    import os
    import subprocess
    monkeypatch.setattr(prepare_workers, "SHM_DIR", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    old, fresh, live = (tmp_path / f"qvl-prep-{gone.pid}-a", tmp_path / f"qvl-prep-{gone.pid}-b",
                        tmp_path / f"qvl-prep-{os.getpid()}-c")
    for f in (old, fresh, live):
        f.write_bytes(b"x")
    os.utime(old, (0, 0))
    remove_shm_files()
    assert not old.exists() and fresh.exists() and live.exists()  # only old files of dead processes
    remove_shm_files(os.getpid())
    assert not live.exists()


def test_default_is_threads_on_cpu_and_processes_on_gpu():
    assert resolve_prepare_processes(None, torch.device("cpu")) == 0
    assert resolve_prepare_processes(3, torch.device("cpu")) == 3
    gpu = resolve_prepare_processes(None, torch.device("cuda"))
    assert gpu == 0 or 2 <= gpu <= 8
    with pytest.raises(ValueError, match="prepare_processes"):
        resolve_prepare_processes(-1, torch.device("cpu"))


def test_worker_processes_start_inside_a_ray_actor(ray_local, tiny_embedding_ckpt, media):
    # The GPU layout: an embedding actor whose embedder prepares in spawned worker processes.
    ray = ray_local
    from operators.embed_stage import EmbedStage

    before = semaphores()
    stage = ray.remote(EmbedStage).remote(str(tiny_embedding_ckpt), [], {"prepare_processes": 1})
    embed = ray.get(stage.__ray_call__.remote(
        lambda self, items: [(r.ok, r.vector) for r in self.embedder.embed(items)],
        [{"text": "hello"}, {"image": str(media["a"])}, {"image": str(media["broken"])}]), timeout=300)
    local = Qwen3VLEmbedder(str(tiny_embedding_ckpt), prepare_processes=0)
    try:
        expected = local.embed([{"text": "hello"}, {"image": str(media["a"])}])
    finally:
        local.close()
    assert [ok for ok, _ in embed] == [True, True, False]
    for (_, got), want in zip(embed, expected):
        assert abs(got - want.vector).max() < 1e-6
    ray.get(stage.__ray_call__.remote(lambda self: self.embedder.close()))  # as Ray Data's release does
    ray.kill(stage)
    assert semaphores_left(before) == set()


def test_preparation_threads_do_not_take_the_model_threads(tiny_embedding_ckpt):
    # A preparation thread with the default intra-op setting builds its own OpenMP team and
    # slowed the model thread by half on 2 cores; they run single-threaded, the model keeps its own.
    before = torch.get_num_threads()
    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt), prepare_processes=0)
    try:
        emb.embed([{"text": f"item {i}"} for i in range(8)])
        assert emb._pool.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == before
    finally:
        emb.close()


def test_a_killed_worker_is_replaced_and_every_item_still_gets_its_vector(tiny_embedding_ckpt, media, caplog):
    # A killed worker breaks the whole process pool: a fresh pool takes over, items keep their vectors.
    import os
    import signal
    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt), prepare_processes=1)
    try:
        items = [{"text": "hello"}, {"image": str(media["a"])}]
        want = emb.embed(items)
        pids = list(emb._processes._pool._processes)
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        got = emb.embed(items * 3)
        assert all(r.ok for r in got)
        assert abs(got[1].vector - want[1].vector).max() < 1e-6
        assert emb._processes.restarts == 1 and emb._processes.broken is None
        assert "started the workers afresh" in caplog.text
    finally:
        emb.close()


def test_an_input_that_crashes_its_worker_fails_alone_and_the_model_process_lives(tiny_embedding_ckpt, media,
                                                                                   tmp_path, monkeypatch):
    """A video that kills decord with SIGSEGV (tests/crash_hooks, loaded by the spawned workers only): it
    fails alone, with WORKER_DIED, and never runs in this process; its neighbours get the thread path's
    vectors."""
    import os
    import shutil
    from pathlib import Path

    bad = tmp_path / "qvl-crash.mp4"
    shutil.copy(media["video"], bad)
    items = [{"text": "hello"}, {"video": str(media["video"])}, {"video": str(bad)}, {"image": str(media["a"])},
             {"image": str(media["b"])}]
    threads = Qwen3VLEmbedder(str(tiny_embedding_ckpt), prepare_processes=0)
    want = threads.embed(items)
    threads.close()
    hooks = Path(__file__).parent / "crash_hooks"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("QVL_TEST_NATIVE_CRASH", "1")  # read by the workers, spawned after this
    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt), prepare_processes=2)
    try:
        warm = emb.embed(items[:1])  # the pool has prepared an item: it can start, so a death is a crash
        assert warm[0].ok
        got = emb.embed(items)
        assert got[2].error is not None and prepare_workers.WORKER_DIED in got[2].error
        for i in (0, 1, 3, 4):
            assert got[i].ok, got[i].error
            assert abs(got[i].vector - want[i].vector).max() < 1e-5
        assert emb._processes.restarts >= 1 and emb._processes.crashed == 1 and emb._processes.broken is None
        assert all(r.ok for r in emb.embed(items[:2]))  # the fresh pool serves the next call
    finally:
        emb.close()


def test_a_pool_that_cannot_start_hands_items_to_threads(caplog):
    from concurrent.futures import Future

    def in_thread(*args):
        f = Future()
        f.set_result(("thread", args))
        return f

    # No settings for the light runner: every worker's initializer fails before preparing anything.
    procs = prepare_workers.PrepareProcesses(1, {"cls": Qwen3VLEmbedder}, fallback=in_thread)
    try:
        assert procs.submit("x").result(timeout=120) == ("thread", ("x",))
        assert procs.submit("y").result(timeout=10) == ("thread", ("y",))
        assert procs.broken and procs.restarts == 0
        assert "preparing in threads" in caplog.text
    finally:
        procs.shutdown()


_ORPHAN_SCRIPT = """
import multiprocessing, sys, time
from operators.qwen3vl.prepare_workers import die_with_parent

def child():
    die_with_parent()
    print("ready", flush=True)
    time.sleep(600)  # a worker stuck in a hung decoder

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=child)
    p.start()
    print(p.pid, flush=True)
    time.sleep(600)
"""


_ABRUPT_EXIT_SCRIPT = """
import glob, json, os, signal, sys
from operators.qwen3vl import Qwen3VLEmbedder

if __name__ == "__main__":
    before = set(glob.glob("/dev/shm/sem.mp-*"))
    emb = Qwen3VLEmbedder(sys.argv[1], prepare_processes=1)
    assert emb.embed([{"text": "hello"}])[0].ok
    made = len(set(glob.glob("/dev/shm/sem.mp-*")) - before)
    emb.close()
    # What Ray does when an actor's process exits: its children are killed, multiprocessing's
    # resource tracker among them, and the process ends without its exit handlers.
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    print(json.dumps({"made": made}), flush=True)
    os._exit(0)
"""


def test_a_closed_runner_leaves_no_semaphores_when_its_process_ends_abruptly(tiny_embedding_ckpt):
    # Its pool's queues are named semaphores in /dev/shm: five were left per Ray actor per run.
    import os

    before = semaphores()
    out = run_json_script(_ABRUPT_EXIT_SCRIPT, str(tiny_embedding_ckpt), env=dict(os.environ), timeout_s=120)
    assert out["made"] >= 1  # the pool was running
    assert semaphores_left(before, wait_s=2) == set()


_HELD_AT_EXIT_SCRIPT = """
import json, sys
from operators.embed_stage import EmbedStage

stage = EmbedStage(sys.argv[1], [], {"prepare_processes": 1})  # a global: deleted as the interpreter finalizes
assert stage.embedder.embed([{"text": "hello"}])[0].ok
print(json.dumps({"ok": True}), flush=True)
"""


def test_a_stage_still_held_at_interpreter_exit_lets_the_process_end(tiny_embedding_ckpt):
    # Its __del__ closes the model as the interpreter finalizes, when a new thread never runs: the
    # bounded wait for the pool started one, and the process hung at exit for good.
    import os

    out = run_json_script(_HELD_AT_EXIT_SCRIPT, str(tiny_embedding_ckpt), env=dict(os.environ), timeout_s=120)
    assert out["ok"]


def test_a_worker_dies_with_its_model_process(tmp_path):
    # A worker stuck in a hung decoder never reads its pipe: without this it outlives a killed parent.
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, str(script)], cwd=repo, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(repo)})
    child = None
    try:
        child = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "ready"  # its death signal is set
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{child}") and \
                "Z" not in open(f"/proc/{child}/stat").read().split()[2]:
            time.sleep(0.05)
        alive = os.path.exists(f"/proc/{child}") and "Z" not in open(f"/proc/{child}/stat").read().split()[2]
        assert not alive, "the worker outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and os.path.exists(f"/proc/{child}"):
            os.kill(child, signal.SIGKILL)
