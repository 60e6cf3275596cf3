#!/usr/bin/env bash
# Open the real desktop app under Xvfb with the default model, generate once, and save a
# screenshot of each panel into app/screenshots/ (the README shows them).
# Needs: Xvfb, xdotool, ImageMagick (`apt-get install xvfb xdotool imagemagick`), a release build.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=app/screenshots
mkdir -p "$out"
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
display=:97
Xvfb $display -screen 0 1100x760x24 >/dev/null 2>&1 &
xvfb=$!
trap 'kill $app $xvfb 2>/dev/null || true' EXIT
sleep 1
DISPLAY=$display target/release/codelsi --model default &
app=$!
# The window opens on the Generate tab once the model is loaded; tabs sit at the top left.
sleep "${LOAD_SECONDS:-25}"
DISPLAY=$display xdotool mousemove 50 205 click 1   # "Generate code"
sleep "${GENERATE_SECONDS:-40}"
DISPLAY=$display import -window root "$out/generate.png"
DISPLAY=$display xdotool mousemove 108 12 click 1   # "Model" tab
sleep 2
DISPLAY=$display import -window root "$out/model.png"
echo "saved $out/generate.png $out/model.png"
