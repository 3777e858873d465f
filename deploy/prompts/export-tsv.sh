#!/usr/bin/env bash
# Regenerates deploy/prompts/prompts.tsv from the prompt catalogue (src/prompts.rs).
# Run after changing a prompt text, then run generate.sh to re-record the affected prompts.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
rustc --edition 2021 -O -o "$tmp/export_tsv" "$here/export_tsv.rs"
"$tmp/export_tsv" > "$here/prompts.tsv"
echo "wrote $here/prompts.tsv ($(($(wc -l < "$here/prompts.tsv"))) prompts)"
