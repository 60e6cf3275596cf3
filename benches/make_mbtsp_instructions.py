"""TypeScript instruction data from MBXP's MBTSP (CC BY 4.0, ../shared/data/mbtsp) for the
training run and the training benchmark. HumanEval-TS is never used here (it is the held-out
benchmark of the evaluation issue).

MBPP's own split is kept: train = tasks 601-974, validation = 511-600 (the test tasks 11-510
stay out). Each record: the docstring and signature as the instruction, the whole function as
the function's body as the output (Alpaca form), as a completion model would continue it.

    python3 benches/make_mbtsp_instructions.py ../shared/data/mbtsp/mbtsp_release_v1.2.jsonl benches/data
"""

import json
import os
import sys


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    splits = {"train": [], "val": []}
    for line in open(src):
        p = json.loads(line)
        n = int(p["task_id"].split("/")[1])
        split = "train" if 601 <= n <= 974 else "val" if 511 <= n <= 600 else None
        if split is None or not p.get("canonical_solution"):
            continue
        splits[split].append({
            "instruction": "Complete this TypeScript function.",
            "input": p["prompt"].rstrip(),
            "output": p["canonical_solution"].strip("\n"),
        })
    for name, recs in splits.items():
        with open(os.path.join(out, f"mbtsp-{name}.jsonl"), "w") as fh:
            for r in recs:
                fh.write(json.dumps(r) + "\n")
        print(name, len(recs))


if __name__ == "__main__":
    main()
