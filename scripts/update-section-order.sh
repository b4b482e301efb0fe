#!/bin/sh
# Regenerates vmm/link/section-order.txt: the functions a trivial run and the README's
# main job execute, first-run order, hashes replaced by a wildcard so that the file
# survives code changes (a function renamed since simply falls back to the default
# placement). Run from the workspace root after `cargo build --release`, then rebuild.
set -eu
bin=target/x86_64-unknown-linux-gnu/release/faultline
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 scripts/trace-functions.py "$bin" -- run > "$tmp/run.txt" 2>/dev/null
python3 scripts/trace-functions.py "$bin" -- run --vcpus 1 -m 256M --steps idle > "$tmp/idle.txt" 2>/dev/null
cat "$tmp/run.txt" "$tmp/idle.txt" | sed 's/17h[0-9a-f]\{16\}E$/17h*E/' | awk '!seen[$0]++ { print ".text." $0; print ".text.unlikely." $0 }' > vmm/link/section-order.txt
wc -l vmm/link/section-order.txt
