"""Load test of an OpenAI-compatible server (codelsi serve, llama.cpp's server), loopback only.

    python3 benches/serve_load.py --url http://127.0.0.1:8080 --models base,one,two,one+two \
        --clients 32 --requests 64 [--max-tokens 16,32,64] [--check reference.json] [--save F]

Sends `--requests` streamed greedy completions from `--clients` threads at once, each request a
(model, prompt, max_tokens) from a fixed cycle, and reports: requests complete, time to first
token (p50, p99), and aggregate completion tokens per second over the whole run (a request
counts as complete when its stream ends with a finish reason). With
`--save F` it writes each request's text; with `--check F` it compares each answer with the
text saved for the same request (the reference run: one client, one request at a time).
Standard library only.
"""

import argparse
import json
import statistics
import threading
import time
import urllib.request

PROMPTS = [
    "function add(a: number, b: number): number {",
    "// Return the largest value of a list of numbers.\nfunction largest(",
    "def fibonacci(n):\n    ",
    "const words = text.split(' ').filter(",
    "/** Parse an ISO date string into its year, month and day. */\nexport function parseDate(",
    "SELECT name, COUNT(*) FROM orders",
    "fn main() {\n    let v = vec![3, 1, 2];\n",
    "class Stack<T> {\n  private items: T[] = [];\n",
]


def one_request(url, model, prompt, max_tokens, key):
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + "/v1/completions", data=body, headers=headers)
    start = time.perf_counter()
    first = None
    text = []
    tokens = None
    chunks = 0
    finish = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            msg = json.loads(data)
            if msg.get("usage"):
                tokens = msg["usage"].get("completion_tokens")
            for c in msg.get("choices") or []:
                finish = c.get("finish_reason") or finish
                piece = c.get("text") or ""
                if piece and first is None:
                    first = time.perf_counter() - start
                if piece:
                    chunks += 1
                text.append(piece)
    return {
        "text": "".join(text),
        "ttft": first if first is not None else time.perf_counter() - start,
        "seconds": time.perf_counter() - start,
        # Without usage in the stream, a chunk stands for a token (llama.cpp's server sends one a token).
        "tokens": tokens if tokens is not None else chunks,
        # A stream cut short (a server that interrupts it) ends without one.
        "finish": finish,
    }


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--models", default="base", help="model ids, cycled over the requests")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", default="16,32,64")
    ap.add_argument("--key", default=None)
    ap.add_argument("--save", default=None)
    ap.add_argument("--check", default=None)
    ap.add_argument("--label", default="server")
    args = ap.parse_args()
    models = args.models.split(",")
    lengths = [int(x) for x in args.max_tokens.split(",")]
    work = [
        (models[i % len(models)], PROMPTS[i % len(PROMPTS)], lengths[i % len(lengths)])
        for i in range(args.requests)
    ]
    results = [None] * len(work)
    errors = []
    next_job = [0]
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next_job[0]
                next_job[0] += 1
            if i >= len(work):
                return
            model, prompt, max_tokens = work[i]
            try:
                results[i] = one_request(args.url, model, prompt, max_tokens, args.key)
            except Exception as e:  # a lost request is a finding, not a crash of the bench
                errors.append(f"request {i}: {e}")

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = [r for r in results if r is not None and r["finish"]]
    for i, r in enumerate(results):
        if r is not None and not r["finish"]:
            errors.append(f"request {i}: the stream ended without a finish reason")
    tokens = sum(r["tokens"] for r in done)
    ttft = [r["ttft"] for r in done]
    line = (
        f"{args.label}: {len(done)}/{len(work)} requests complete, {args.clients} clients, "
        f"{tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tok/s; time to first token "
        f"p50 {percentile(ttft, 50):.2f} s, p99 {percentile(ttft, 99):.2f} s"
        if done
        else f"{args.label}: no request completed"
    )
    print(line)
    for e in errors[:5]:
        print("  error:", e)
    if args.save:
        with open(args.save, "w") as f:
            json.dump([r["text"] if r else None for r in results], f)
    if args.check:
        with open(args.check) as f:
            want = json.load(f)
        same = sum(1 for r, w in zip(results, want) if r is not None and r["text"] == w)
        print(f"  {same}/{len(work)} answers equal to the one-at-a-time run's")
        for i, (r, w) in enumerate(zip(results, want)):
            if r is None or r["text"] != w:
                print(f"  request {i} ({work[i][0]}, {work[i][2]} tokens) differs: {r and r['text']!r} vs {w!r}")
                break


if __name__ == "__main__":
    main()
