"""Preparation workers -> model process: prepared pixels through the result pipe vs a /dev/shm file.

    .venv/bin/python bench/prepare_handover.py [--items 48] [--repeats 3]

Workers return prepared items of fixed size (bf16 pixels of a 512x512 and a 1600x1200 image,
made once per worker, so no preparation is timed), with `prepare_workers.pack` as the real
workers do, either forced through the pipe or handed over in /dev/shm. Meanwhile the model
process's main thread stands in for the GPU model thread: a loop of tiny torch ops that each
need the GIL, as kernel launches do. Per size and path, interleaved repeats, fastest counts:
  - items/s delivered (unpacked in the model process);
  - the main thread's op rate during the transfer, as a fraction of its rate with nothing running.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import _common as C  # noqa: E402  (sets sys.path)

import torch  # noqa: E402

from operators.qwen3vl import prepare_workers as W  # noqa: E402
from operators.qwen3vl.preprocess import Prepared  # noqa: E402

# Patches (rows of 1536 values) of a 512x512 and a 1600x1200 image at the default max_pixels.
SIZES = {"512x512 (3 MB bf16)": 1024, "1600x1200 (23 MB bf16)": 7500}
_ITEMS: dict[int, Prepared] = {}


def _item(rows: int, shm: bool, owner: int) -> object:
    if rows not in _ITEMS:
        torch.set_num_threads(1)
        pixels = torch.randn(rows, 1536).to(torch.bfloat16)
        _ITEMS[rows] = Prepared(list(range(rows // 4 + 20)), {"pixel_values": pixels,
                                                                "image_grid_thw": torch.tensor([[1, 32, rows // 32]])},
                                {}, "prompt")
    return W.pack(_ITEMS[rows], shm_owner=owner if shm else None)


def _op_rate(stop: threading.Event, out: list[float]) -> None:
    x = torch.zeros(8)
    n, t0 = 0, time.perf_counter()
    while not stop.is_set():
        x.add_(1.0)
        n += 1
    out.append(n / (time.perf_counter() - t0))


def _transfer(pool: ProcessPoolExecutor, rows: int, shm: bool, items: int) -> tuple[float, float]:
    """(items/s, main-thread op rate) while items of this size arrive and are unpacked."""
    stop, rate = threading.Event(), []
    received = []

    def run() -> None:
        futures = [pool.submit(_item, rows, shm, os.getpid()) for _ in range(items)]
        for f in futures:
            received.append(W.unpack(f.result()))
        stop.set()

    t0 = time.perf_counter()
    thread = threading.Thread(target=run)
    thread.start()
    _op_rate(stop, rate)
    thread.join()
    seconds = time.perf_counter() - t0
    assert len(received) == items and all(isinstance(p, Prepared) for p in received)
    return items / seconds, rate[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("#", C.machine())
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
    rows_out = []
    try:
        for name, rows in SIZES.items():
            for shm in (False, True):  # warm-up: every worker builds its item
                list(pool.map(_item, [rows] * args.workers * 2, [shm] * args.workers * 2, [0] * args.workers * 2))
            W.remove_shm_files(0)
            idle_stop, idle = threading.Event(), []
            threading.Timer(1.0, idle_stop.set).start()
            _op_rate(idle_stop, idle)
            got: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for _ in range(args.repeats):
                for shm in (False, True):
                    got[shm].append(_transfer(pool, rows, shm, args.items))
            pipe = max(r for r, _ in got[False]), max(o for _, o in got[False])
            shm_ = max(r for r, _ in got[True]), max(o for _, o in got[True])
            mb = rows * 1536 * 2 / 1e6
            rows_out.append([name, f"{pipe[0]:.1f} ({pipe[0] * mb / 1e3:.2f} GB/s)",
                             f"{shm_[0]:.1f} ({shm_[0] * mb / 1e3:.2f} GB/s)", f"{shm_[0] / pipe[0]:.2f}x",
                             f"{pipe[1] / idle[0]:.2f}", f"{shm_[1] / idle[0]:.2f}"])
            print(f"# {name}: pipe {pipe}, shm {shm_}, idle op rate {idle[0]:.0f}/s", flush=True)
    finally:
        pool.shutdown()
        W.remove_shm_files(os.getpid())
    C.print_table(f"Prepared items from {args.workers} worker processes, {args.items} per run (best of "
                  f"{args.repeats})",
                  ["item", "pipe items/s", "/dev/shm items/s", "shm vs pipe",
                   "main-thread op rate, pipe (vs idle)", "main-thread op rate, shm (vs idle)"], rows_out)


if __name__ == "__main__":
    main()
