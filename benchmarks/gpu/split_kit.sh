#!/usr/bin/env bash
# Splits KIT/wheels/ into pieces of at most PIECE bytes (default 45M: one piece plus the working tree fit
# the 64 MiB a device call carries), each in its own folder KIT/part-NN/ with its checksum and the
# number of pieces, then removes KIT/wheels/. install_wheels.sh joins them.
#   bash benchmarks/gpu/split_kit.sh .gpu_kit
set -euo pipefail
KIT=${1:?usage: split_kit.sh KIT_FOLDER}
PIECE=${PIECE:-45M}
[ -d "$KIT/wheels" ] || { echo "split_kit: no $KIT/wheels folder" >&2; exit 1; }
rm -rf "$KIT"/part-* "$KIT"/piece-*
tar -cf - -C "$KIT" wheels | split -b "$PIECE" -d -a 2 - "$KIT/piece-"
count=$(ls "$KIT"/piece-* | wc -l)
for piece in "$KIT"/piece-*; do
  part="$KIT/part-${piece##*-}"
  mkdir -p "$part" && mv "$piece" "$part/piece"
  # Each piece travels alone: it carries its own checksum and the number of pieces in the kit.
  (cd "$part" && sha256sum piece > piece.sha256 && echo "$count" > pieces)
done
rm -rf "$KIT/wheels"
pieces=pieces; [ "$count" -eq 1 ] && pieces=piece
echo "kit: $count $pieces of <= $PIECE in $KIT/part-NN (carry one per call)"
