#!/usr/bin/env bash
# Splits the real-verifier session's inputs into parts that each fit one device call beside
# the working tree (64 MiB in all, tracked files included): .stage/p1 ... .stage/pN, each
# with one part of assets.tar and its sha256 (see distill_session.sh). The tar holds the
# SmolLM2 GGUF (python -m specattn_jax.fetch), a `gguf` wheel from .whl/, the Gutenberg books
# of SPLITS (default all three; "validation test" for a sweep) and, with DRAFT=folder, an
# exported draft (then the session needs no training to sweep).
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=${GGUF:-$HOME/.cache/specattn/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA:-../shared/data/gutenberg}
SPLITS=${SPLITS:-train validation test}
work=$(mktemp -d)
cp "$GGUF" .whl/gguf-*.whl "$work/"
mkdir -p "$work/gutenberg"
cp "$DATA/MANIFEST.tsv" "$work/gutenberg/"
for split in $SPLITS; do
  awk -F'\t' -v s="$split" 'NR > 1 && $7 == s {print $1}' "$DATA/MANIFEST.tsv" \
    | while read -r book; do cp "$DATA/$book" "$work/gutenberg/"; done
done
tar -cJf "$work/gutenberg.tar.xz" -C "$work" gutenberg
members=("$(basename "$GGUF")" gutenberg.tar.xz "$(basename .whl/gguf-*.whl)")
if [[ -n ${DRAFT:-} ]]; then
  mkdir -p "$work/smollm2-draft" && cp "$DRAFT"/{config.json,model.safetensors,tokenizer*} "$work/smollm2-draft/"
  members+=(smollm2-draft)
fi
tar -cf "$work/assets.tar" -C "$work" "${members[@]}"
(cd "$work" && sha256sum assets.tar > assets.tar.sha256)
# What one call may carry: 64 MiB less the tracked files, less 256 KiB for new small files.
tracked=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
part_bytes=$((64 * 1024 * 1024 - tracked - 256 * 1024))
(cd "$work" && split -b "$part_bytes" -d assets.tar assets.tar.part)
rm -rf .stage && mkdir -p .stage
i=1
for part in "$work"/assets.tar.part*; do
  mkdir -p ".stage/p$i" && mv "$part" ".stage/p$i/" && cp "$work/assets.tar.sha256" ".stage/p$i/"
  i=$((i + 1))
done
echo "assets.tar: $(stat -c %s "$work/assets.tar") bytes in $((i - 1)) parts of <= $part_bytes"
rm -rf "$work"
du -sh .stage/*
