"""TypeScript instruction data from MBXP's MBTSP (CC BY 4.0, ../shared/data/mbtsp) for the
training run and the training benchmark. HumanEval-TS is never used here (it is the held-out
benchmark of the evaluation issue).

MBPP's own split is kept: train = tasks 601-974, validation = 511-600 (the test tasks 11-510
and the few-shot tasks 1-10 stay out), so `codelsi eval --suite mbpp-ts` on tasks 11-510 is
held out too. Each record is a chat turn in the form `codelsi eval --chat` asks and reads: the
user message is the evaluation's request (engine/src/eval/mod.rs `chat_request`: the prompt in a
code block), the reply is the function from its signature on (the prompt's last line and the
canonical solution) in one code block: the doc comment is not repeated, so replies are short, and
`completion_from_chat` takes what follows the signature.

About a fifth of MBTSP's canonical solutions fail their own tests, and some of those are
nonsense. The script also writes them as completions (`mbtsp-canonical.jsonl`) for
`codelsi eval --completions`; run again with `--passing` and that run's `results.jsonl`, only
the solutions that passed are kept:

    python3 benches/make_mbtsp_instructions.py ../shared/data/mbtsp/mbtsp_release_v1.2.jsonl data
    codelsi eval --suite mbpp-ts --completions data/mbtsp-canonical.jsonl --out data/canonical
    python3 benches/make_mbtsp_instructions.py ../shared/data/mbtsp/mbtsp_release_v1.2.jsonl data \
        --passing data/canonical/results.jsonl
"""

import json
import os
import sys


def chat_request(prompt, lang="typescript"):
    # Keep in step with `chat_request` in engine/src/eval/mod.rs.
    return (f"Complete the following {lang} function. Reply with the whole function in one code "
            f"block.\n\n```{lang}\n{prompt}```")


def main():
    args = sys.argv[1:]
    passing = None
    if "--passing" in args:
        i = args.index("--passing")
        with open(args[i + 1]) as fh:
            results = [json.loads(line) for line in fh if line.strip()]
        passing = {r["task_id"] for r in results if r["status"] == "passed"}
        del args[i:i + 2]
    src, out = args
    os.makedirs(out, exist_ok=True)
    splits = {"train": [], "val": []}
    canonical = []
    for line in open(src):
        p = json.loads(line)
        if p.get("canonical_solution"):
            canonical.append({"task_id": p["task_id"], "completion": p["canonical_solution"]})
        n = int(p["task_id"].split("/")[1])
        split = "train" if 601 <= n <= 974 else "val" if 511 <= n <= 600 else None
        if split is None or not p.get("canonical_solution"):
            continue
        if passing is not None and p["task_id"] not in passing:
            continue
        signature = p["prompt"].rstrip().splitlines()[-1]
        function = signature + "\n" + p["canonical_solution"].strip("\n")
        splits[split].append({"messages": [
            {"role": "user", "content": chat_request(p["prompt"])},
            {"role": "assistant", "content": f"```typescript\n{function}\n```"},
        ]})
    for name, recs in splits.items():
        with open(os.path.join(out, f"mbtsp-{name}.jsonl"), "w") as fh:
            for r in recs:
                fh.write(json.dumps(r) + "\n")
        print(name, len(recs))
    with open(os.path.join(out, "mbtsp-canonical.jsonl"), "w") as fh:
        for c in canonical:
            fh.write(json.dumps(c) + "\n")


if __name__ == "__main__":
    main()
