"""The GPU step suite: where Swin-B's step time goes, and what each change to the step buys, for B, L and H.

One process, one GPU, synthetic images already on the device (the bare step: forward, backward, AdamW step):
1. variants, in priority order, each timed alone (median step after warm-up): the baseline (the profiles'
   GPU settings: fused masked attention, per-block compile, fused AdamW), grouped attention, whole-step
   compile, both, CUDA graphs (whole step, mode="reduce-overhead"), a doubled micro-batch, foreach AdamW
   (what fusing the optimizer buys); B gets all, L and H the baseline and the combination. B's baseline runs
   first; the check (2) runs after it;
2. check: `model.attention=grouped` through compiled FlexAttention (its backward exists on CUDA only) against
   the masked path, fp32, forward and every gradient, at a small shape and at the official 7x7 mask grid;
3. profile: B's baseline and grouped steps under torch.profiler: GPU busy time, host gaps between kernels,
   kernel classes;
4. loop: the real loop over the bare step (benchmarks/loop_overhead.py) where DeepSpeed and DALI are installed.

Per variant: images/s, MFU (the FLOP count named in the JSON: `models.flops` training FLOPs per image, 6 x
forward multiply-adds with 2 FLOPs per multiply-add and the masked attention's full windows, for every
variant, so grouped attention is credited the same work), peak memory, and the planner's activation figure
against the measured growth of memory over the step, and dynamo's counters (graph breaks, recompiles, skipped
CUDA graphs: each slows a step without an error). A deadline (--budget-s) skips what would not fit, recorded as
skipped. gpu_suite.json and profile.md in --out are rewritten after every row, so a run cut short keeps its rows.

    python3 benchmarks/gpu/step_suite.py --out benchmarks/results/gpu_step     # one H200: at most about 8 minutes
    python benchmarks/gpu/step_suite.py --out /tmp/s --dry-run   # CPU: tiny shape, 2 steps, tracing only
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mixmae_scale.atomic_file import write_text  # noqa: E402

PROFILES = {"base": "swin_b", "large": "swin_l", "huge": "swin_h"}
MICRO = {"base": 128, "large": 128, "huge": 64}  # the GPU proof run's micro-batches (benchmarks/README.md)
KERNEL_CLASSES = (  # first match wins; names of cuBLAS/CUTLASS, PyTorch, Triton (inductor) and flex kernels
    ("attention", r"flash|fmha|attention|flex|sdpa|efficient"),
    ("matmul", r"gemm|cutlass|nvjet|sm90_xmma|matmul|addmm|^aten::mm|^aten::bmm|linear"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("norm", r"layer_norm|layernorm|native_layer_norm"),
    ("copy", r"memcpy|memset|copy_|cat|gather|index|to_copy"),
    ("fused elementwise (triton)", r"^triton_"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|softmax|gelu|add|mul"),
)


@dataclass(frozen=True)
class Variant:
    name: str
    attention: str = "fused"
    compile: str = "blocks"  # none, blocks, whole, cudagraphs (whole, mode="reduce-overhead")
    micro_scale: float = 1.0
    fused_adamw: bool = True


BASELINE = Variant("baseline")
COMBINED = Variant("grouped+whole", attention="grouped", compile="whole")
B_ONLY = (Variant("grouped", attention="grouped"), Variant("whole", compile="whole"),
          Variant("cudagraphs", compile="cudagraphs"), Variant("micro_x2", micro_scale=2.0),
          Variant("foreach_adamw", fused_adamw=False))


def plan_runs() -> list[tuple[str, Variant]]:
    """Priority order: what the next GPU session most needs comes first, before the deadline can bite: B's
    baseline, each of the two main changes alone and together, then L and H, then the rest of B's."""
    return [("base", BASELINE), ("base", B_ONLY[0]), ("base", B_ONLY[1]), ("base", COMBINED), ("large", BASELINE),
            ("large", COMBINED), ("huge", BASELINE), ("huge", COMBINED), *[("base", v) for v in B_ONLY[2:]]]


