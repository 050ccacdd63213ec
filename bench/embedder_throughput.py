"""Embedder throughput on a mixed corpus: ours vs the official fixed-batch loop vs the forward-only ceiling.

    .venv/bin/python bench/embedder_throughput.py [--size small] [--repeats 3] [--scale 1.0]

Corpus (shuffled, seeded): short texts, long texts, small images, large images, a few
short videos. Per interleaved repeat:
  - baseline: the official Qwen3VLEmbedder.process() over fixed batches of 16 in input
    order (format -> apply_chat_template -> process_vision_info -> processor(padding=True)
    -> forward -> pool), serial (bench/reference.py);
  - ours: Qwen3VLEmbedder.process(corpus) (per-item preparation in a thread pool overlapped
    with the forward passes, token-budget batches of length-sorted windows);
  - ceiling: the forward passes alone on token-budget batches of the whole corpus sorted by length,
    prepared and collated beforehand (ours cuts its batches per window, so its padding differs a little).
Prints items/s, the ratios, and the largest difference between our vectors and the baseline's.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import _common as C  # noqa: E402  (sets sys.path)

import torch  # noqa: E402

from bench.reference import reference_embed_all  # noqa: E402
from operators.qwen3vl import Qwen3VLEmbedder  # noqa: E402
from operators.qwen3vl.preprocess import collate, token_budget_batches  # noqa: E402


def make_corpus(root: Path, scale: float = 1.0, seed: int = 0) -> tuple[list[dict], dict[str, int]]:
    """The mixed corpus (shuffled) and its composition."""
    rng = random.Random(seed)
    n = lambda k: max(1, round(k * scale))  # noqa: E731
    items: list[dict] = []
    counts = {"short text": n(64), "long text": n(16), "small image": n(48), "large image": n(8), "video": n(3)}
    items += [{"text": C.sentence(rng, rng.randint(4, 40))} for _ in range(counts["short text"])]
    items += [{"text": " ".join(C.sentence(rng, 20) for _ in range(rng.randint(10, 40)))}
              for _ in range(counts["long text"])]
    small = [(rng.choice([64, 128, 200, 256]), rng.choice([64, 96, 160, 256])) for _ in range(counts["small image"])]
    large = [(rng.choice([1024, 1280, 1600]), rng.choice([768, 960, 1200])) for _ in range(counts["large image"])]
    items += [{"image": p} for p in C.write_images(root / "small", small, seed=seed)]
    items += [{"image": p} for p in C.write_images(root / "large", large, seed=seed + 1)]
    items += [{"video": p} for p in C.write_videos(root / "video", counts["video"], seconds=4.0, size=(320, 240))]
    rng.shuffle(items)
    return items, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=("tiny", "small", "2b", "8b"))
    ap.add_argument("--checkpoint", default=None, help="existing embedding checkpoint (default: build one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="corpus size multiplier (1.0 = 139 items)")
    ap.add_argument("--batch-size", type=int, default=16, help="the baseline's fixed batch size")
    args = ap.parse_args()

    ckpt = args.checkpoint or C.checkpoint("embedding", args.size)
    emb = Qwen3VLEmbedder(ckpt)
    print("#", C.machine())
    with tempfile.TemporaryDirectory() as tmp:
        corpus, counts = make_corpus(Path(tmp), args.scale)
        print(f"# checkpoint {ckpt} ({args.size}), corpus {len(corpus)} items {counts}, {args.repeats} repeats")

        # Pre-built batches for the ceiling (and token statistics).
        prepared = [emb.prepare(x) for x in corpus]
        lengths = [p.num_tokens for p in prepared]
        pad_id = emb.processor.tokenizer.pad_token_id
        batches = [collate([prepared[i] for i in b], pad_id, "right")
                   for b in token_budget_batches(lengths, emb.token_budget, emb.max_batch_items)]
        padded_ours = sum(b["input_ids"].numel() for b in batches)
        padded_ref = sum(max(lengths[i:i + args.batch_size]) * len(lengths[i:i + args.batch_size])
                         for i in range(0, len(lengths), args.batch_size))
        patches = sum(p.num_patches for p in prepared)
        print(f"# tokens: {sum(lengths)} real, {padded_ours} padded in our batches ({len(batches)} batches), "
              f"{padded_ref} padded in fixed batches of {args.batch_size}; {patches} vision patches")

        @torch.inference_mode()
        def ceiling() -> None:
            for b in batches:
                emb.hidden_at(b, b["attention_mask"].sum(1) - 1, use_cache=False).float()

        # Warm-up of every path.
        reference_embed_all(emb, corpus[:4], args.batch_size)
        emb.process(corpus[:4])

        t_ref, t_ours, t_ceil, cpu = [], [], [], {"ref": [], "ours": [], "ceil": []}
        for _ in range(args.repeats):
            for name, fn, out in (("ref", lambda: reference_embed_all(emb, corpus, args.batch_size), t_ref),
                                  ("ours", lambda: emb.process(corpus), t_ours), ("ceil", ceiling, t_ceil)):
                c0 = time.process_time()
                t, result = C.timed(fn)
                cpu[name].append(time.process_time() - c0)
                out.append(t)
                if name == "ref":
                    ref_vectors = result
                elif name == "ours":
                    our_vectors = result
            diff = (our_vectors - ref_vectors).abs().max().item()
            print(f"# repeat: baseline {t_ref[-1]:.1f}s ours {t_ours[-1]:.1f}s ceiling {t_ceil[-1]:.1f}s "
                  f"(max |vector diff| {diff:.1e})", flush=True)

    n = len(corpus)
    tr, to, tc = C.best(t_ref), C.best(t_ours), C.best(t_ceil)
    rows = [["baseline: fixed batches of 16, serial prep", f"{n / tr:.2f}", f"{C.best(cpu['ref']):.1f}", "1.00x",
             f"{tc / tr:.2f}"],
            ["ours: Qwen3VLEmbedder.process", f"{n / to:.2f}", f"{C.best(cpu['ours']):.1f}", f"{tr / to:.2f}x",
             f"{tc / to:.2f}"],
            ["forward-only ceiling (pre-built batches)", f"{n / tc:.2f}", f"{C.best(cpu['ceil']):.1f}",
             f"{tr / tc:.2f}x", "1.00"]]
    C.print_table(f"Embedder throughput, mixed corpus of {n} items ({args.size}, {emb.device}, best of "
                  f"{args.repeats}; max |vector diff| vs baseline {diff:.1e})",
                  ["path", "items/s", "process CPU s", "vs baseline", "fraction of ceiling"], rows)
    emb.close()


if __name__ == "__main__":
    main()
