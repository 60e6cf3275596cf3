"""How far llama.cpp's CPU backend is from the golden fixtures (transformers, f32) on the same
GGUF: the yardstick for the CPU path's tolerance in `tests/golden.rs` (both quantise
activations to 8 bits for their integer products).

    python3 tests/scripts/llama_cpp_logit_diff.py --gguf MODEL.gguf --fixture tests/fixtures/X.json

Needs `llama-cpp-python` (a bench venv, never the product). Feeds each case's prompt ids and the
reference's greedy tokens, and prints the worst |logit difference| at the reference's top-5 ids
and the steps where llama.cpp's top-1 differs from the reference's.
"""

import argparse
import json

import llama_cpp
import numpy as np
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    golden = json.load(open(args.fixture))
    llm = Llama(model_path=args.gguf, n_ctx=2048, n_threads=args.threads, verbose=False)
    worst, flips = 0.0, []
    for ci, case in enumerate(golden["cases"]):
        llm.reset()
        llm.eval(case["prompt_ids"])
        for step, want in enumerate(case["tokens"]):
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()
            ours = logits[case["top_ids"][step]]
            worst = max(worst, float(np.abs(ours - np.array(case["top_logits"][step])).max()))
            if int(logits.argmax()) != want:
                flips.append((ci, step))
            llm.eval([want])
    print(json.dumps({"worst_abs_diff": worst, "top1_differs_at": flips}))


if __name__ == "__main__":
    main()
