"""How much of the bare model's speed the real pretraining loop keeps; prints a table, writes JSON.

- real: `mixmae pretrain` through the `deepspeed` launcher on one rank, ZeRO-1, the DALI loader on real
  shards included, its steady images/s as the run reports it (`summary.json`: logging windows after the
  first, which holds the warm-up and any compilation);
- bare: the same model (same `model.compile` resolution), the same AdamW groups, one fixed batch already on
  the device and one fixed mask: forward, backward and optimizer step, nothing else.

The bare step runs before and after the real one (machines drift); the ratio is real / mean(bare).

    python benchmarks/loop_overhead.py                                   # CPU: Swin-B, batch 8, fp32
    python benchmarks/loop_overhead.py --batch 64 --dtype bf16 --shards /data/shards   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _overrides(args) -> list[str]:
    return [f"data.shards={args.shards}", "cluster.num_nodes=1", "cluster.gpus_per_node=1", "zero.stage=1",
            "batch.global_batch=null", "batch.accumulation=1", f"batch.micro={args.batch}",
            f"precision.dtype={args.dtype}", f"model.compile={args.compile}", f"logging.every_steps={args.every}",
            "logging.visualize_every_steps=0", "logging.heldout_batches=1", "logging.tensorboard=false",
            "checkpoint.at_end=false", "checkpoint.every_steps=1000000", "model.checkpoint_every=0",
            *args.set]


def real_step(args, port: int = 29650) -> dict:
    """The real loop: images/s from the run's own summary."""
    launcher = Path(sys.executable).parent / "deepspeed"
    launcher_cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [*launcher_cmd, "--num_gpus", "1", "--master_port", str(port), "--module", "mixmae_scale.cli",
               "pretrain", "--profile", args.profile, "--run-dir", str(run_dir), "--max-steps", str(args.steps),
               "--set", *_overrides(args)]
        env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            raise RuntimeError(f"mixmae pretrain failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
    return {"variant": "real_loop", "images_per_s": summary["images_per_s"], "steps": summary["steps"],
            "dtype": summary["dtype"], "wall_s": time.perf_counter() - start}


def bare_step(args) -> dict:
    """A fresh process, so both sides start alike: the bare model step's images/s (after warm-up)."""
    spec = json.dumps(vars(args), default=str)
    proc = subprocess.run([sys.executable, __file__, "--bare-worker", spec], capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
    if proc.returncode:
        raise RuntimeError(f"bare step failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bare_worker(spec: dict) -> dict:
    from mixmae_scale.config import load_resolved
    from mixmae_scale.data.loaders import loader_dtype
    from mixmae_scale.engine.distributed import autocast
    from mixmae_scale.engine.optimizer import build_optimizer
    from mixmae_scale.models.mixmae import build_mixmae
    from mixmae_scale.models.regional_compile import maybe_compile

    args = argparse.Namespace(**spec)
    resolved = load_resolved(args.profile, overrides=_overrides(args), world_size=1)
    config, derived = resolved.config, resolved.derived
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as the real run does (engine/distributed.py)
    torch.manual_seed(0)
    model = build_mixmae(config.model).to(device).train()
    compiled = maybe_compile(model, derived.compile, device)
    optimizer = build_optimizer(model, config.optim, derived.learning_rate)
    size = config.model.img_size
    images = torch.randn(args.batch, 3, size, size, device=device).to(getattr(torch, loader_dtype(derived.dtype)))
    mask = model.sample_mask(torch.Generator(device).manual_seed(0), device)

    def step() -> None:
        with autocast(device, derived.dtype):
            loss = model(images, mask=mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps - args.warmup):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"variant": "bare_step", "images_per_s": args.batch / median, "step_s": median, "repeats": len(times),
            "dtype": derived.dtype, "compiled_blocks": compiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="swin_b")
    parser.add_argument("--shards", default=str(REPO / "demo_data" / "shards"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "auto"])
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--steps", type=int, default=9, help="optimizer steps per side")
    parser.add_argument("--every", type=int, default=3, help="the real run's logging window (the first is dropped)")
    parser.add_argument("--warmup", type=int, default=3, help="bare steps not timed")
    parser.add_argument("--set", nargs="*", default=[], help="more overrides for both sides")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--bare-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        print(json.dumps(bare_worker(json.loads(args.bare_worker))))
        return
    rows = [bare_step(args), real_step(args), bare_step(args)]
    bare = statistics.mean(r["images_per_s"] for r in rows if r["variant"] == "bare_step")
    ratio = rows[1]["images_per_s"] / bare
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{'variant':<12}{'images/s':>10}")
    for row in rows:
        print(f"{row['variant']:<12}{row['images_per_s']:>10.2f}")
    print(f"real loop / bare step: {ratio:.3f}  ({args.profile}, batch {args.batch}, {rows[1]['dtype']}, "
          f"compile {args.compile}, {device})")
    result = {"machine": {"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                          "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "settings": {k: v for k, v in vars(args).items() if k != "bare_worker"}, "rows": rows,
              "loop_over_bare": ratio}
    out = args.out or RESULTS / f"loop_overhead_{device}_{rows[1]['dtype']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from mixmae_scale.atomic_file import write_text

    write_text(out, json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
