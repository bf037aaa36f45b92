#!/usr/bin/env bash
# Joins the kit's pieces (.gpu_kit/part-NN/piece, made by fetch_wheels.sh), checks them and installs every
# wheel offline into TARGET (default /tmp/site), without dependencies: the machine's own torch stays.
#   bash benchmarks/gpu/install_wheels.sh && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=${KIT:-.gpu_kit}
TARGET=${TARGET:-/tmp/site}
PY=${PYTHON:-python3}
parts=("$KIT"/part-*)
[ -d "${parts[0]}" ] || { echo "install_wheels: no pieces under $KIT/part-NN" >&2; exit 1; }
expected=$(cat "${parts[0]}/pieces")
[ "${#parts[@]}" -eq "$expected" ] || { echo "install_wheels: $KIT has ${#parts[@]} of $expected pieces" >&2; exit 1; }
for part in "${parts[@]}"; do
  (cd "$part" && sha256sum --quiet -c piece.sha256) || { echo "install_wheels: $part/piece is damaged" >&2; exit 1; }
done
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cat "$KIT"/part-*/piece | tar -xf - -C "$scratch"
# numpy stays the machine's own: its torch was built against it.
wheels=$(ls "$scratch"/wheels/*.whl | grep -v "/numpy-")
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" $wheels
echo "installed $(echo "$wheels" | wc -l) wheels into $TARGET"
