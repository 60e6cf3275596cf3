"""The llama.cpp anchor of `codelsi-bench cpu-vs-llama`: the same GGUF, the same prompt tokens,
the same threads, on llama.cpp's CPU backend.

    python3 benches/llama_cpp_baseline.py --gguf MODEL.gguf --threads 2 --tokens 1,2,3 --decode 128

Needs `llama-cpp-python` (pip builds llama.cpp from source); install it in a bench venv, never in
the product. Prints one JSON line: prefill tokens/s over the given prompt, and decode tokens/s of
`--decode` greedy steps after it (each step one token through the model with the KV cache).
"""

import argparse
import json
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--tokens", required=True, help="prompt token ids, comma-separated")
    ap.add_argument("--decode", type=int, default=128)
    args = ap.parse_args()
    prompt = [int(t) for t in args.tokens.split(",")]
    llm = Llama(
        model_path=args.gguf,
        n_ctx=len(prompt) + args.decode + 8,
        n_batch=max(512, len(prompt)),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    # Warm-up: one short prompt and a step, so the timed runs find the weights paged in.
    llm.eval(prompt[:16])
    llm.eval([prompt[0]])
    llm.reset()

    t = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t

    t = time.perf_counter()
    for _ in range(args.decode):
        llm.eval([_argmax(llm)])
    decode = time.perf_counter() - t

    print(
        json.dumps(
            {
                "llama_cpp": llama_cpp.__version__,
                "threads": args.threads,
                "prompt_tokens": len(prompt),
                "prefill_tok_s": len(prompt) / prefill,
                "decode_steps": args.decode,
                "decode_tok_s": args.decode / decode,
            }
        )
    )


def _argmax(llm):
    """The greedy next token from the last evaluated position's logits."""
    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).argmax())


if __name__ == "__main__":
    main()
