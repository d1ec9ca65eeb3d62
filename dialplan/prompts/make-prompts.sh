#!/usr/bin/env bash
# Render calmline's default voice prompts from en/prompts.tsv (name<TAB>text)
# into en/calmline/<name>.wav: 8000 Hz, mono, 16-bit signed PCM WAV, the format
# Asterisk's format_wav plays without transcoding.
#
# Usage: make-prompts.sh [OUTDIR]   (default: en/calmline beside this script)
#
# Reproducible: same prompts.tsv and same espeak-ng/sox versions give the same
# bytes (no dither, repeatable mode, no comment chunk).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tsv="$here/en/prompts.tsv"
out="${1:-$here/en/calmline}"

VOICE="en-us"   # espeak-ng voice
SPEED=145       # words per minute: calm, unhurried
PITCH=45        # a little below espeak-ng's default of 50
PAD=0.2         # seconds of silence at each end

need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need+=(sox)
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "make-prompts.sh: missing ${need[*]}; run: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

[[ -r "$tsv" ]] || { echo "make-prompts.sh: cannot read $tsv" >&2; exit 1; }
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

count=0
lineno=0
while IFS=$'\t' read -r name text || [[ -n "$name" ]]; do
    lineno=$((lineno + 1))
    [[ -z "$name" || "$name" == \#* ]] && continue
    if [[ ! "$name" =~ ^[A-Za-z0-9_-]+$ || -z "${text:-}" ]]; then
        echo "make-prompts.sh: $tsv:$lineno: expected name<TAB>text with name [A-Za-z0-9_-]+" >&2
        exit 1
    fi
    espeak-ng -v "$VOICE" -s "$SPEED" -p "$PITCH" --stdout -- "$text" > "$tmp/raw.wav"
    # trim leading/trailing silence, resample, normalise to -3 dBFS, pad both ends
    sox -V1 -D -R "$tmp/raw.wav" --comment "" \
        -t wav -r 8000 -c 1 -b 16 -e signed-integer "$tmp/$name.wav" \
        silence 1 0.02 0.3% reverse silence 1 0.02 0.3% reverse \
        rate -h 8000 norm -3 pad "$PAD" "$PAD"
    mv -f "$tmp/$name.wav" "$out/$name.wav"
    count=$((count + 1))
done < "$tsv"

echo "make-prompts.sh: rendered $count prompts into $out"
