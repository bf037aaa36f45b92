"""Forward+backward time per image and peak memory of MixMAE steps; prints a table, writes JSON.

Two kinds of measurement, each in one run so that ratios are meaningful on a noisy machine:
- speed: variants are timed in one process, interleaved step by step (timm's Swin of the same
  shape, our encoder with fused attention, with the reference attention, ...), median per variant;
- memory: each variant runs in a fresh subprocess; on the CPU the peak is the growth of the
  process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over one step, after the weights
  and gradient buffers exist; on a GPU it is torch.cuda.max_memory_allocated over one step.

    python benchmarks/model_step.py                  # CPU defaults: tiny and base, batch 8
    python benchmarks/model_step.py --sizes base large huge --batch 64 --dtype bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mixmae_scale.atomic_file import write_text

RESULTS = Path(__file__).resolve().parent / "results"


def _build(size: str, attention: str = "fused", checkpoint_every: int = 0):
    from mixmae_scale.config import load_resolved
    from mixmae_scale.models.mixmae import build_mixmae

    profile = {"tiny": "tiny", "base": "swin_b", "large": "swin_l", "huge": "swin_h"}[size]
    resolved = load_resolved(profile, overrides=[f"model.attention={attention}",
                                                 f"model.checkpoint_every={checkpoint_every}",
                                                 "batch.global_batch=null", "batch.accumulation=1"],
                             world_size=1, train_samples=10**9)
    return build_mixmae(resolved.config.model), resolved.config.model


def _timm_swin(model_cfg):
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=model_cfg.img_size, patch_size=model_cfg.patch_size,
                           embed_dim=model_cfg.embed_dim, depths=tuple(model_cfg.depths),
                           num_heads=tuple(model_cfg.num_heads), window_size=max(model_cfg.window_size[:-1]),
                           num_classes=0)


def _autocast(device: str, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def speed(size: str, batch: int, dtype: str, device: str, steps: int, variants: list[str]) -> list[dict]:
    """Interleaved timing of the variants; each does forward + backward of a scalar loss."""
    torch.manual_seed(0)
    ours, cfg = _build(size)
    ours = ours.to(device)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    mask = ours.sample_mask(torch.Generator().manual_seed(0), device)
    steps_fn = {}
    if "timm_swin_encoder" in variants or "timm_swin_plus_decoder" in variants:
        timm_model = _timm_swin(cfg).to(device)
        steps_fn["timm_swin_encoder"] = lambda: timm_model.forward_features(images).float().mean().backward()
        if "timm_swin_plus_decoder" in variants:
            steps_fn["timm_swin_plus_decoder"] = lambda: _timm_plus_decoder_loss(timm_model, ours, images,
                                                                                 mask).backward()

    def ours_encoder(fused: bool, every: int = 0):
        def run():
            ours.encoder.set_fused_attention(fused)
            ours.encoder.checkpoint_every = every
            ours.forward_encoder(images, mask).float().mean().backward()
        return run

    def ours_full(fused: bool, every: int = 0):
        def run():
            ours.encoder.set_fused_attention(fused)
            ours.encoder.checkpoint_every = every
            ours(images, mask=mask).loss.backward()
        return run

    table = {"mixmae_encoder_fused": ours_encoder(True), "mixmae_encoder_reference": ours_encoder(False),
             "mixmae_step_fused": ours_full(True), "mixmae_step_reference": ours_full(False),
             "mixmae_step_fused_ckpt": ours_full(True, 1)}
    if "mixmae_step_compiled" in variants:
        from mixmae_scale.models.regional_compile import maybe_compile

        torch.manual_seed(0)
        compiled, _ = _build(size)
        compiled = compiled.to(device)
        if maybe_compile(compiled, True, torch.device(device)):
            table["mixmae_step_compiled"] = lambda: compiled(images, mask=mask).loss.backward()
    for name in variants:
        if name in table:
            steps_fn[name] = table[name]
    times: dict[str, list[float]] = {name: [] for name in steps_fn}
    for round_ in range(steps + 1):
        for name, fn in steps_fn.items():
            _sync(device)
            start = time.perf_counter()
            with _autocast(device, dtype):
                fn()
            _sync(device)
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"kind": "speed", "size": size, "variant": name, "batch": batch, "dtype": dtype,
                     "device": device, "step_s": median, "ms_per_image": 1000 * median / batch,
                     "images_per_s": batch / median, "repeats": len(values)})
    base = next((r["step_s"] for r in rows if r["variant"] == "timm_swin_encoder"), None)
    base_step = next((r["step_s"] for r in rows if r["variant"] == "timm_swin_plus_decoder"), None)
    eager = next((r["step_s"] for r in rows if r["variant"] == "mixmae_step_fused"), None)
    for row in rows:
        if base and "encoder" in row["variant"]:
            row["vs_timm"] = row["step_s"] / base
        if base_step and row["variant"].startswith("mixmae_step"):
            row["vs_timm"] = row["step_s"] / base_step  # < 1: faster than timm's Swin with our decoder
        if eager and row["variant"] == "mixmae_step_compiled":
            row["speedup_vs_eager"] = eager / row["step_s"]
    return rows


def _timm_plus_decoder_loss(timm_model, ours, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same work with timm's (unmixed, shifted-window) Swin as the encoder and our decoder and loss."""
    from mixmae_scale.models.mixmae import normalized_target, unmix_predictions

    features = timm_model.forward_features(images).flatten(1, 2)
    pred = unmix_predictions(ours.decoder(features, mask), mask)
    target = normalized_target(images.float(), ours.cell, ours.norm_pix_loss)
    return (pred.float() - target).pow(2).mean()


