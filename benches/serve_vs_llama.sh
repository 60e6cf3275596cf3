#!/usr/bin/env bash
# `codelsi serve` and llama.cpp's server (llama-cpp-python[server]) under the same load, one
# after the other in one run, on the same GGUF, threads and machine, loopback only.
#
#   benches/serve_vs_llama.sh MODEL.gguf VENV/bin/python [CLIENTS] [REQUESTS] [THREADS]
#
# VENV holds `pip install 'llama-cpp-python[server]'` (never the product's environment).
# Each server gets one warm-up request, then benches/serve_load.py sends REQUESTS (default 64)
# streamed greedy completions of 16/32/64 tokens from CLIENTS (default 32) threads, on the base
# model (llama.cpp's server has one global set of adapters, so the mixed-adapter load is
# codelsi's alone). codelsi runs with --max-batch CLIENTS; llama.cpp's server answers one request at
# a time (llama-cpp-python's server does not batch), with --interrupt_requests False (by default
# a new request cuts the stream of the one running). Prints one line a server: requests
# complete, aggregate tokens/s, time to first token p50 / p99.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: benches/serve_vs_llama.sh MODEL.gguf VENV/bin/python [CLIENTS] [REQUESTS] [THREADS]}
python=${2:?the python of a venv with llama-cpp-python[server]}
clients=${3:-32}
requests=${4:-64}
cores=$(lscpu -p=core | grep -v '^#' | sort -u | wc -l)
threads=${5:-$cores}
codelsi=${CODELSI:-target/release/codelsi}
port=18080

server=""
stop_server() {
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
        server=""
    fi
}
trap stop_server EXIT

# The first model id the server lists, once it answers (up to 10 minutes for a load).
model_id() {
    python3 - "$port" <<'EOF'
import json, sys, time, urllib.request
for _ in range(1200):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v1/models", timeout=5) as r:
            print(json.load(r)["data"][0]["id"])
            sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit("the server did not come up")
EOF
}

load() {
    local label=$1 id
    id=$(model_id)
    python3 benches/serve_load.py --url "http://127.0.0.1:$port" --models "$id" \
        --clients 1 --requests 1 --max-tokens 8 --label "$label warm-up" >/dev/null
    python3 benches/serve_load.py --url "http://127.0.0.1:$port" --models "$id" \
        --clients "$clients" --requests "$requests" --label "$label"
}

echo "model $model, $threads threads, $clients clients, $requests requests"
"$codelsi" --device cpu --threads "$threads" serve --model "$model" --port "$port" \
    --max-batch "$clients" --max-queue "$((requests + clients))" 2>/dev/null &
server=$!
load "codelsi serve --max-batch $clients"
stop_server

"$python" -m llama_cpp.server --model "$model" --n_threads "$threads" \
    --n_threads_batch "$threads" --n_ctx 2048 --interrupt_requests False --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
server=$!
load "llama.cpp (llama_cpp.server)"
stop_server
