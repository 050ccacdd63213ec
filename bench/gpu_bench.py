"""GPU benchmark: the real 2B architecture (random weights) in bf16, ours vs the official way.

    bash bench/gpu_bench.sh                      # on a device machine (see that script)
    .venv/bin/python bench/gpu_bench.py --dry-run  # tiny checkpoint on CPU, a few items: checks the code paths

Embedder, per workload (short texts, long texts, images at several resolutions, a mix):
  - baseline: the official process() over fixed batches of 16 in input order, serial
    preprocessing (bench/reference.py);
  - ours: Qwen3VLEmbedder.process (token-budget batches of length-sorted windows, preparation
    in a thread pool overlapped with the GPU, pinned memory and non-blocking copies);
  - forward only: the model on our batches, prepared, collated and already on the GPU.
  Reported: items/s, visual tokens/s (image/video placeholder tokens in the LLM sequence),
  text tokens/s (all other tokens), and the estimated fraction of the bf16 peak:
  FLOPs ~= 2 x (LLM parameters without the embedding table) x LLM tokens
         + 2 x (vision tower parameters) x vision patches          (attention FLOPs ignored),
  divided by time and by --peak-tflops (989: H100 SXM dense bf16; H200 has the same tensor cores).
Reranker, top-100 candidates for one query: ours (batched, shared prefix computed once),
ours without prefix reuse, and one pair at a time (official): latency and max |score diff|.
Repeat each attention implementation given (sdpa; flash_attention_2 too when flash_attn imports).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import _common as C  # noqa: E402  (sets sys.path)

import torch  # noqa: E402

from bench.reference import reference_embed_all, reference_rerank  # noqa: E402
from operators.qwen3vl import Qwen3VLEmbedder, Qwen3VLReranker  # noqa: E402
from operators.qwen3vl.preprocess import collate, token_budget_batches  # noqa: E402

RESOLUTIONS = ((256, 256), (512, 512), (1024, 768), (1600, 1200))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def workloads(root: Path, n: int, seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {
        "text, 8-30 words": [{"text": C.sentence(rng, rng.randint(8, 30))} for _ in range(n)],
        "text, 300-500 words": [{"text": C.sentence(rng, rng.randint(300, 500))} for _ in range(n)],
    }
    for w, h in RESOLUTIONS:
        k = n if w * h <= 1024 * 768 else max(2, n // 2)
        out[f"image {w}x{h}"] = [{"image": p} for p in C.write_images(root / f"{w}x{h}", [(w, h)] * k, seed=w)]
    mixed = [x for items in out.values() for x in items[: max(1, n // 6)]]
    rng.shuffle(mixed)
    out["mixed (all of the above, shuffled)"] = mixed
    return out


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(LLM parameters without the embedding table, vision tower parameters)."""
    llm = vis = 0
    for name, p in model.named_parameters():
        if ".visual." in f".{name}":
            vis += p.numel()
        elif "language_model" in name and "embed_tokens" not in name:
            llm += p.numel()
    return llm, vis


