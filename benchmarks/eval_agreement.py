"""Whether `mixmae eval --precision auto` gives a run's own last loss under the settings suspected of moving it.

tests/integration/test_finetune.py checks that evaluating a fine-tuned export in the run's precision gives the
loss of the run's last evaluation; once, in a full CI run, the two were 3.0e-6 apart (relative; top-1 and top-5
equal). In bf16 any change of a kernel's fp32 arithmetic can move a rounding to bf16, so each suspect is tried
on the same export in a fresh process: another intra-op thread count (the ranks run with OMP_NUM_THREADS=1),
other batch sizes (other batch compositions and per-batch fp32 loss sums), ATen's vector ISA, oneDNN's ISA
(bf16 without the native instructions), and an fp32 evaluation in the same process first (the test module's
order); and, for scale, the weights left in fp32 under bf16 autocast, which the test should tell apart. Every
row is an evaluation in one process on this machine's CPU (`mixmae eval` but the last); prints a table, writes
JSON.

    python benchmarks/eval_agreement.py --run RUN --data SHARDS --out results/eval_agreement_demo_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from mixmae_scale.atomic_file import write_text

RESULTS = Path(__file__).resolve().parent / "results"

# In a child process: `mixmae eval` in fp32 first, then in the run's precision, as test_finetune.py's module does.
AFTER_FP32 = """
import contextlib, io, json, sys
from mixmae_scale.cli import main
for extra in (["--batch", "16"], sys.argv[3:]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", "--init", sys.argv[1], "--data", sys.argv[2], "--json", *extra]) == 0
print(out.getvalue())
"""

# In a child process: the weights left in fp32 under bf16 autocast, which the test's bound should tell apart.
FP32_WEIGHTS = """
import json, os, sys
import mixmae_scale.finetune.evaluate as evaluation
from mixmae_scale.engine import distributed
from mixmae_scale.engine.runtime import WORLD_OF_ONE
evaluation.in_precision = lambda model, device, precision: model.to(device)  # no cast of the parameters
model = evaluation.load_classifier(sys.argv[1], sys.argv[2], "val")
os.environ.update(WORLD_OF_ONE)
_, world, device = distributed.init(0)
print(json.dumps(evaluation.evaluate_classifier(model, sys.argv[1], sys.argv[2], "val", 0, world, device, "dali", 8,
                                                2, "bf16")))
"""


def evaluation(command: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    text = done.stdout
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def torch_version() -> str:
    import torch

    return torch.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a fine-tuning run folder (its last checkpoint)")
    parser.add_argument("--data", required=True, help="the shards it was fine-tuned on")
    parser.add_argument("--note", default="", help="what the run is, kept in the results file")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_agreement_demo_cpu.json")
    args = parser.parse_args()

    from mixmae_scale.engine.export import export_run

    last = json.loads((args.run / "eval.jsonl").read_text().splitlines()[-1])
    with tempfile.TemporaryDirectory(prefix="mixmae-eval-agreement-") as tmp:
        exported = export_run(args.run, Path(tmp) / "classifier.safetensors")
        if int(exported["step"]) != last["step"]:
            sys.exit(f"{args.run}: its last checkpoint is step {exported['step']}, its last evaluation step "
                     f"{last['step']}")
        cli = [sys.executable, "-m", "mixmae_scale.cli", "eval", "--init", exported["out"], "--data", args.data,
               "--json", "--precision", "auto"]
        settings = [
            ("OMP_NUM_THREADS=1, batch 8 (the test's)", cli + ["--batch", "8"], {}),
            ("OMP_NUM_THREADS=2, batch 8", cli + ["--batch", "8"], {"OMP_NUM_THREADS": "2"}),
            ("batch 16", cli + ["--batch", "16"], {}),
            ("batch 5", cli + ["--batch", "5"], {}),
            ("batch 1", cli + ["--batch", "1"], {}),
            ("ATEN_CPU_CAPABILITY=avx2, batch 8", cli + ["--batch", "8"], {"ATEN_CPU_CAPABILITY": "avx2"}),
            ("ONEDNN_MAX_CPU_ISA=AVX512_CORE (bf16 not native), --precision bf16, batch 8",
             cli[:-1] + ["bf16", "--batch", "8"], {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}),
            ("fp32 weights under bf16 autocast (not the run's way), batch 8",
             [sys.executable, "-c", FP32_WEIGHTS, exported["out"], args.data], {}),
            ("after an fp32 eval in the same process, batch 8",
             [sys.executable, "-c", AFTER_FP32, exported["out"], args.data, "--precision", "auto", "--batch", "8"],
             {}),
        ]
        rows = []
        for how, command, env in settings:
            result = evaluation(command, env)
            rows.append({"how": how, "precision": result["precision"], "batch": result["batch"],
                         "loss": result["loss"], "top1": result["top1"], "top5": result["top5"],
                         "loss_rel_diff": abs(result["loss"] - last["loss"]) / last["loss"],
                         "top1_top5_equal": (result["top1"], result["top5"]) == (last["top1"], last["top5"])})
    print(f"run {args.run}, step {last['step']} ({last['precision']}): loss {last['loss']!r}")
    print(f"{'setting':78s} {'prec':>5s} {'loss':>20s} {'rel. diff':>10s} top-1/5 equal")
    for row in rows:
        print(f"{row['how']:78s} {row['precision']:>5s} {row['loss']!r:>20s} {row['loss_rel_diff']:10.1e} "
              f"{row['top1_top5_equal']}")
    write_text(args.out, json.dumps({"what": __doc__.split("\n\n")[0], "run": str(args.run), "note": args.note,
                                     "command": "python benchmarks/eval_agreement.py " + shlex.join(sys.argv[1:]),
                                     "machine": os.uname().machine, "cpu": cpu_model(), "cpus": os.cpu_count(),
                                     "torch": torch_version(), "run_last": last,
                                     "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