def _read_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def memory_worker(size: str, batch: int, dtype: str, device: str, checkpoint_every: int, attention: str) -> dict:
    torch.manual_seed(0)
    model, cfg = _build(size, attention, checkpoint_every)
    model = model.to(device).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    mask = model.sample_mask(torch.Generator().manual_seed(0), device)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _read_status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    with _autocast(device, dtype):
        loss = model(images, mask=mask).loss
    loss.backward()
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _read_status_kb("VmHWM") * 1024
    return {"kind": "memory", "size": size, "variant": f"mixmae_step_{attention}" + (
        f"_ckpt{checkpoint_every}" if checkpoint_every else ""), "batch": batch, "dtype": dtype, "device": device,
        "checkpoint_every": checkpoint_every, "step_peak_mib": (peak - before) / 2**20,
        "weights_and_grads_mib": before / 2**20, "step_s": elapsed}


def memory(size: str, batch: int, dtype: str, device: str, attention: str) -> list[dict]:
    rows = []
    for every in (0, 1):
        spec = json.dumps(dict(size=size, batch=batch, dtype=dtype, device=device, checkpoint_every=every,
                               attention=attention))
        out = subprocess.run([sys.executable, __file__, "--memory-worker", spec], capture_output=True, text=True,
                             check=False)
        if out.returncode:
            raise RuntimeError(f"memory worker {spec} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain, ckpt = rows
    ckpt["reduction_vs_no_ckpt"] = plain["step_peak_mib"] / ckpt["step_peak_mib"]
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["kind", "size", "variant", "batch", "dtype", "device", "step_s", "ms_per_image", "vs_timm",
            "speedup_vs_eager",
            "step_peak_mib", "reduction_vs_no_ckpt"]
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed repeats per variant (after one warm-up)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-compile", action="store_true", help="no compiled variant (it compiles for minutes "
                        "on a 2-core CPU)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cpu":
        # Denormal floats make CPU GELU and softmax several times slower, in timm's model and ours alike.
        torch.set_flush_denormal(True)
    if args.memory_worker:
        print(json.dumps(memory_worker(**json.loads(args.memory_worker))))
        return
    rows: list[dict] = []
    for size in args.sizes:
        variants = ["timm_swin_encoder", "mixmae_encoder_fused", "mixmae_encoder_reference",
                    "timm_swin_plus_decoder", "mixmae_step_fused", "mixmae_step_reference"]
        if not args.skip_compile:
            variants.append("mixmae_step_compiled")
        rows += speed(size, args.batch, args.dtype, args.device, args.steps, variants)
        if not args.skip_memory:
            rows += memory(size, args.batch, args.dtype, args.device, "fused")
        print_table(rows)
    machine = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    out = args.out or RESULTS / f"model_step_{args.device}_{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