def bench_embedder(ckpt: str, attn: str, device: str, dtype: str, items_by_workload: dict[str, list[dict]],
                   peak_flops: float, batch_size: int) -> list[dict[str, Any]]:
    emb = Qwen3VLEmbedder(ckpt, device=device, dtype=dtype, attn_implementation=attn)
    p_llm, p_vis = param_counts(emb.model)
    print(f"# embedder {ckpt}: {p_llm / 1e9:.3f}B LLM (non-embedding) + {p_vis / 1e9:.3f}B vision parameters, "
          f"attn {attn}, {emb.dtype}, {emb.device}", flush=True)
    pad_id = emb.processor.tokenizer.pad_token_id
    image_id = emb.model.config.image_token_id
    video_id = emb.model.config.video_token_id
    rows = []
    for name, items in items_by_workload.items():
        prepared = [emb.prepare(x) for x in items]
        llm_tokens = sum(p.num_tokens for p in prepared)
        visual = sum(sum(1 for t in p.input_ids if t in (image_id, video_id)) for p in prepared)
        patches = sum(p.num_patches for p in prepared)
        flops = 2.0 * p_llm * llm_tokens + 2.0 * p_vis * patches
        lengths = [p.num_tokens for p in prepared]
        batches = [{k: v.to(emb.device) for k, v in collate([prepared[i] for i in b], pad_id, "right").items()}
                   for b in token_budget_batches(lengths, emb.token_budget, emb.max_batch_items)]

        @torch.inference_mode()
        def forward_only() -> None:
            for b in batches:
                hidden = emb.model(**b).last_hidden_state
                hidden[torch.arange(hidden.shape[0], device=hidden.device), b["attention_mask"].sum(1) - 1].float()

        # Warm-up (kernels, allocator, cuDNN/cuBLAS heuristics) on every path.
        reference_embed_all(emb, items[:4], batch_size)
        emb.process(items[:4])
        forward_only()
        t_ref, ref = timed(lambda: reference_embed_all(emb, items, batch_size))
        t_ours, ours = timed(lambda: emb.process(items))
        t_fwd, _ = timed(forward_only)
        diff = (ours - ref).abs().max().item()
        n = len(items)
        row = {"attn": attn, "workload": name, "items": n, "llm_tokens": llm_tokens, "visual_tokens": visual,
               "patches": patches, "baseline_s": t_ref, "ours_s": t_ours, "forward_only_s": t_fwd,
               "baseline_items_s": n / t_ref, "ours_items_s": n / t_ours, "speedup": t_ref / t_ours,
               "ours_visual_tok_s": visual / t_ours, "ours_text_tok_s": (llm_tokens - visual) / t_ours,
               "baseline_visual_tok_s": visual / t_ref, "baseline_text_tok_s": (llm_tokens - visual) / t_ref,
               "peak_fraction_ours": flops / t_ours / peak_flops, "peak_fraction_forward": flops / t_fwd / peak_flops,
               "peak_fraction_baseline": flops / t_ref / peak_flops, "max_abs_vector_diff": diff}
        rows.append(row)
        print(f"# {attn} | {name}: baseline {t_ref:.2f}s, ours {t_ours:.2f}s ({row['speedup']:.2f}x), forward only "
              f"{t_fwd:.2f}s; {row['peak_fraction_ours']:.1%} of peak (forward only "
              f"{row['peak_fraction_forward']:.1%}); max |diff| {diff:.1e}", flush=True)
        del batches
    emb.close()
    del emb
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def bench_reranker(ckpt: str, attn: str, device: str, dtype: str, root: Path, n: int,
                   repeats: int) -> list[dict[str, Any]]:
    rr = Qwen3VLReranker(ckpt, device=device, dtype=dtype, attn_implementation=attn)
    rng = random.Random(1)
    images = C.write_images(root / "rerank", [(512, 512)] * n, seed=7)
    query_image = C.write_images(root / "rerank_q", [(896, 672)], seed=8)[0]
    text_query = {"text": C.sentence(rng, 12)}
    scenarios = {
        f"text query, {n} passages (60-250 words)": (
            text_query, [{"text": C.sentence(rng, rng.randint(60, 250))} for _ in range(n)]),
        f"image query, {n} captions (8-40 words)": ({"image": query_image},
                                                   [{"text": C.sentence(rng, rng.randint(8, 40))} for _ in range(n)]),
        f"text query, {n} images 512x512": (text_query, [{"image": p} for p in images]),
    }
    rows = []
    for name, (query, docs) in scenarios.items():
        reference_rerank(rr, query, docs[:2])
        rr.score(query, docs[:4])
        t_ref, ref = timed(lambda: reference_rerank(rr, query, docs))
        t_ours, t_plain, diff = [], [], 0.0
        for _ in range(repeats):
            rr.prefix_cache = True
            t, ours = timed(lambda: rr.score(query, docs))
            t_ours.append(t)
            prefix = rr.last_prefix_length
            rr.prefix_cache = False
            t, plain = timed(lambda: rr.score(query, docs))
            t_plain.append(t)
            rr.prefix_cache = True
            diff = max(diff, max(abs(a.score - b) for a, b in zip(ours, ref)),
                       max(abs(a.score - b) for a, b in zip(plain, ref)))
        to, tp = C.median(t_ours), C.median(t_plain)
        rows.append({"attn": attn, "scenario": name, "candidates": n, "prefix_tokens": prefix, "one_at_a_time_s": t_ref,
                     "batched_no_prefix_s": tp, "ours_s": to, "speedup": t_ref / to, "max_abs_score_diff": diff})
        print(f"# {attn} | rerank {name}: one at a time {t_ref:.2f}s, batched {tp:.3f}s, ours {to:.3f}s "
              f"({t_ref / to:.1f}x), max |diff| {diff:.1e}", flush=True)
    rr.close()
    del rr
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2b", choices=("tiny", "small", "2b", "8b"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attn", default="auto",
                    help="comma-separated attention implementations; auto = sdpa, plus flash_attention_2 if importable")
    ap.add_argument("--items", type=int, default=96, help="items per embedder workload")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of our reranker timings (median)")
    ap.add_argument("--batch-size", type=int, default=16, help="the baseline's fixed batch size")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100 SXM: 989)")
    ap.add_argument("--ckpt-dir", default=None, help="where to build/find the checkpoints (default: temp dir)")
    ap.add_argument("--skip-reranker", action="store_true")
    ap.add_argument("--skip-embedder", action="store_true")
    ap.add_argument("--out", default=None, help="write all figures as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="tiny checkpoint on CPU, a few items: checks the code paths")
    args = ap.parse_args()

    if args.dry_run:
        args.size, args.dtype, device = "tiny", "float32", "cpu"
        args.items, args.candidates, args.repeats = 4, 6, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: use --dry-run to check this script on CPU")
        device = "cuda"
    attns = ["sdpa"]
    if args.attn == "auto":
        try:
            import flash_attn  # noqa: F401

            attns.append("flash_attention_2")
        except ImportError:
            pass
    else:
        attns = [a.strip() for a in args.attn.split(",") if a.strip()]

    import transformers

    print("#", C.machine())
    if transformers.__version__ != "4.57.3":
        print(f"# WARNING: transformers {transformers.__version__}, the project pins 4.57.3 (carry its wheel)")
    ckpt_root = Path(args.ckpt_dir) if args.ckpt_dir else Path(tempfile.gettempdir())
    save_dtype = "bfloat16" if args.dtype in ("bfloat16", "bf16") else "float32"
    t0 = time.perf_counter()
    ckpt_e = C.checkpoint("embedding", args.size, str(ckpt_root / f"qvl-embedding-{args.size}"), save_dtype, device)
    ckpt_r = C.checkpoint("reranker", args.size, str(ckpt_root / f"qvl-reranker-{args.size}"), save_dtype, device)
    print(f"# checkpoints ready in {time.perf_counter() - t0:.0f}s", flush=True)
    peak = args.peak_tflops * 1e12
    results: dict[str, Any] = {"machine": C.machine(), "args": vars(args), "embedder": [], "reranker": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.skip_embedder:
            items = workloads(root, args.items)
            for attn in attns:
                results["embedder"] += bench_embedder(ckpt_e, attn, device, args.dtype, items, peak, args.batch_size)
        if not args.skip_reranker:
            for attn in attns:
                results["reranker"] += bench_reranker(ckpt_r, attn, device, args.dtype, root, args.candidates,
                                                      args.repeats)
    if results["embedder"]:
        C.print_table(f"Embedder on {device} ({args.size}, {args.dtype}); peak {args.peak_tflops:g} TFLOP/s",
                      ["attn", "workload", "items", "baseline items/s", "ours items/s", "ours vs baseline",
                       "ours visual tok/s", "ours text tok/s", "baseline visual tok/s", "baseline text tok/s",
                       "ours % of peak", "forward-only % of peak"],
                      [[r["attn"], r["workload"], r["items"], f"{r['baseline_items_s']:.1f}",
                        f"{r['ours_items_s']:.1f}", f"{r['speedup']:.2f}x", f"{r['ours_visual_tok_s']:.0f}",
                        f"{r['ours_text_tok_s']:.0f}", f"{r['baseline_visual_tok_s']:.0f}",
                        f"{r['baseline_text_tok_s']:.0f}", f"{100 * r['peak_fraction_ours']:.1f}",
                        f"{100 * r['peak_fraction_forward']:.1f}"] for r in results["embedder"]])
    if results["reranker"]:
        C.print_table(f"Reranker top-{args.candidates} on {device} ({args.size}, {args.dtype})",
                      ["attn", "scenario", "shared prefix tokens", "one pair at a time s", "batched, no prefix s",
                       "ours s", "ours vs one at a time", "max |score diff|"],
                      [[r["attn"], r["scenario"], r["prefix_tokens"], f"{r['one_at_a_time_s']:.2f}",
                        f"{r['batched_no_prefix_s']:.3f}", f"{r['ours_s']:.3f}", f"{r['speedup']:.1f}x",
                        f"{r['max_abs_score_diff']:.1e}"] for r in results["reranker"]])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