# Seconds a variant needs before the deadline to be started: a cold compile plus warm-up and timed steps. Per-block
# compiles reuse one block's graph per stage shape; a whole-step compile traces every block of the step, forward and
# backward (and CUDA graphs record it as well).
NEEDS_S = {"none": 45.0, "blocks": 90.0, "whole": 200.0, "cudagraphs": 240.0}


@dataclass
class Suite:
    dry_run: bool
    device: torch.device
    dtype: str
    steps: int
    warmup: int
    deadline: float
    results: dict = field(default_factory=dict)

    def compile_options(self) -> dict:
        return {"backend": "eager"} if self.dry_run else {}

    def left(self) -> float:
        return self.deadline - time.monotonic()


def resolved_for(suite: Suite, size: str, variant: Variant):
    from mixmae_scale.config import load_resolved

    micro = max(2, int(MICRO[size] * variant.micro_scale)) if not suite.dry_run else 2
    overrides = [f"model.attention={variant.attention}", f"precision.dtype={suite.dtype}", "batch.global_batch=null",
                 "batch.accumulation=1", f"batch.micro={micro}", "model.checkpoint_every=0"]
    profile = "tiny" if suite.dry_run else PROFILES[size]
    return load_resolved(profile, overrides=overrides, world_size=1), micro


