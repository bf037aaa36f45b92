"""benchmarks/gpu/step_suite.py's code paths on the CPU at the tiny shape (its --dry-run), so the device run
does not spend GPU minutes on a broken script: a variant's row, the profile summary and the tables."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def suite_module():
    spec = importlib.util.spec_from_file_location("step_suite", REPO / "benchmarks/gpu/step_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_suite"] = module
    spec.loader.exec_module(module)
    return module


def test_busy_time_merges_overlapping_kernels_and_counts_the_gaps(suite_module):
    busy, idle, gaps = suite_module.busy_and_gaps([(0, 10), (5, 20), (100, 110), (115, 120)])
    assert (busy, idle, gaps) == (35, 85, 1)


def test_kernel_names_fall_into_their_classes(suite_module):
    classify = suite_module.classify
    assert classify("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert classify("triton_tem_fused_flex_attention_0") == "attention"
    assert classify("pytorch_flash::flash_fwd_kernel") == "attention"
    assert classify("void at::native::(anonymous namespace)::fused_adamw_kernel") == "optimizer"
    assert classify("triton_poi_fused_add_mul_0") == "fused elementwise (triton)"


def test_dry_run_measures_a_grouped_whole_step_and_profiles_the_baseline(suite_module):
    m = suite_module
    suite = m.Suite(dry_run=True, device=torch.device("cpu"), dtype="fp32", steps=2, warmup=1,
                    deadline=time.monotonic() + 300)
    saved = []
    rows = m.run_variants(suite, [("base", m.BASELINE), ("base", m.COMBINED)],
                          lambda: saved.append(len(suite.results["variants"])))
    assert saved == [1, 2]  # written after every row: a run cut short keeps what it measured
    assert [r["variant"] for r in rows] == ["baseline", "grouped+whole"] and all("images_per_s" in r for r in rows)
    assert rows[1]["group_kernel"] == "dense" and rows[0]["planned_activation_mib"] > 0
    assert rows[0]["compile_counters"]["graph_break"] == 0 and "unique_graphs" in rows[0]["compile_counters"]["stats"]
    profile = suite.results["profiles"]["base/baseline"]
    assert profile["kernels_per_step"] > 0 and abs(sum(c["share"] for c in profile["classes"].values()) - 1) < 1e-6
    table = m.profile_table("base/baseline", profile) + m.variants_table(
        rows + [{"size": "huge", "variant": "x", "skipped": "late"}])
    assert "| base | grouped+whole | 2 |" in table and "| huge | x |" in table and "late" in table


def test_a_failed_variant_is_a_row_and_a_lost_cuda_context_skips_the_rest(suite_module, monkeypatch):
    """An error in one variant is recorded with its trace and the suite goes on; once cleaning up after a variant
    fails (a sticky CUDA error), every later variant would fail the same way and is skipped with the reason; a
    variant whose compile needs more time than is left is skipped before it starts."""
    m = suite_module
    suite = m.Suite(dry_run=False, device=torch.device("cpu"), dtype="fp32", steps=1, warmup=1,
                    deadline=time.monotonic() + 150)

    def measure(suite, size, variant, cache, profile):
        if variant.name == "grouped":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return {"size": size, "variant": variant.name, "images_per_s": 1.0}

    released = iter([None, "the CUDA context is unusable after RuntimeError: illegal memory access"])
    monkeypatch.setattr(m, "measure_variant", measure)
    monkeypatch.setattr(m, "release", lambda suite: next(released))
    rows = m.run_variants(suite, [("base", m.BASELINE), ("base", m.B_ONLY[0]), ("large", m.BASELINE)], lambda: None)
    assert rows[0]["images_per_s"] == 1.0 and "illegal memory access" in rows[1]["error"] and "trace" in rows[1]
    assert rows[1]["cleanup_error"].startswith("the CUDA context is unusable")
    assert rows[2]["skipped"].startswith("the CUDA context is unusable")
    later = m.run_variants(suite, [("huge", m.BASELINE)], lambda: None)  # a later call (after the check) too
    assert later[-1]["skipped"].startswith("the CUDA context is unusable")
    suite.results.clear()
    late = m.run_variants(suite, [("base", m.B_ONLY[1])], lambda: None)  # whole-step compile: 200 s needed
    assert late[0]["skipped"].startswith("the --budget-s deadline") and "200 needed" in late[0]["skipped"]
