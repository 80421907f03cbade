#!/usr/bin/env bash
# Splits the real-verifier session's inputs into parts that each fit one device call beside
# the working tree (64 MiB in all): .stage/p1 ... .stage/pN, each with one part of
# assets.tar and its sha256 (see distill_session.sh). Needs the SmolLM2 GGUF
# (python -m specattn_jax.fetch), ../shared/data/gutenberg and a `gguf` wheel in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-4}
GGUF=${GGUF:-$HOME/.cache/specattn/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
work=$(mktemp -d)
cp "$GGUF" .whl/gguf-*.whl "$work/"
tar -cJf "$work/gutenberg.tar.xz" -C "${DATA_PARENT:-../shared/data}" gutenberg
tar -cf "$work/assets.tar" -C "$work" "$(basename "$GGUF")" gutenberg.tar.xz \
  "$(basename .whl/gguf-*.whl)"
(cd "$work" && sha256sum assets.tar > assets.tar.sha256)
size=$(stat -c %s "$work/assets.tar")
(cd "$work" && split -n "$PARTS" -d assets.tar assets.tar.part)
rm -rf .stage && mkdir -p .stage
i=1
for part in "$work"/assets.tar.part*; do
  mkdir -p ".stage/p$i" && mv "$part" ".stage/p$i/" && cp "$work/assets.tar.sha256" ".stage/p$i/"
  i=$((i + 1))
done
rm -rf "$work"
echo "assets.tar: $size bytes in $PARTS parts"; du -sh .stage/*
