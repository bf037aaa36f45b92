#!/usr/bin/env bash
# Tests the lower bounds of pyproject.toml: a fresh virtual environment on the oldest Python it admits, every
# dependency at exactly its lower bound (base, the EXTRA's DALI build, the dev tools; this checkout installed
# editable), then the unit tests and tests/integration/test_wheel.py (the wheel built, installed, and 2
# pretraining steps on 2 CPU ranks through DeepSpeed's launcher) in it. Result, with date and versions:
# benchmarks/results/lower_bounds.json. Not in CI: it downloads about 4 GB (torch with its CUDA 12 libraries)
# and took 27 and 49 minutes on this project's busy 2-core machine.
#   bash benchmarks/lower_bounds.sh                          # Python 3.10, DALI's CUDA 12 build (cuda12 extra)
#   PYTHON=python3.11 EXTRA=cuda13 bash benchmarks/lower_bounds.sh   # writes lower_bounds_cuda13_py3.11.json
# Needs python3 >= 3.11 on PATH to read pyproject.toml (tomllib) and about 12 GB free under TMPDIR; the
# environment is removed afterwards (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.10}
EXTRA=${EXTRA:-cuda12}
SCRATCH=$(mktemp -d)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$SCRATCH"' EXIT
start=$(date +%s)

"$PY" -m venv "$SCRATCH/venv"
VPY="$SCRATCH/venv/bin/python"
# The lower bounds as exact pins, read from pyproject.toml; a requirement without one stops the run.
python3 - "$EXTRA" > "$SCRATCH/lower_bounds.txt" <<'EOF'
import re
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for text in project["dependencies"] + extras[sys.argv[1]] + extras["dev"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", text)
    if not match:
        sys.exit(f"pyproject.toml: '{text}' has no lower bound to test")
    print(f"{match[1]}=={match[2]}")
EOF
echo "[lower-bounds] installing, with these pins:"; sed 's/^/  /' "$SCRATCH/lower_bounds.txt"
# pip's warnings about this machine's file:// index locations are noise; pip's exit status still counts.
"$VPY" -m pip install -q --upgrade "pip>=23" "setuptools>=77" wheel 2> >(grep -v "is ignored: it is neither" >&2)
"$VPY" -m pip install -q -c "$SCRATCH/lower_bounds.txt" -e ".[$EXTRA,dev]" 2> >(grep -v "is ignored: it is neither" >&2)
"$VPY" -m pip check
installed=$(date +%s)

echo "[lower-bounds] unit tests and the wheel test at the lower bounds"
set +e
OMP_NUM_THREADS=1 "$VPY" -m pytest -q -p no:cacheprovider tests/unit tests/integration/test_wheel.py 2>&1 \
  | tee "$SCRATCH/pytest.log"
status=${PIPESTATUS[0]}
set -e

"$VPY" - "$SCRATCH" "$EXTRA" "$status" "$start" "$installed" <<'EOF'
import datetime
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

scratch, extra, status, start, installed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5])
pins = [line.split("==") for line in (scratch / "lower_bounds.txt").read_text().split()]
summary = [line for line in (scratch / "pytest.log").read_text().splitlines() if " in " in line and
           ("passed" in line or "failed" in line)]
result = {
    "what": f"pyproject.toml's lower bounds, on Python {platform.python_version()}: the unit tests and "
            "tests/integration/test_wheel.py in a fresh venv with every dependency at its lower bound "
            f"(extras {extra},dev)",
    "script": "benchmarks/lower_bounds.sh",
    "date": datetime.date.today().isoformat(),
    "python": platform.python_version(),
    "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, no GPU",
    "lower_bounds": {name: version for name, version in pins},
    "installed": {name: metadata.version(name) for name, _ in pins},
    "pytest_exit_status": status,
    "pytest_summary": summary[-1].strip("= ") if summary else None,
    "install_s": installed - start,
    "tests_s": round(time.time()) - installed,
}
mismatch = {n: (v, result["installed"][n]) for n, v in result["lower_bounds"].items() if result["installed"][n] != v}
if mismatch:
    sys.exit(f"installed versions differ from the lower bounds: {mismatch}")
python = ".".join(platform.python_version_tuple()[:2])
name = "lower_bounds" + ("" if (extra, python) == ("cuda12", "3.10") else f"_{extra}_py{python}")
out = Path("benchmarks/results") / f"{name}.json"
out.write_text(json.dumps(result, indent=2) + "\n")
print(f"[lower-bounds] {result['pytest_summary']}; wrote {out}")
EOF
exit "$status"
