"""Reranker: top-100 candidates for one query, ours vs one pair at a time (the official way).

    .venv/bin/python bench/reranker_top100.py [--size small] [--candidates 100] [--repeats 3]

For each scenario, interleaved repeats of:
  - reference: the official process(), one pair at a time (bench/reference.py);
  - ours: Qwen3VLReranker.score (batched, shared query prefix computed once);
  - ours, prefix reuse off: the same batching without the prefix cache (shows where the gain comes from).
Prints the time ratios (fastest of the interleaved repeats) and the largest |score difference| against the reference.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import _common as C  # noqa: E402  (sets sys.path)

from bench.reference import reference_rerank  # noqa: E402
from operators.qwen3vl import Qwen3VLReranker  # noqa: E402

INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."


def scenarios(n: int, media: Path, seed: int = 0) -> dict[str, tuple[dict, list[dict]]]:
    """name -> (query, candidates)."""
    rng = random.Random(seed)
    captions = [{"text": C.sentence(rng, rng.randint(8, 40))} for _ in range(n)]
    passages = [{"text": C.sentence(rng, rng.randint(60, 250))} for _ in range(n)]
    image_sizes = [(rng.choice([160, 224, 320]), rng.choice([120, 224, 240])) for _ in range(n)]
    images = C.write_images(media / "cand", image_sizes, seed=seed)
    mixed = []
    for i in range(n):
        r = rng.random()
        if r < 0.3:
            mixed.append({"image": images[i]})
        elif r < 0.4:
            mixed.append({"image": images[i], "text": C.sentence(rng, rng.randint(5, 20))})
        else:
            mixed.append({"text": C.sentence(rng, rng.randint(10, 120))})
    query_image = C.write_images(media / "query", [(448, 336)], seed=seed + 1)[0]
    text_query = {"text": C.sentence(rng, 12)}
    return {
        "text query, caption candidates (8-40 words)": (text_query, captions),
        "text query, passage candidates (60-250 words)": (text_query, passages),
        "image query, caption candidates": ({"image": query_image}, captions),
        "text query, mixed candidates (40% image)": (text_query, mixed),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=("tiny", "small", "2b", "8b"))
    ap.add_argument("--checkpoint", default=None, help="existing reranker checkpoint (default: build one)")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="run only scenarios whose name contains this")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch-pairs", type=int, default=None, help="pairs per forward (default: the device's)")
    args = ap.parse_args()

    ckpt = args.checkpoint or C.checkpoint("reranker", args.size)
    rr = Qwen3VLReranker(ckpt, device=args.device, dtype=args.dtype, max_batch_items=args.batch_pairs)
    print("#", C.machine())
    print(f"# checkpoint {ckpt} ({args.size}), {args.candidates} candidates, {args.repeats} repeats, "
          f"device {rr.device}, dtype {rr.dtype}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (query, docs) in scenarios(args.candidates, Path(tmp)).items():
            if args.only and args.only not in name:
                continue
            # Warm up every path (allocator, kernels, first file reads).
            reference_rerank(rr, query, docs[:2], INSTRUCTION)
            rr.score(query, docs[:4], INSTRUCTION)
            t_ref, t_ours, t_batched, diff, prefix = [], [], [], 0.0, 0
            for _ in range(args.repeats):
                t, ref = C.timed(lambda: reference_rerank(rr, query, docs, INSTRUCTION))
                t_ref.append(t)
                rr.prefix_cache = True
                t, ours = C.timed(lambda: rr.score(query, docs, INSTRUCTION))
                t_ours.append(t)
                prefix = rr.last_prefix_length
                rr.prefix_cache = False
                t, batched = C.timed(lambda: rr.score(query, docs, INSTRUCTION))
                t_batched.append(t)
                rr.prefix_cache = True
                diff = max(diff, max(abs(a.score - b) for a, b in zip(ours, ref)),
                           max(abs(a.score - b) for a, b in zip(batched, ref)))
            tr, to, tb = C.best(t_ref), C.best(t_ours), C.best(t_batched)
            rows.append([name, prefix, f"{tr:.2f}", f"{tb:.2f}", f"{to:.2f}", f"{tr / tb:.2f}x", f"{tr / to:.2f}x",
                         f"{diff:.1e}"])
            print(f"# {name}: reference {tr:.2f}s, batched {tb:.2f}s, ours {to:.2f}s", flush=True)
    C.print_table(f"Reranker, top-{args.candidates} for one query ({args.size}, {rr.device}, best of "
                  f"{args.repeats})",
                  ["scenario", "shared prefix tokens", "one pair at a time s", "batched, no prefix reuse s",
                   "ours s", "batched only vs ref", "ours vs ref", "max |score diff|"], rows)
    rr.close()


if __name__ == "__main__":
    main()
