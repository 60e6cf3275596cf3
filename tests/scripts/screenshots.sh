#!/usr/bin/env bash
# Open the real desktop app under Xvfb with the default model and save a screenshot of each
# panel into app/screenshots/ (the README shows them). A scratch workspace gets a dataset
# (the import fixture) and a short adapter from the command line first; the app finds both.
# Needs: Xvfb, xdotool, ImageMagick (`apt-get install xvfb xdotool imagemagick`), a release build.
# Clicks are at fixed places of the 1100×760 window; re-measure them if the layout changes.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=app/screenshots
mkdir -p "$out"
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
ws=$(mktemp -d)
export CODELSI_HOME=$ws
# A fresh settings store, so the window shows what a new user sees.
export XDG_DATA_HOME=$ws/xdg-data
bin=target/release/codelsi
$bin import tests/fixtures/import_repo --out "$ws/datasets/my-repo" >/dev/null
$bin train --data "$ws/datasets/my-repo" --out "$ws/adapters/my-repo-cli" \
    --max-steps 2 --max-len 128 --batch 1 --rank 8 --alpha 16 >/dev/null 2>&1
# Settings small enough for a CPU: training rows of 128 tokens, 3 problems of 64 tokens.
mkdir -p "$XDG_DATA_HOME/codelsi"
# The Train tab's data is the imported dataset (a click on "Train on it" lands wherever the
# dataset's path ends).
cat > "$XDG_DATA_HOME/codelsi/app.ron" <<RON
{
    "app": "(train_data:Some(\"$ws/datasets/my-repo\"),train:(rank:8,alpha:16.0,dropout:0.05,targets:\"attn\",lr:0.0003,epochs:1,max_len:128,batch:1,eval_every:2,grad_checkpoint:false,seed:42),eval:(suite:0,limit:3,max_tokens:64))",
}
RON

display=:97
Xvfb $display -screen 0 1100x760x24 >/dev/null 2>&1 &
xvfb=$!
trap 'kill $app $xvfb 2>/dev/null || true; rm -rf "$ws"' EXIT
sleep 1
DISPLAY=$display $bin --model default &
app=$!
click() { DISPLAY=$display xdotool mousemove "$1" "$2" click 1 mousemove 700 700; sleep "${3:-2}"; }
shot() { DISPLAY=$display import -window root "$out/$1.png"; }
# Tabs along the top: Model 108, Data 156, Train 200, Generate 257, Evaluate 325, Adapters 392.
sleep "${LOAD_SECONDS:-30}"            # the window opens on Generate once the model is loaded
click 50 205 "${GENERATE_SECONDS:-60}" # "Generate code"
shot generate
click 108 12; shot model
click 156 12
click 90 155                           # the dataset under "Recent datasets"
click 200 584                          # a pair (word_counts)
shot data
click 200 12                           # the Train tab
click 49 216 "${TRAIN_SECONDS:-240}"   # "Start training"
shot train
click 123 216 20                       # "Cancel"
click 325 12
click 23 130 "${EVAL_SECONDS:-240}"    # "Run"
click 177 253                          # the first problem's result
shot evaluate
click 392 12; shot adapters
echo "saved $out/{model,data,train,generate,evaluate,adapters}.png"
