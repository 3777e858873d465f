#!/usr/bin/env bash
# Generates the callgate prompts as synthetic speech, one file per prompt id and language:
#
#   deploy/sounds/<lang>/callgate/<id>.wav    (8 kHz, mono, 16-bit signed PCM: Asterisk plays it as slin)
#
# Texts come from deploy/prompts/prompts.tsv (id<TAB>lang<TAB>text, no header), which export-tsv.sh derives
# from the prompt catalogue in src/prompts.rs. The output is reproducible for a given espeak-ng and sox
# version: fixed voice, rate and pitch, and no dither (sox -D), so an unchanged text gives identical bytes.
#
# Usage: deploy/prompts/generate.sh [OUT_DIR]     (default OUT_DIR: deploy/sounds)
#        deploy/prompts/generate.sh --check [OUT_DIR]   only check that every id x lang has a file
#
# These are placeholders good enough for tests and pilots. For production, replace them with studio
# recordings under the same names (see README, "Prompts").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
table="$here/prompts.tsv"

check_only=false
if [[ "${1:-}" == "--check" ]]; then
    check_only=true
    shift
fi
out="${1:-$here/../sounds}"

# espeak-ng voice per callgate language code. Asterisk looks under sounds/<lang>/, and callgate passes
# its own code (sv, en, nb) as the playback language, so the directories use callgate's codes.
voice_for() {
    case "$1" in
        sv) echo "sv" ;;
        en) echo "en-gb" ;;
        nb) echo "nb" ;;
        *) echo "unknown language code '$1' in $table" >&2; return 1 ;;
    esac
}

if [[ ! -s "$table" ]]; then
    echo "missing or empty $table (run export-tsv.sh)" >&2
    exit 1
fi

if $check_only; then
    missing=0
    while IFS=$'\t' read -r id lang _text; do
        [[ -z "$id" ]] && continue
        f="$out/$lang/callgate/$id.wav"
        if [[ ! -s "$f" ]]; then
            echo "missing: $f" >&2
            missing=$((missing + 1))
        fi
    done < "$table"
    if ((missing > 0)); then
        echo "$missing prompt file(s) missing" >&2
        exit 1
    fi
    echo "all prompts present under $out"
    exit 0
fi

need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need+=(sox)
if ((${#need[@]} > 0)); then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
        echo "installing ${need[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}"
    else
        echo "needs ${need[*]}: install them (Debian/Ubuntu: apt-get install ${need[*]}) and run again" >&2
        exit 1
    fi
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

count=0
while IFS=$'\t' read -r id lang text; do
    [[ -z "$id" ]] && continue
    if [[ ! "$id" =~ ^[a-z0-9-]+$ ]]; then
        echo "bad prompt id '$id' in $table" >&2
        exit 1
    fi
    voice="$(voice_for "$lang")"
    dir="$out/$lang/callgate"
    mkdir -p "$dir"
    # -s words per minute (a little slower than the default, for the phone), -p pitch, -a amplitude.
    espeak-ng -v "$voice" -s 150 -p 45 -a 150 -w "$tmp/raw.wav" -- "$text"
    # Telephone format; -D: no dither (reproducible); norm: peak at -3 dBFS; a short pause at each end.
    sox -D "$tmp/raw.wav" -r 8000 -c 1 -b 16 -e signed-integer "$dir/$id.wav" \
        norm -3 pad 0.1 0.2
    count=$((count + 1))
done < "$table"

echo "generated $count prompt file(s) under $out"
