"""GPU proof run: DALI GPU decoding, B/L/H pretraining steps against the planner, an fp16 run, in one go.

Run by `benchmarks/gpu/suite.sh` on a GPU machine after the offline wheel kit is installed. Every part
records its numbers (and its failure, if any, without stopping the others) in one JSON file with the
card and the software versions, and prints a table:

1. DALI decoding of real JPEG shards (ImageNet-like 500x375 images): the pretraining pipeline with
   "mixed" (GPU) decoding against the same pipeline decoding on the CPU (all cores), images/s; the
   evaluation pipeline's tensors from both, mean absolute difference in 0-255 pixel units.
2. Pretraining 30 steps each of B, L and H in bf16 through the real `deepspeed` launcher and `mixmae
   pretrain`, with each profile's ZeRO stage, checkpointing and micro-batch on 1 GPU (accumulation 1):
   images/s, MFU, peak memory, and the planner's figure for the same configuration.
3. B in fp16 with DeepSpeed's dynamic loss scaling, 30 steps: losses finite and falling, the scale.
4. The fast step: `benchmarks/loop_overhead.py` (the real loop against the bare model step, B bf16, batch
   64, compiled blocks) and `benchmarks/model_step.py` (compiled against eager, timm's Swin with our decoder).

    python benchmarks/gpu/proof.py --out benchmarks/results/gpu [--steps 30] [--images 4096]
    python benchmarks/gpu/proof.py --out /tmp/p --cpu-smoke   # the same code paths on a CPU, tiny
    python benchmarks/gpu/proof.py --out /tmp/p --parts loop_overhead model_step   # some parts only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def versions() -> dict:
    import torch

    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
             "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for name in ("nvidia.dali", "deepspeed", "timm"):
        try:
            found[name.split(".")[-1]] = __import__(name, fromlist=["__version__"]).__version__
        except Exception as exc:  # noqa: BLE001 - a missing package is a finding, not a crash
            found[name.split(".")[-1]] = f"unavailable: {exc}"
    return found


def _write_class(args: tuple[Path, str, int, int, int]) -> None:
    from PIL import Image

    from mixmae_scale.shards.demo import draw_image

    folder, wnid, cls, count, seed = args
    rng = random.Random(f"{seed}-{folder.name}-{cls}")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = (500, 375) if rng.random() < 0.7 else (375, 500)
        image = draw_image(cls, rng).resize(size, Image.Resampling.BICUBIC)
        image.save(folder / f"{wnid}_{i:05d}.JPEG", format="JPEG", quality=90)


def make_shards(root: Path, images: int, workers: int) -> Path:
    """Real JPEGs at ImageNet's typical size, in ImageNet layout, converted by the project's converter."""
    from mixmae_scale.shards.convert import ConvertOptions, convert
    from mixmae_scale.shards.demo import CLASSES, wnid

    jobs = []
    for split, total in (("train", images), ("val", max(images // 8, 256))):
        for cls in range(len(CLASSES)):
            jobs.append((root / "images" / split / wnid(cls), wnid(cls), cls, total // len(CLASSES), 0))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_class, jobs))
    convert(root / "images", root / "shards", ConvertOptions(layout="imagenet", samples_per_shard=512,
                                                             shard_bytes=None, workers=workers))
    return root / "shards"


def _rate(loader, batches: int) -> float:
    import torch

    stream = iter(loader)
    for _ in range(3):  # warm-up: pipeline start, decoder allocations
        next(stream)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        seen += next(stream).images.shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def dali_decoding(shards: Path, batch: int, batches: int, threads: int, gpu: bool) -> dict:
    import torch

    from mixmae_scale.data.loader import ShardLoader
    from mixmae_scale.data.spec import IMAGENET_MEAN, IMAGENET_STD, PipelineSpec

    result: dict = {"batch": batch, "threads": threads, "image_size": "500x375 JPEG, q90"}
    devices = {"cpu": None, "gpu": 0} if gpu else {"cpu": None}
    for name, device_id in devices.items():
        spec = PipelineSpec(mode="pretrain", img_size=224, batch_size=batch, num_threads=threads, seed=1,
                            shuffle_buffer=1024, device_id=device_id)
        result[f"pretrain_images_per_s_{name}"] = _rate(ShardLoader(str(shards), "train", spec), batches)
    if gpu:
        result["gpu_over_cpu"] = result["pretrain_images_per_s_gpu"] / result["pretrain_images_per_s_cpu"]
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        pixels = {}
        for name, device_id in devices.items():
            spec = PipelineSpec(mode="eval", img_size=224, batch_size=batch, num_threads=threads, device_id=device_id)
            out = []
            for loaded, valid in ShardLoader(str(shards), "val", spec).eval_batches():
                out.append((loaded.images[:valid].float().cpu() * std + mean) * 255)
            pixels[name] = torch.cat(out)
        diff = (pixels["gpu"] - pixels["cpu"]).abs()
        result["eval_images_compared"] = int(pixels["cpu"].shape[0])
        result["eval_mean_abs_diff_255"] = float(diff.mean())
        result["eval_max_abs_diff_255"] = float(diff.max())
    return result


def pretrain_run(profile: str, shards: Path, run_dir: Path, steps: int, extra: list[str], port: int) -> dict:
    """One `mixmae pretrain` through the deepspeed launcher on one device; the summary and the curve."""
    overrides = [f"data.shards={shards}", "cluster.num_nodes=1", "cluster.gpus_per_node=1",
                 "batch.global_batch=null", "batch.accumulation=1", "logging.every_steps=5",
                 "logging.visualize_every_steps=0", "logging.heldout_batches=1", "logging.tensorboard=false",
                 "checkpoint.at_end=false", "checkpoint.every_steps=1000000", "data.num_threads=8", *extra]
    launcher = Path(sys.executable).parent / "deepspeed"
    launcher = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd = [*launcher, "--num_gpus", "1", "--master_port", str(port), "--module", "mixmae_scale.cli", "pretrain",
           "--profile", profile, "--run-dir", str(run_dir), "--max-steps", str(steps), "--set", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    record: dict = {"profile": profile, "overrides": extra, "returncode": proc.returncode,
                    "wall_s": time.perf_counter() - start}
    if proc.returncode:
        record["error"] = (proc.stdout + proc.stderr)[-3000:]
        return record
    summary = json.loads((run_dir / "summary.json").read_text())
    with (run_dir / "metrics.csv").open() as handle:
        curve = [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                 for row in csv.DictReader(handle)]
    config = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    record.update({k: summary.get(k) for k in ("steps", "images_per_s", "mfu", "peak_mem_mib_per_rank", "dtype",
                                               "loss_scale", "heldout_loss_start", "heldout_loss_end")})
    record["losses"] = [row["loss"] for row in curve]
    record["loss_scales"] = [row.get("loss_scale") for row in curve]
    record["micro_batch"] = config["derived"]["micro_batch"]
    record["zero_stage"] = config["zero"]["stage"]
    record["checkpointing"] = config["model"]["checkpoint_every"] > 0
    return record


def planned_gib(profile: str, micro: int, gpu_mem_gib: float, extra: list[str]) -> dict:
    from mixmae_scale.cluster.plan import plan
    from mixmae_scale.config import load_resolved

    resolved = load_resolved(profile, overrides=["batch.global_batch=null", "batch.accumulation=1",
                                                 f"batch.micro={micro}", *extra], world_size=1)
    result = plan(resolved, profile, 1, gpu_mem_gib)
    overhead = result.components_gib["runtime_overhead"]
    return {"planned_total_gib": result.total_gib, "planned_without_runtime_overhead_gib": result.total_gib - overhead,
            "planned_phase": result.peak_phase}


def _script(name: str, arguments: list[str], result: Path) -> dict:
    """A benchmark script of this folder's parent, its printed table kept, its JSON returned."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *arguments], capture_output=True, text=True,
                          timeout=540, env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
    if proc.returncode:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    print(proc.stdout[-3000:], flush=True)
    return json.loads(result.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on a CPU: checks the script itself")
    parser.add_argument("--parts", nargs="*", help="only the parts whose names start with these (default: all): "
                        "dali_decoding pretrain_swin_b_bf16 ... loop_overhead model_step")
    args = parser.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("PROOF_WORK", "/tmp/mixmae-proof"))
    gpu = torch.cuda.is_available()
    threads = os.cpu_count() or 4
    results: dict = {"versions": versions(), "cpu_cores": threads, "steps": args.steps, "parts": {}}
    gpu_mem_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if gpu else 0.0
    results["gpu_mem_gib"] = gpu_mem_gib

    def part(name: str, fn) -> None:
        if args.parts and not any(name.startswith(p) for p in args.parts):
            return
        start = time.perf_counter()
        try:
            results["parts"][name] = fn()
        except Exception:  # noqa: BLE001 - every part reports, whatever another did
            results["parts"][name] = {"error": traceback.format_exc()[-3000:]}
        results["parts"][name]["seconds"] = round(time.perf_counter() - start, 1)
        (out / "gpu_suite.json").write_text(json.dumps(results, indent=2, default=str))
        print(f"[proof] {name}: {json.dumps(results['parts'][name], default=str)[:600]}", flush=True)

    shards = make_shards(work / "data", 256 if args.cpu_smoke else args.images, min(threads, 16))
    part("dali_decoding", lambda: dali_decoding(shards, 32 if args.cpu_smoke else 128, 3 if args.cpu_smoke else 20,
                                                min(threads, 16), gpu))
    smoke = ["model.size=tiny", "model.img_size=96", "batch.micro=8"] if args.cpu_smoke else []
    sizes = [("swin_b", "bf16"), ("swin_l", "bf16"), ("swin_h", "bf16"), ("swin_b", "fp16")]
    if args.cpu_smoke:
        sizes = [("swin_b", "fp32")]
    for i, (profile, dtype) in enumerate(sizes):
        extra = [*smoke, f"precision.dtype={dtype}"]

        def run(profile=profile, extra=extra, i=i, dtype=dtype):
            record = pretrain_run(profile, shards, work / f"run-{profile}-{dtype}", args.steps, extra, 29700 + i)
            if "error" not in record and gpu:
                record.update(planned_gib(profile, record["micro_batch"], gpu_mem_gib, extra))
                measured = max(record["peak_mem_mib_per_rank"]) / 1024
                record["measured_peak_gib"] = measured
                record["planned_over_measured"] = record["planned_without_runtime_overhead_gib"] / measured
            losses = [v for v in record.get("losses", []) if v is not None]
            if losses:
                record["losses_finite"] = all(math.isfinite(v) for v in losses)
                record["loss_falls"] = losses[-1] < losses[0]
            return record

        part(f"pretrain_{profile}_{dtype}", run)
    fast = (["--profile", "tiny", "--batch", "8", "--dtype", "fp32", "--steps", "4", "--every", "2", "--warmup", "1",
             "--set", "model.img_size=96", "model.size=tiny"] if args.cpu_smoke else
            ["--profile", "swin_b", "--batch", "64", "--dtype", "bf16", "--steps", "30", "--every", "5",
             "--warmup", "5", "--set", "data.num_threads=8"])
    overhead_json = out / "loop_overhead.json"
    part("loop_overhead", lambda: _script("loop_overhead.py", [*fast, "--shards", str(shards), "--out",
                                                                str(overhead_json)], overhead_json))
    step = (["--sizes", "tiny", "--batch", "8", "--steps", "2"] if args.cpu_smoke
            else ["--sizes", "base", "--batch", "64", "--dtype", "bf16", "--steps", "5"])
    step_json = out / "model_step.json"
    part("model_step", lambda: _script("model_step.py", [*step, "--skip-memory", "--out", str(step_json)], step_json))
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    v = results["versions"]
    print(f"\n{v.get('gpu') or 'CPU'}; torch {v['torch']} (CUDA {v['cuda']}), DALI {v.get('dali')}, "
          f"DeepSpeed {v.get('deepspeed')}, {results['cpu_cores']} CPU cores")
    dali = results["parts"].get("dali_decoding", {})
    if "error" not in dali:
        print(f"DALI pretraining pipeline: CPU {dali.get('pretrain_images_per_s_cpu', 0):.0f} img/s, GPU "
              f"{dali.get('pretrain_images_per_s_gpu', 0):.0f} img/s ({dali.get('gpu_over_cpu', 0):.2f}x); eval "
              f"tensors GPU vs CPU: mean |diff| {dali.get('eval_mean_abs_diff_255', float('nan')):.3f}/255")
    print(f"{'run':<20}{'micro':>6}{'ZeRO':>5}{'ckpt':>6}{'img/s':>9}{'MFU':>7}{'peak GiB':>10}{'planned':>9}"
          f"{'plan/meas':>10}  loss first -> last")
    for name, r in results["parts"].items():
        if not name.startswith("pretrain_"):
            continue
        if "error" in r:
            print(f"{name:<20} FAILED: {r['error'].strip().splitlines()[-1][:100]}")
            continue
        losses = [x for x in r.get("losses", []) if x is not None]
        print(f"{name:<20}{r['micro_batch']:>6}{r['zero_stage']:>5}{str(r['checkpointing']):>6}"
              f"{r['images_per_s'] or 0:>9.1f}{(r.get('mfu') or 0):>7.1%}{r.get('measured_peak_gib', 0):>10.2f}"
              f"{r.get('planned_without_runtime_overhead_gib', 0):>9.2f}{r.get('planned_over_measured', 0):>10.2f}"
              f"  {losses[0]:.4f} -> {losses[-1]:.4f}"
              + (f"  scale {r['loss_scale']:g}" if r.get("loss_scale") else ""))


if __name__ == "__main__":
    sys.exit(main())
