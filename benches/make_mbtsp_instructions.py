"""TypeScript instruction data from MBXP's MBTSP (CC BY 4.0, shipped as engine/suites/mbpp-ts.jsonl) for the
training run and the training benchmark. HumanEval-TS is never used here (it is the held-out
benchmark of the evaluation issue).

MBPP's own split is kept: train = tasks 601-974, validation = 511-600 (the test tasks 11-510
and the few-shot tasks 1-10 stay out), so `codelsi eval --suite mbpp-ts` on tasks 11-510 is
held out too. Each record is a chat turn in the form `codelsi eval --chat` asks and reads: the
user message is the evaluation's request (engine/src/eval/mod.rs `chat_request`: the prompt in a
code block), the reply is the function from its signature on (the prompt's last line and the
canonical solution) in one code block: the doc comment is not repeated, so replies are short, and
`completion_from_chat` takes what follows the signature.

Most of MBTSP's canonical solutions fail their own tests in codelsi's harness (591 of 967),
and some of those are nonsense. The script also writes them as completions
(`mbtsp-canonical.jsonl`) for `codelsi eval --completions`; run again with `--passing` and that
run's `results.jsonl`, only the solutions that passed are kept:

    python3 benches/make_mbtsp_instructions.py engine/suites/mbpp-ts.jsonl data
    codelsi eval --suite mbpp-ts --completions data/mbtsp-canonical.jsonl --out data/canonical
    python3 benches/make_mbtsp_instructions.py engine/suites/mbpp-ts.jsonl data \
        --passing data/canonical/results.jsonl
"""

import argparse
import json
import os


def chat_request(prompt, lang="typescript"):
    # Keep in step with `chat_request` in engine/src/eval/mod.rs.
    return (f"Complete the following {lang} function. Reply with the whole function in one code "
            f"block.\n\n```{lang}\n{prompt}```")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="mbtsp_release_v1.2.jsonl")
    ap.add_argument("out", help="folder for mbtsp-{train,val,canonical}.jsonl")
    ap.add_argument("--passing", help="results.jsonl of scoring mbtsp-canonical.jsonl")
    args = ap.parse_args()
    passing = None
    if args.passing:
        with open(args.passing) as fh:
            results = [json.loads(line) for line in fh if line.strip()]
        passing = {r["task_id"] for r in results if r["status"] == "passed"}
    os.makedirs(args.out, exist_ok=True)
    splits = {"train": [], "val": []}
    canonical = []
    for line in open(args.src):
        p = json.loads(line)
        if not p.get("canonical_solution"):
            continue
        canonical.append({"task_id": p["task_id"], "completion": p["canonical_solution"]})
        n = int(p["task_id"].split("/")[1])
        split = "train" if 601 <= n <= 974 else "val" if 511 <= n <= 600 else None
        if split is None or (passing is not None and p["task_id"] not in passing):
            continue
        signature = p["prompt"].rstrip().splitlines()[-1]
        function = signature + "\n" + p["canonical_solution"].strip("\n")
        splits[split].append({"messages": [
            {"role": "user", "content": chat_request(p["prompt"])},
            {"role": "assistant", "content": f"```typescript\n{function}\n```"},
        ]})
    for name, recs in splits.items():
        with open(os.path.join(args.out, f"mbtsp-{name}.jsonl"), "w") as fh:
            for r in recs:
                fh.write(json.dumps(r) + "\n")
        print(name, len(recs))
    with open(os.path.join(args.out, "mbtsp-canonical.jsonl"), "w") as fh:
        for c in canonical:
            fh.write(json.dumps(c) + "\n")


if __name__ == "__main__":
    main()
