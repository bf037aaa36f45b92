"""How much a fine-tuning run's own evaluations depend on the precision they compute in.

A bf16 run evaluates with its DeepSpeed engine, whose parameters are bf16; `mixmae eval` evaluates in fp32 unless
told otherwise. This exports a run's best (or last) checkpoint and evaluates it on the run's validation split in
three ways, next to what the run's eval.jsonl says for that step: fp32; fp32 weights under bf16 autocast (what
`mixmae eval` would do if it left the weights in fp32); bf16 parameters, buffers kept in fp32 as DeepSpeed's
engine keeps them, under bf16 autocast (`mixmae eval --precision bf16`, the run's own way). One process, this
machine's CPU; prints a table, writes JSON.

    python benchmarks/eval_precision.py --run runs/tiny-finetune --data demo_data/shards
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import yaml

from mixmae_scale.atomic_file import write_text

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a fine-tuning run folder")
    parser.add_argument("--data", required=True, help="the shards it was fine-tuned on")
    parser.add_argument("--last", action="store_true", help="the last checkpoint instead of the best")
    parser.add_argument("--batch", type=int, default=None, help="default: the run's micro-batch")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_precision_demo_cpu.json")
    args = parser.parse_args()

    from mixmae_scale.config.precision import detect_hardware
    from mixmae_scale.data.loader import ShardLoader
    from mixmae_scale.data.loaders import LoaderPlace, eval_spec
    from mixmae_scale.data.manifest import load_split
    from mixmae_scale.engine import distributed
    from mixmae_scale.engine.export import export_run
    from mixmae_scale.engine.runtime import WORLD_OF_ONE
    from mixmae_scale.finetune.evaluate import evaluate, in_precision, load_classifier

    config = yaml.safe_load((args.run / "config.yaml").read_text())
    batch = args.batch or config["derived"]["micro_batch"]
    with tempfile.TemporaryDirectory(prefix="mixmae-eval-precision-") as tmp:
        exported = export_run(args.run, Path(tmp) / "classifier.safetensors", best=not args.last)
        step = int(exported["step"])
        run_row = next(row for row in map(json.loads, (args.run / "eval.jsonl").read_text().splitlines())
                       if row["step"] == step)
        model = load_classifier(exported["out"], args.data, "val")
        os.environ.update(WORLD_OF_ONE)  # one process, its own process group
        _, world, device = distributed.init(0)
        expected = load_split(args.data, "val").samples
        spec = eval_spec(model.encoder.shape.img_size, batch, 2, LoaderPlace(0, world, None))
        loader = ShardLoader(args.data, "val", spec, "dali", 2)
        rows = [{"how": "the run's own evaluation (eval.jsonl)", **run_row}]
        # In this order: the last casts the parameters in place.
        for how, weights, compute in (("fp32 (mixmae eval's default)", "fp32", "fp32"),
                                      ("fp32 weights, bf16 autocast", "fp32", "bf16"),
                                      ("bf16 weights, bf16 autocast (--precision bf16)", "bf16", "bf16")):
            model = in_precision(model, device, weights)
            rows.append({"how": how, **evaluate(model, loader, device, compute, expected)})
        loader.close()
    print(f"run {args.run}, step {step} ({'last' if args.last else 'best'}), {expected} validation images, "
          f"batch {batch}, {detect_hardware('cpu').name} (native bf16: {detect_hardware('cpu').native_bf16})")
    print(f"{'evaluation':50s} {'top-1':>8s} {'top-5':>8s} {'loss':>12s} {'top-1 images vs run':>20s}")
    for row in rows:
        images = round((row["top1"] - run_row["top1"]) * expected / 100)
        print(f"{row['how']:50s} {row['top1']:8.2f} {row['top5']:8.2f} {row['loss']:12.8f} {images:+20d}")
    write_text(args.out, json.dumps({"run": str(args.run), "step": step, "which": "last" if args.last else "best",
                                     "samples": expected, "batch": batch, "run_precision": config["derived"]["dtype"],
                                     "native_bf16": detect_hardware("cpu").native_bf16, "rows": rows}, indent=2)
               + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