def build_step(suite: Suite, size: str, variant: Variant):
    """The bare step of `variant`: (step function, model, micro-batch, resolved config)."""
    from mixmae_scale.data.loaders import loader_dtype
    from mixmae_scale.engine.distributed import autocast
    from mixmae_scale.engine.optimizer import build_optimizer
    from mixmae_scale.models.mixmae import build_mixmae
    from mixmae_scale.models.regional_compile import compile_blocks, compile_whole
    from mixmae_scale.models.swin import SwinBlock

    resolved, micro = resolved_for(suite, size, variant)
    config, derived = resolved.config, resolved.derived
    torch.manual_seed(0)
    model = build_mixmae(config.model).to(suite.device).train()
    options = suite.compile_options()
    if variant.compile == "blocks":
        from timm.models.vision_transformer import Block

        compile_blocks(model, (SwinBlock, Block), **options)
    elif variant.compile in ("whole", "cudagraphs"):
        mode = {"mode": "reduce-overhead"} if variant.compile == "cudagraphs" and not suite.dry_run else {}
        compile_whole(model, **options, **mode)
    optimizer = build_optimizer(model, config.optim, derived.learning_rate)
    if not variant.fused_adamw:
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = False, True
    size_px = config.model.img_size
    pixels = getattr(torch, loader_dtype(derived.dtype))
    images = torch.randn(micro, 3, size_px, size_px, device=suite.device).to(pixels)
    generator = torch.Generator(suite.device).manual_seed(0)

    def step() -> None:
        if variant.compile == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        mask = model.sample_mask(generator, suite.device)  # a new mask each step, as the real loop draws
        with autocast(suite.device, derived.dtype):
            loss = model(images, mask=mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model, micro, resolved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(suite: Suite, step, count: int) -> list[float]:
    times = []
    for _ in range(count):
        sync(suite.device)
        start = time.perf_counter()
        step()
        sync(suite.device)
        times.append(time.perf_counter() - start)
    return times


def planned_activation_mib(resolved, micro: int, cache: dict) -> float:
    from mixmae_scale.cluster.plan import measure_activations

    key = (resolved.config.model.size, resolved.config.model.attention)
    if key not in cache:
        cache[key] = measure_activations(resolved, resolved.derived.dtype).per_image(False)
    return micro * cache[key] / 2**20


def measure_variant(suite: Suite, size: str, variant: Variant, plan_cache: dict, profile: bool) -> dict:
    from mixmae_scale.models.flops import model_report

    step, model, micro, resolved = build_step(suite, size, variant)
    start = time.perf_counter()
    for _ in range(suite.warmup):
        step()
    sync(suite.device)
    warmup_s = time.perf_counter() - start
    before = torch.cuda.memory_allocated() if suite.device.type == "cuda" else 0
    if suite.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(suite, step, suite.steps)
    median = statistics.median(times)
    row = {"size": size, "variant": variant.name, "settings": variant.__dict__, "micro": micro,
           "images_per_s": micro / median, "step_s": median, "steps_timed": len(times),
           "warmup_with_compile_s": warmup_s, "group_kernel": _group_kernel(model, suite.device)}
    flops = model_report(resolved.config.model)["train_flops_per_image"]
    peak = _peak_flops(suite)
    row["train_flops_per_image"] = flops
    row["mfu"] = (micro / median) * flops / peak if peak else None
    row["compile_counters"] = compile_counters()
    try:  # a timing is kept even when a memory figure cannot be had
        row.update(memory_figures(suite, resolved, micro, variant, before, plan_cache))
    except Exception as exc:  # noqa: BLE001
        row["memory_error"] = f"{type(exc).__name__}: {exc}"[:500]
    if profile:
        suite.results.setdefault("profiles", {})[f"{size}/{variant.name}"] = profile_step(
            suite, step, 3 if not suite.dry_run else 1)
    return row


def memory_figures(suite: Suite, resolved, micro: int, variant: Variant, before: int, plan_cache: dict) -> dict:
    """Peak memory, its growth over the step, and the planner's activation figure against that growth. The
    planner measures the dense masked kernel on the CPU, so a grouped row compares another kernel's memory; CUDA
    graphs allocate from their own pool, which the step's growth does not show, so no planner error there."""
    figures = {"planned_activation_mib": planned_activation_mib(resolved, micro, plan_cache), "planner_error": None}
    if suite.device.type != "cuda":
        return figures
    peak_bytes = torch.cuda.max_memory_allocated()
    figures.update(peak_mib=peak_bytes / 2**20, step_growth_mib=(peak_bytes - before) / 2**20)
    if variant.compile != "cudagraphs" and figures["step_growth_mib"] >= 64:
        figures["planner_error"] = figures["planned_activation_mib"] / figures["step_growth_mib"] - 1
    return figures


def compile_counters() -> dict:
    """What dynamo and inductor did for the variant just run (cleared after each): graph breaks, recompiles and
    skipped CUDA graphs each make a step slower without an error."""
    from torch._dynamo.utils import counters

    wanted = {"graph_break": None, "recompiles": None, "stats": ("unique_graphs", "calls_captured"),
              "inductor": ("cudagraph_skips",)}
    found = {}
    for group, keys in wanted.items():
        values = dict(counters.get(group, {}))
        found[group] = sum(values.values()) if keys is None else {k: values.get(k, 0) for k in keys}
    return found


def _group_kernel(model, device: torch.device) -> str | None:
    from mixmae_scale.models.source_groups import flex_backward_exists

    if model.attention != "grouped":
        return None
    return model.group_kernel if model.group_kernel != "auto" else (
        "flex" if flex_backward_exists(device) else "dense")


def _peak_flops(suite: Suite) -> float | None:
    from mixmae_scale.engine.monitor import device_peak_flops

    return device_peak_flops(0.0)


def classify(name: str) -> str:
    lowered = name.lower()
    for label, pattern in KERNEL_CLASSES:
        if re.search(pattern, lowered):
            return label
    return "other"


def busy_and_gaps(intervals: list[tuple[float, float]]) -> tuple[float, float, int]:
    """Union length of (start, end) intervals (us), total idle time between them, and the count of gaps > 50 us."""
    busy = idle = 0.0
    gaps = 0
    end = None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                idle += s - end
                gaps += (s - end) > 50
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy, idle, gaps


def profile_step(suite: Suite, step, count: int) -> dict:
    """torch.profiler over `count` steps: on a GPU its kernels; on a CPU (dry run) the top-level operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if suite.device.type == "cuda" else [])
    sync(suite.device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(count):
            step()
        sync(suite.device)
    wall_us = (time.perf_counter() - start) * 1e6
    events = [e for e in prof.events() if _is_device_work(e, suite.device)]
    busy, idle, gaps = busy_and_gaps([(e.time_range.start, e.time_range.end) for e in events])
    classes: dict[str, float] = {}
    unclassified: dict[str, float] = {}
    for e in events:
        label, spent = classify(e.name), e.time_range.end - e.time_range.start
        classes[label] = classes.get(label, 0.0) + spent
        if label == "other":
            unclassified[e.name[:120]] = unclassified.get(e.name[:120], 0.0) + spent
    total = sum(classes.values()) or 1.0
    return {"steps": count, "wall_ms_per_step": wall_us / count / 1e3, "busy_ms_per_step": busy / count / 1e3,
            "busy_share": busy / wall_us, "host_gap_ms_per_step": (wall_us - busy) / count / 1e3,
            "gaps_over_50us_per_step": gaps / count, "kernels_per_step": len(events) / count,
            "classes": {k: {"ms_per_step": v / count / 1e3, "share": v / total}
                        for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
            "other_top": {k: v / count / 1e3 for k, v in sorted(unclassified.items(), key=lambda kv: -kv[1])[:10]},
            "events": "cuda kernels" if suite.device.type == "cuda" else "top-level cpu operators (dry run)"}


def _is_device_work(event, device: torch.device) -> bool:
    from torch.autograd import DeviceType

    if device.type == "cuda":  # GPU-side user annotations (record_function ranges) are spans, not kernels
        return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
    return event.device_type == DeviceType.CPU and event.cpu_parent is None and event.name.startswith("aten::")


def check_grouped(suite: Suite) -> dict:
    """Compiled grouped attention (FlexAttention on CUDA) against the masked path, fp32, forward and gradients."""
    from mixmae_scale.models.mixmae import MixMAE
    from mixmae_scale.models.regional_compile import compile_blocks
    from mixmae_scale.models.swin import SwinBlock, SwinShape

    shapes = {"small": SwinShape(128, 4, 16, (1, 1, 2, 1), (1, 2, 2, 4), (8, 8, 8, 4)),
              "official_grid": SwinShape(224, 4, 32, (1, 1, 1, 1), (1, 2, 4, 8), (14, 14, 14, 7))}
    out = {}
    for name, shape in shapes.items():
        runs = {}
        for attention in ("fused", "grouped"):
            torch.manual_seed(0)
            model = MixMAE(shape, decoder_dim=32, decoder_depth=1, decoder_heads=2, attention=attention)
            model = model.to(suite.device)
            if attention == "grouped":
                compile_blocks(model, (SwinBlock,), **suite.compile_options())
            images = torch.randn(4, 3, shape.img_size, shape.img_size, generator=torch.Generator().manual_seed(0))
            mask = model.sample_mask(torch.Generator().manual_seed(1))
            loss = model(images.to(suite.device), mask=mask.to(suite.device)).loss
            loss.backward()
            runs[attention] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                               _group_kernel(model, suite.device))
        (loss_f, grads_f, _), (loss_g, grads_g, kernel) = runs["fused"], runs["grouped"]
        out[name] = {"kernel": kernel, "loss_abs_diff": (loss_f - loss_g).abs().item(),
                     "grad_max_abs_diff": max((grads_f[n] - grads_g[n]).abs().max().item() for n in grads_f),
                     "grad_max_rel_diff": max(((grads_f[n] - grads_g[n]).abs().max()
                                               / grads_f[n].abs().max().clamp_min(1e-12)).item() for n in grads_f)}
    return out


def run_loop_overhead(suite: Suite, out: Path) -> dict:
    """The real loop (DeepSpeed, DALI) over the bare step, B: only where both are installed (the wheel kit)."""
    import importlib
    import subprocess

    if suite.dry_run:
        return {"skipped": "dry run"}
    missing = []
    for name in ("deepspeed", "nvidia.dali"):  # `nvidia` alone is there with CUDA's wheels: import the module
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - absent or broken, either way not usable here
            missing.append(name)
    if missing or suite.left() < 150:
        return {"skipped": f"not installed here: {missing}" if missing else "the --budget-s deadline"}
    import tempfile

    sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
    from proof import make_shards

    shards = make_shards(Path(tempfile.mkdtemp()), 1024, 16)
    cmd = [sys.executable, str(REPO / "benchmarks/loop_overhead.py"), "--batch", "64", "--dtype", suite.dtype,
           "--compile", "true", "--shards", str(shards), "--out", str(out / "loop_overhead.json")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=int(suite.left()) + 60, check=False)
    except subprocess.TimeoutExpired:
        return {"error": "timed out at the --budget-s deadline"}
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    return json.loads((out / "loop_overhead.json").read_text())


def run_variants(suite: Suite, runs: list[tuple[str, Variant]], save) -> list[dict]:
    """Each variant in turn; `save()` after each, so that a run cut short still leaves every row it finished."""
    plan_cache: dict = {}
    rows = suite.results.setdefault("variants", [])
    for size, variant in runs:
        lost = suite.results.get("cuda_lost")
        needs = 20 if suite.dry_run else NEEDS_S[variant.compile]
        if lost or suite.left() < needs:
            rows.append({"size": size, "variant": variant.name,
                         "skipped": lost or f"the --budget-s deadline ({suite.left():.0f} s left, {needs:.0f} needed)"})
            continue
        profile = size == "base" and variant in (BASELINE, B_ONLY[0])
        started = time.monotonic()
        try:
            rows.append(measure_variant(suite, size, variant, plan_cache, profile))
        except Exception as exc:  # noqa: BLE001 - one failing variant (an OOM, a compile error) is a finding
            rows.append({"size": size, "variant": variant.name, "error": f"{type(exc).__name__}: {exc}"[:2000],
                         "trace": traceback.format_exc()[-3000:]})
        rows[-1]["wall_s"] = time.monotonic() - started
        lost = release(suite)
        if lost:
            rows[-1]["cleanup_error"] = suite.results["cuda_lost"] = lost
        save()
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "trace"}, default=str), flush=True)
        if "trace" in rows[-1]:
            print(rows[-1]["trace"], flush=True)
    return rows


def release(suite: Suite) -> str | None:
    """Frees what a variant left (compiled graphs, its model, cached blocks). After a sticky CUDA error (an
    illegal access) this raises too, and every later variant would fail the same way: returns why, to skip them."""
    import gc

    try:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        gc.collect()  # a compiled forward keeps its module in a reference cycle
        if suite.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        return f"the CUDA context is unusable after {type(exc).__name__}: {exc}"[:500]
    return None


def profile_table(name: str, profile: dict) -> str:
    lines = [f"{name} step, {profile['events']}: wall {profile['wall_ms_per_step']:.1f} ms/step, busy "
             f"{profile['busy_ms_per_step']:.1f} ms ({profile['busy_share']:.0%}), host gaps "
             f"{profile['host_gap_ms_per_step']:.1f} ms ({profile['gaps_over_50us_per_step']:.0f} gaps > 50 us), "
             f"{profile['kernels_per_step']:.0f} kernels/step", "", "| class | ms/step | share |", "|---|---|---|"]
    lines += [f"| {k} | {v['ms_per_step']:.2f} | {v['share']:.1%} |" for k, v in profile["classes"].items()]
    return "\n".join(lines) + "\n"


def variants_table(rows: list[dict]) -> str:
    lines = ["| size | variant | micro | images/s | MFU | peak GiB | planner error | note |", "|---" * 8 + "|"]
    for r in rows:
        if "images_per_s" not in r:
            lines.append(f"| {r['size']} | {r['variant']} | | | | | | {r.get('skipped') or r.get('error', '')[:60]} |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_mib'] / 1024:.2f}" if "peak_mib" in r else "-"
        err = f"{r['planner_error']:+.0%}" if r.get("planner_error") is not None else "-"
        lines.append(f"| {r['size']} | {r['variant']} | {r['micro']} | {r['images_per_s']:.1f} | {mfu} | {peak} | "
                     f"{err} | {r['group_kernel'] or ''} |")
    return "\n".join(lines) + "\n"


def environment(suite: Suite) -> dict:
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
             "gpu": torch.cuda.get_device_name() if suite.device.type == "cuda" else None,
             "dtype": suite.dtype, "dry_run": suite.dry_run}
    found["peak_tflops_assumed"] = (_peak_flops(suite) or 0) / 1e12 or None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, 2 steps, tracing-only compile")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="no variant starts without the time its compile needs left (NEEDS_S); the grouped "
                             "check is skipped with under 240 s left")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["check", "loop"])
    args = parser.parse_args()
    began = time.monotonic()
    cuda = torch.cuda.is_available() and not args.dry_run
    suite = Suite(dry_run=args.dry_run, device=torch.device("cuda" if cuda else "cpu"),
                  dtype="bf16" if cuda else "fp32", steps=2 if args.dry_run else args.steps,
                  warmup=1 if args.dry_run else args.warmup, deadline=began + args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    suite.results["environment"] = environment(suite)
    flops_note = ("train_flops_per_image = 6 x forward multiply-adds (models/flops.py: linear layers, patch "
                  "embedding, q@k and attn@v over whole windows, decoder), 2 FLOPs per multiply-add")
    suite.results["mfu_flop_count"] = flops_note

    def save() -> str:
        suite.results["wall_s"] = time.monotonic() - began
        write_text(args.out / "gpu_suite.json", json.dumps(suite.results, indent=1, default=str) + "\n")
        try:  # the JSON above is the record; a table that cannot be drawn must not end the suite
            tables = variants_table(suite.results.get("variants", []))
            for name, found in suite.results.get("profiles", {}).items():
                tables = profile_table(name, found) + "\n" + tables
        except Exception:  # noqa: BLE001
            tables = "tables not drawn:\n" + traceback.format_exc()
        write_text(args.out / "profile.md", tables)
        return tables

    save()
    runs = plan_runs() if not args.dry_run else [("base", BASELINE), ("base", B_ONLY[0]), ("base", COMBINED),
                                                 ("base", B_ONLY[2])]
    run_variants(suite, runs[:1], save)  # B's baseline first: the figure every other row is compared with
    if "check" not in args.skip:
        started = time.monotonic()
        if suite.results.get("cuda_lost") or suite.left() < (0 if args.dry_run else 240):
            suite.results["grouped_check"] = {"skipped": suite.results.get("cuda_lost") or "the --budget-s deadline"}
        else:
            try:
                suite.results["grouped_check"] = check_grouped(suite)
            except Exception as exc:  # noqa: BLE001
                suite.results["grouped_check"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            lost = release(suite)
            if lost:
                suite.results["cuda_lost"] = lost
        suite.results["grouped_check_s"] = time.monotonic() - started
        save()
        print("grouped check:", json.dumps(suite.results["grouped_check"]), flush=True)
    run_variants(suite, runs[1:], save)
    suite.results["loop"] = {"skipped": "--skip loop"} if "loop" in args.skip else run_loop_overhead(suite, args.out)
    tables = save()
    print(tables + f"\nwall {suite.results['wall_s']:.0f} s; wrote {args.out / 'gpu_suite.json'}")


if __name__ == "__main__":
    main()
