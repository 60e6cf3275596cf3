"""Baseline for `codelsi-bench model`: HF transformers generating with the same GGUF.

    python3 benches/transformers_baseline.py --gguf ~/.cache/codelsi/models/SmolLM2-135M-Instruct.Q4_1.gguf [--device cuda]

transformers dequantises the GGUF to f32 (weights are then 4-8x larger than ours in memory).
Prints prefill tokens/s (128-token prompt, as the Rust bench) and greedy decode tokens/s with the
KV cache. Needs torch, transformers, gguf, accelerate.
"""

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    d, f = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).to(args.device).eval()
    ids = tok.encode("export function parse(input: string): Token[] { const out = []; " * 8)[:128]
    x = torch.tensor([ids], device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        model.generate(x, max_new_tokens=4, do_sample=False)  # warm-up
        sync()
        t = time.perf_counter()
        model(x)
        sync()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(x, max_new_tokens=args.steps + 1, min_new_tokens=args.steps + 1, do_sample=False)
        sync()
        total = time.perf_counter() - t
    decode = total - prefill
    print(f"transformers {torch.__version__} on {args.device} ({torch.get_num_threads()} threads): "
          f"prefill {len(ids)} tokens {len(ids) / prefill:.1f} tok/s; decode {args.steps / decode:.2f} tok/s")


if __name__ == "__main__":
    main()
