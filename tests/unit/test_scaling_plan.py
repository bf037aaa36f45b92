"""Sweep specs: the iso-FLOP and learning-rate keys are validated with the reason, and emitted runs get a world
size their global batch allows."""

from __future__ import annotations

import pytest

from mixmae_scale.config import ConfigError
from mixmae_scale.scaling.commands import cluster_shape
from mixmae_scale.scaling.spec import LearningRateRule, load_spec

BASE = "name: x\nprofile: tiny\nshards: s\nsizes: [tiny]\ndata_fractions: [1]\n"


@pytest.mark.parametrize("extra, message", [
    ("budgets: [1.0e12]\nsteps: [5]\n", "exactly one of 'steps' or 'epochs'"),
    ("budgets: [-1.0]\n", "'budgets' holds -1.0: each must be a finite number above zero"),
    ("budgets: [1.0e12]\nlearning_rate: {rule: sqrt}\n", "learning_rate.rule must be one of"),
    ("budgets: [1.0e12]\nlearning_rate: {rule: inverse_width}\n", "needs base_width"),
    ("budgets: [1.0e12]\nlearning_rate: {rule: fixed, sweep: [0.1, -1]}\n", "'learning_rate.sweep' holds -1.0"),
    ("budgets: [1.0e12]\nlearning_rate: {rule: fixed, bogus: 1}\n", "learning_rate: unknown key 'bogus'"),
    ("budgets: [1.0e12]\ncluster: {gpus_per_node: 0}\n", "cluster.gpus_per_node must be a positive integer, got 0"),
    ("budgets: [1.0e12]\ncluster: {file: 3}\n", "optionally file"),
    ("budgets: [1.0e12]\n", "budget 1e\\+12 has 1 size"),
])
def test_bad_iso_flop_and_lr_keys_are_refused_with_the_reason(tmp_path, extra, message):
    path = tmp_path / "spec.yaml"
    path.write_text(BASE + extra)
    with pytest.raises(ConfigError, match=message):
        load_spec(path)


@pytest.mark.parametrize("extra, message", [
    ("budgets: [1.0e12]\nlearning_rate: {rul: inverse_width, base_width: 8}\n",
     "learning_rate: unknown key 'rul' (did you mean 'rule'?); its keys are base_width, rule, sweep"),
    ("budgets: [2.0e11]\nsizes: [{name: a, budget: [2.0e11]}, b, c]\n",
     "sizes[0] (a): unknown key 'budget' (did you mean 'budgets'?); its keys are budgets, model, name"),
    ("steps: [5]\ncluster: {gpus_per_nodes: 4}\n",
     "cluster: unknown key 'gpus_per_nodes' (did you mean 'gpus_per_node'?); its keys are file, gpus_per_node, "
     "max_nodes"),
    ("steps: [5]\nsources: [{shards: s, wieght: 2}]\n",
     "sources[0]: unknown key 'wieght' (did you mean 'weight'?); its keys are shards, split, weight"),
    ("budget: [1.0e12]\nsteps: [5]\n", "the spec: unknown key 'budget' (did you mean 'budgets'?); its keys are "
                                       "budgets, cluster, data_fractions, epochs"),
])
def test_a_mistyped_key_inside_a_section_is_named(tmp_path, extra, message):
    """A misspelt top-level key was named with the keys known; one inside learning_rate, a size, cluster or a source
    was not: the whole mapping was printed back ("learning_rate is a mapping with keys rule, base_width, sweep; got
    {'rul': 'inverse_width', 'base_width': 8}") for the user to diff by eye."""
    import re

    path = tmp_path / "spec.yaml"
    path.write_text((BASE.replace("sizes: [tiny]\n", "") if "sizes: " in extra else BASE) + extra)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_spec(path)


def test_a_mistyped_key_in_set_is_named_as_sets_not_as_the_first_sizes(tmp_path):
    """`set: ["zero.stag=0"]` was refused as "sizes[0] (w8): unknown configuration key 'zero.stag'": the spec's
    first size, where the user looked for it in vain. A size's own mistyped key is still named as the size's."""
    import re

    from mixmae_scale.scaling.spec import expand

    path = tmp_path / "spec.yaml"
    sizes = ("sizes:\n  - {name: a, model: {embed_dim: 8, num_heads: [1, 1, 2, 4]}}\n"
             "  - {name: b, model: {embed_dim: 16, num_heads: [1, 2, 4, 8], decoder_dims: 64}}\n")
    path.write_text(BASE.replace("sizes: [tiny]\n", sizes) + 'steps: [5]\nset: ["zero.stag=0"]\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: set: unknown configuration key 'zero.stag'")):
        expand(load_spec(path), 100)
    path.write_text(BASE.replace("sizes: [tiny]\n", sizes) + 'steps: [5]\nset: ["zero.stage=0"]\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: sizes[1] (b): unknown configuration key "
                                                    "'model.decoder_dims'")):
        expand(load_spec(path), 100)


@pytest.mark.parametrize("extra, message", [
    # Each was a bare TypeError or ValueError traceback naming neither file nor key, or taken as another value.
    ("budgets: [1.0e12]\nlearning_rate: {sweep: 0.01}\n", "'learning_rate.sweep' must be a non-empty list"),
    ("budgets: [1.0e12]\nlearning_rate: {sweep: [1.0e-3, abc]}\n", "'learning_rate.sweep' holds 'abc', not a number"),
    ("budgets: [1.0e12]\nlearning_rate: {rule: fixed, sweep: [0.01, true]}\n",
     "'learning_rate.sweep' holds True, not a number"),
    ("budgets: [2.0e11]\nsizes: [{name: a, budgets: [2.0e11, x]}, b, c]\n",
     "'sizes[0].budgets' holds 'x', not a number"),
    ("budgets: [2.0e11]\nsizes: [a, b, {name: c, budgets: 2.0e11}]\n", "'sizes[2].budgets' must be a non-empty list"),
    ("steps: [5]\nprobe: 'no'\n", "'probe' must be true or false, got 'no'"),  # bool('no') is True: it probed
    ("steps: [5]\nprobe: 1\n", "'probe' must be true or false, got 1"),
    ("steps: [5]\nlearning_rate: {rule: inverse_width, base_width: true}\n", "needs base_width, a positive integer "
                                                                               "(the embed_dim whose lr the sweep "
                                                                               "sets), got True"),
    ("steps: [5]\ncluster: {gpus_per_node: true}\n", "cluster.gpus_per_node must be a positive integer, got True"),
    ("steps: [5]\ncluster: {max_nodes: 2.5}\n", "cluster.max_nodes must be a positive integer, got 2.5"),
    ("steps: [5]\ntrain_samples: true\n", "train_samples must be a positive integer, got True"),
])
def test_mistyped_spec_values_are_refused_naming_the_file_and_key(tmp_path, extra, message):
    """A true where a count goes was taken as 1, a quoted 'no' as true; a scalar where a list goes, or a word in
    one, was a traceback. Each is now one ConfigError naming the spec file and the key."""
    import re

    path = tmp_path / "spec.yaml"
    text = BASE + extra
    if "sizes: " in extra:
        text = text.replace("sizes: [tiny]\n", "")
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        load_spec(path)


def test_lr_rule_overrides_and_record():
    rule = LearningRateRule("inverse_width", 16, (0.01, 0.03))
    assert rule.overrides(0.03) == ["optim.base_learning_rate=0.03", "optim.width_lr_base=16"]
    assert "16/embed_dim" in rule.describe(0.03) and "base lr 0.03" in rule.describe(0.03)
    assert LearningRateRule().overrides(None) == []


@pytest.mark.parametrize("batch, gpus, nodes, expected", [
    (2048, 8, 32, (32, 8)),   # 8 per GPU on 256 GPUs
    (2048, 8, 16, (16, 8)),   # capped by max_nodes
    (96, 8, 16, (6, 8)),      # 2 per GPU on 48 GPUs
    (8, 4, 2, (1, 4)),        # fewer images than a node's GPUs x 2: one node of 4, micro 2
    (6, 8, 4, (1, 3)),        # an odd share per GPU is never chosen
    (2, 8, 4, (1, 1)),
])
def test_world_size_follows_the_global_batch(batch, gpus, nodes, expected):
    found = cluster_shape(batch, gpus, nodes)
    assert found == expected and batch % (2 * found[0] * found[1]) == 0


WINDOWED = """name: window
profile: tiny
shards: s
data_fractions: [1]
budgets: [1.0e11, 4.0e11]
seeds: [0, 1]
set: ["model.img_size=64", "model.window_size=[8, 8, 4, 2]"]
sizes:
  - {name: w4, model: {embed_dim: 4, num_heads: [1, 1, 1, 1], decoder_dim: 4, decoder_heads: 1}, budgets: [1.0e11]}
  - {name: w8, model: {embed_dim: 8, num_heads: [1, 1, 2, 4], decoder_dim: 8, decoder_heads: 1}}
  - {name: w12, model: {embed_dim: 12, num_heads: [1, 2, 4, 4], decoder_dim: 12, decoder_heads: 1}}
  - {name: w16, model: {embed_dim: 16, num_heads: [1, 2, 4, 8], decoder_dim: 16, decoder_heads: 1}, budgets: [4.0e11]}
"""


def test_a_size_trains_only_on_its_own_budgets(tmp_path):
    """Hoffmann et al. slide the window of sizes with the budget: the smallest model's largest-budget run is the
    slowest of a sweep and says nothing about the optimum there."""
    from mixmae_scale.scaling.spec import expand

    path = tmp_path / "spec.yaml"
    path.write_text(WINDOWED)
    runs = expand(load_spec(path), train_samples=2560)
    by_budget = {b: sorted({r.size for r in runs if r.budget == b}) for b in (1e11, 4e11)}
    assert by_budget == {1e11: ["w12", "w4", "w8"], 4e11: ["w12", "w16", "w8"]}
    assert len(runs) == 12  # 3 sizes x 2 budgets x 2 seeds


@pytest.mark.parametrize("edit, message", [
    (("budgets: [1.0e11]}", "budgets: [2.0e11]}"), "drawn from the spec's budgets"),
    (("budgets: [4.0e11]}", "budgets: [1.0e11]}"), "budget 4e\\+11 has 2 size"),
    (("budgets: [1.0e11, 4.0e11]", "steps: [5]"), "per-size budgets belong to an iso-FLOP design"),
])
def test_bad_size_budgets_are_refused(tmp_path, edit, message):
    path = tmp_path / "spec.yaml"
    path.write_text(WINDOWED.replace(*edit))
    with pytest.raises(ConfigError, match=message):
        load_spec(path)


def test_spec_paths_are_relative_to_the_spec_file_wherever_the_command_runs(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "profile.yaml").write_text("model: {size: tiny}\n")
    path = folder / "spec.yaml"
    text = BASE.replace("shards: s", "shards: ../data/shards").replace("profile: tiny", "profile: profile.yaml")
    path.write_text(text + "steps: [5]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_spec("../study/spec.yaml")
    assert spec.shards == str(tmp_path / "data" / "shards") and spec.profile == str(folder / "profile.yaml")
    with pytest.raises(ConfigError, match=f"sweep spec nothere.yaml: not found \\(tried {elsewhere / 'nothere.yaml'}"):
        load_spec("nothere.yaml")
    # README's example lives in the repository's docs/, which a pip install lacks: the message says where a spec comes
    # from (wheel-journey finding: `mixmae scaling plan docs/scaling-example/sweep.yaml` from a wheel install)
    with pytest.raises(ConfigError) as missing:
        load_spec("docs/scaling-example/sweep.yaml")
    assert str(missing.value).endswith(
        ": write a spec of your own (its keys: docs/scaling.md, 'The spec'), or copy docs/scaling-example/sweep.yaml "
        "from the repository: a pip install has no docs/ folder")


def test_scaling_plan_plans_without_the_shards_when_the_count_is_given_or_recorded(tmp_path, capsys):
    from mixmae_scale.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(BASE + "steps: [5]\n")  # shards: s, which does not exist
    assert main(["scaling", "plan", str(path)]) == 2
    error = capsys.readouterr().err
    assert f"shards folder {tmp_path / 's'} does not exist" in error and "--train-samples N" in error
    assert main(["scaling", "plan", str(path), "--train-samples", "320"]) == 0
    assert "\n1 run, " in capsys.readouterr().out
    path.write_text(BASE + "steps: [5]\ntrain_samples: 320\n")
    assert main(["scaling", "plan", str(path)]) == 0
    assert "tiny-d1-s5-seed0" in capsys.readouterr().out


def test_a_spec_mixes_shard_sets_and_each_data_fraction_subsets_every_set(demo_shards, tmp_path):
    """`sources:` trains every run on a mixture (data.sources): paths beside the spec, s3:// kept; a data fraction
    takes that share of each set's shards (pointing into them, nothing copied), and an epoch's samples count each
    set by its weight. A fraction whole shards of one of the sets miss by more than 10% is refused."""
    import json
    import re

    from mixmae_scale.data.manifest import load_split
    from mixmae_scale.scaling.subsets import data_read, run_data

    (tmp_path / "sets").mkdir()
    spec_path = tmp_path / "sets" / "spec.yaml"
    spec_path.write_text(BASE.replace("shards: s", f"shards: {demo_shards}") + "steps: [2]\n"
                         f"sources: [{{shards: {demo_shards}, weight: 2}}, {{shards: ../demo, split: val}}]\n")
    with pytest.raises(ConfigError, match="sources weight must be a positive number"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(BASE + "steps: [2]\nsources: [{shards: a, weight: -1}]\n")
        load_spec(bad)
    spec = load_spec(spec_path)
    assert spec.sources[1] == {"shards": str(tmp_path / "demo"), "weight": 1.0, "split": "val"}
    spec.sources[1]["shards"] = str(demo_shards)  # the val split of the same demo set, as the second source
    sets, samples = run_data(spec, 1.0, tmp_path / "out")
    mixture = json.loads(sets[1].split("=", 1)[1])
    assert sets[1].startswith("data.sources=") and [m["weight"] for m in mixture] == [2.0, 1.0]
    train, val = (load_split(m["shards"], "train") for m in mixture)  # the val source's split trains as "train"
    assert len(train.names) == 5 and len(val.names) == 2 and samples == 2 * 300 + 80
    # 0.6 of each set: 3 of the train split's 5 shards (192 of 300 samples), but both of val's 2 (64 + 16): refused
    with pytest.raises(ConfigError, match=re.escape(f"data_fractions 0.6 of {demo_shards} ('val': 2 shards, 80 "
                                                    "samples) is 2 whole shards, 80 samples: 1 of the set")):
        run_data(spec, 0.6, tmp_path / "out")
    spec.sources[1] = {"shards": str(demo_shards), "weight": 1.0}  # its train split: 3 of 5 shards, as the first
    sets, samples = run_data(spec, 0.6, tmp_path / "out")
    train, again = (load_split(m["shards"], "train") for m in json.loads(sets[1].split("=", 1)[1]))
    assert len(train.names) == len(again.names) == 3 and samples == 2 * train.samples + again.samples == 3 * 192
    assert train.tar_url(0) == str(demo_shards / load_split(demo_shards, "train").names[0])
    read = data_read(spec, 0.6, tmp_path / "out")
    assert (read["data_fraction_read"], read["train_samples_read"]) == (0.64, 576)
    assert [re.sub("[0-9a-f]{12}$", "*", name) for name in read["data_subsets"]] == [
        "data/fraction-0.6-*", "data/source0/fraction-0.6-*", "data/source1/fraction-0.6-*"]
    s3 = tmp_path / "s3.yaml"
    s3.write_text(BASE + "steps: [2]\nsources: [{shards: s3://bucket/set}]\n")
    assert load_spec(s3).sources[0]["shards"] == "s3://bucket/set"


def test_runs_sharing_one_gpu_are_checked_against_its_memory(monkeypatch):
    """`scaling run --parallel P` on a GPU: P workers, each a CUDA context with the largest run's planned peak."""
    import torch

    from mixmae_scale.config import ConfigError
    from mixmae_scale.scaling import in_process
    from mixmae_scale.scaling.spec import PlannedRun

    assert in_process.runs_that_fit(2.51, 139.8) == 41 and in_process.runs_that_fit(3.0, 8.0) == 2
    run = PlannedRun("w8-C1e+12-seed0", "w8", 1.0, 10, 0, (), 108_224, 5120, 1e12, 1e12, 512)
    cpu = in_process.device_share(None, [run], parallel=2, per_process=5, cpu_count=16)
    assert cpu.describe() == "2 runs at a time share 16 CPU cores, 8 threads each; up to 5 runs per process"

    class Card:
        total_memory = 8 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Card())
    monkeypatch.setattr(in_process, "planned_peak_gib", lambda spec, run, device_gib: 3.0)
    gpu = in_process.device_share(None, [run], parallel=2, per_process=1, cpu_count=16)
    assert gpu.describe() == ("2 runs at a time share cuda:0 (8.0 GiB); the largest run's planned peak is 3.00 GiB, "
                              "2 x that fits; one process per run")
    with pytest.raises(ConfigError, match=r"--parallel 3: 3 runs of up to 3.00 GiB each .* do not fit in 8.0 GiB "
                                          r"with 25% kept free; use --parallel 2 or fewer"):
        in_process.device_share(None, [run], parallel=3, per_process=1, cpu_count=16)


def test_the_gpu_study_spec_has_two_decades_five_sizes_per_budget_two_seeds_and_the_width_lr_rule():
    from pathlib import Path

    from mixmae_scale.scaling.spec import load_spec, size_trains_on

    spec = load_spec(Path(__file__).resolve().parents[2] / "docs" / "scaling-example" / "gpu-iso-flop" / "sweep.yaml")
    assert max(spec.budgets) / min(spec.budgets) >= 100 and spec.seeds == [0, 1]
    assert all(sum(size_trains_on(s, b) for s in spec.sizes) >= 5 for b in spec.budgets)
    assert spec.learning_rate.rule == "inverse_width"


def test_emitted_lines_for_runs_on_several_nodes_carry_the_specs_cluster_file_and_are_refused_without_one(
        tmp_path):
    """`mixmae launch` refuses more than one node without a cluster file, so lines without it were all refused
    (the docs' own example: global batch 32 spread over 2 nodes of 8 GPUs). Each line names the data once."""
    from mixmae_scale.scaling.run import run_sweep

    path = tmp_path / "spec.yaml"
    path.write_text(BASE + "steps: [5]\ntrain_samples: 320\nset: ['batch.global_batch=32']\n")
    with pytest.raises(ConfigError, match="over 2 nodes.*cluster: {file: cluster.yaml}.*max_nodes: 1"):
        run_sweep(load_spec(path), tmp_path / "out", emit_commands=tmp_path / "lines.sh", log=lambda *_: None)
    assert not (tmp_path / "lines.sh").exists()
    path.write_text(path.read_text() + "cluster: {file: clusters/gpu.yaml}\n")
    run_sweep(load_spec(path), tmp_path / "out", emit_commands=tmp_path / "lines.sh", log=lambda *_: None)
    line = next(x for x in (tmp_path / "lines.sh").read_text().splitlines() if x.startswith("mixmae launch"))
    assert line.startswith(f"mixmae launch tiny --cluster {tmp_path / 'clusters' / 'gpu.yaml'} --set ")
    assert "cluster.num_nodes=2" in line and line.count("data.shards=") == 1


THREE = """name: three
profile: tiny
shards: s
train_samples: 2560
data_fractions: [1]
set: ["model.img_size=64", "model.window_size=[8, 8, 4, 2]"]
sizes:
  - {name: w4, model: {embed_dim: 4, num_heads: [1, 1, 1, 1], decoder_dim: 4, decoder_heads: 1}}
  - {name: w8, model: {embed_dim: 8, num_heads: [1, 1, 2, 4], decoder_dim: 8, decoder_heads: 1}}
  - {name: w12, model: {embed_dim: 12, num_heads: [1, 2, 4, 4], decoder_dim: 12, decoder_heads: 1}}
"""


@pytest.mark.parametrize("extra, message", [
    ("budgets: [1.0e11, 1.0e11]\n", "'budgets' repeats 100000000000.0"),
    ("budgets: [1.0e11]\nseeds: [0, 1, 0]\n", "'seeds' repeats 0"),
    ("steps: [5, 5]\n", "'steps' repeats 5"),
    ("epochs: [0.5, 0.5]\n", "'epochs' repeats 0.5"),
    ("steps: [5]\ndata_fractions: [0.5, 0.5]\n", "'data_fractions' repeats 0.5"),
    ("budgets: [1.0e11]\nlearning_rate: {sweep: [0.01, 0.01]}\n", "'learning_rate.sweep' repeats 0.01"),
    # an iso-FLOP id names no fraction, and its fit would pool the two fractions' runs as seeds of one point
    ("budgets: [1.0e11]\ndata_fractions: [0.5, 1.0]\n", "data_fractions [0.5, 1.0]: an iso-FLOP design (budgets) "
                                                       "takes one data fraction"),
])
def test_entries_that_plan_one_run_twice_are_refused_when_the_spec_is_read(tmp_path, extra, message):
    """Each gave two planned runs one run id: the second was skipped as done earlier (the study silently one run
    short) or, running side by side, both wrote into one folder."""
    import re

    path = tmp_path / "spec.yaml"
    path.write_text(THREE.replace("data_fractions: [1]\n", "") + ("" if "data_fractions" in extra else
                                                                  "data_fractions: [1]\n") + extra)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_spec(path)
    path.write_text(WINDOWED.replace("budgets: [1.0e11]}", "budgets: [1.0e11, 1.0e11]}"))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: 'sizes[0].budgets' repeats 100000000000.0")):
        load_spec(path)


@pytest.mark.parametrize("extra, message", [
    ("budgets: [1.0e11, 1.0004e11]\n", "budgets 100000000000.0 and 100040000000.0 give the same run id "
                                        "w4-C1e+11-seed0"),
    ("epochs: [1.0, 1.01]\n", "epochs 1.0 and 1.01 give the same run id w4-d1-s80-seed0"),
    ("steps: [5]\ndata_fractions: [0.5, 0.5000001]\n", "data_fractions 0.5 and 0.5000001 give the same run id "
                                                      "w4-d0.5-s5-seed0"),
])
def test_distinct_entries_that_print_as_one_run_id_are_refused_when_planned(tmp_path, extra, message):
    """An id shows a budget to 3 significant digits and a fraction to 6; two epochs can come to the same steps."""
    import re

    from mixmae_scale.scaling.spec import expand

    path = tmp_path / "spec.yaml"
    path.write_text(THREE.replace("data_fractions: [1]\n", "") + ("" if "data_fractions" in extra else
                                                                  "data_fractions: [1]\n") + extra)
    spec = load_spec(path)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        expand(spec, 2560)


def test_lr_sweep_values_that_print_as_one_run_id_are_refused(tmp_path):
    import re

    from mixmae_scale.scaling.run import sweep_runs

    path = tmp_path / "spec.yaml"
    path.write_text(THREE + "budgets: [1.0e11]\nlearning_rate: {sweep: [0.001, 0.0010000001]}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: learning_rate.sweep values [0.001, 0.0010000001] give "
                                                    "the run id lr0.001-w4-C1e+11-seed0 twice")):
        sweep_runs(load_spec(path), 2560)


def test_iso_flop_runs_whose_whole_steps_miss_their_budget_are_said_by_plan_and_refused_by_run(tmp_path, capsys):
    """At a budget of 3 of w8's steps, w12 (a step costs about 1.95 of w8's) took 2 steps, 1.30x its budget, and w8
    3 steps: both were planned and run without a word, w12's point in the budget's parabola at another compute."""
    import re

    from mixmae_scale.cli import main
    from mixmae_scale.scaling.run import run_sweep
    from mixmae_scale.scaling.spec import budget_problems, expand

    path = tmp_path / "spec.yaml"
    path.write_text(THREE + "budgets: [1.0e11]\n")
    step = {r.size: r.flops / r.steps for r in expand(load_spec(path), 2560)}
    budget = 3 * step["w8"]
    path.write_text(THREE + f"budgets: [{budget!r}]\n")
    runs = {r.size: r for r in expand(load_spec(path), 2560)}
    ratio = 2 * step["w12"] / budget
    assert runs["w12"].steps == 2 and abs(ratio - 1) > 0.05 and runs["w8"].steps == 3
    off, few = budget_problems(list(runs.values()))
    w12 = (f"{runs['w12'].run_id} (size w12 at budget {budget:.3g}): 2 steps of {step['w12']:.3g} FLOPs spend "
           f"{ratio:.2f}x the budget")
    assert off == [w12]
    assert f"{runs['w8'].run_id} (size w8 at budget {budget:.3g}): 3 steps of {step['w8']:.3g} FLOPs spend 1.00x " \
           "the budget, in fewer than 10 steps" in few
    assert main(["scaling", "plan", str(path)]) == 0  # the table, and what is wrong with it
    err = capsys.readouterr().err
    assert f"warning: {w12}: more than 5% off; `mixmae scaling run` refuses it" in err
    with pytest.raises(ConfigError, match=re.escape(f"{path}: 1 iso-FLOP run would spend more than 5% off "
                                                    "their budget in whole steps: ") + ".*" + re.escape(w12)):
        run_sweep(load_spec(path), tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()  # refused before anything ran or was written


def test_the_shipped_example_specs_plan_every_run_within_its_budget():
    from pathlib import Path

    from mixmae_scale.scaling.spec import budget_problems, expand

    examples = Path(__file__).resolve().parents[2] / "docs" / "scaling-example"
    for path in sorted(examples.rglob("sweep.yaml")):
        spec = load_spec(path)
        assert budget_problems(expand(spec, spec.train_samples_for_plan())) == ([], []), path


@pytest.mark.parametrize("extra, message", [
    # NaN passed `b <= 0` and came out of `expand` as "cannot convert float NaN to integer"; inf as an OverflowError
    # traceback; a NaN lr was planned; a value below zero was refused as "steps, epochs and budgets must be positive",
    # naming neither the key nor the value
    ("budgets: [.nan, 1.0e11]\n", "'budgets' holds nan: each must be a finite number above zero"),
    ("budgets: [1.0e11, .inf]\n", "'budgets' holds inf: each must be a finite number above zero"),
    ("epochs: [.inf]\n", "'epochs' holds inf: each must be a finite number above zero"),
    ("budgets: [1.0e11]\nlearning_rate: {sweep: [0.01, .nan]}\n",
     "'learning_rate.sweep' holds nan: each must be a finite number above zero"),
    ("budgets: [-1.0e11, 1.0e11]\n", "'budgets' holds -100000000000.0: each must be a finite number above zero"),
    ("steps: [5, 0]\n", "'steps' holds 0: each must be a finite number above zero"),
])
def test_values_no_run_can_take_are_refused_naming_the_key_and_the_value(tmp_path, extra, message):
    import re

    path = tmp_path / "spec.yaml"
    path.write_text(THREE + extra)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_spec(path)


def test_two_sizes_of_one_model_are_refused_when_planned_naming_both(tmp_path):
    """w8 and w8b were one model under two names: `load_spec` counted 3 sizes per budget, the runs ran, and the
    iso-FLOP fit, which tells sizes by N, found 2 per budget and left every budget out after the compute was spent."""
    import re

    from mixmae_scale.scaling.spec import expand

    path = tmp_path / "spec.yaml"
    path.write_text(THREE + "  - {name: w8b, model: {decoder_heads: 1, decoder_dim: 8, num_heads: [1, 1, 2, 4], "
                            "embed_dim: 8}}\nbudgets: [1.0e11]\n")
    spec = load_spec(path)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: sizes w8 and w8b give the same model")):
        expand(spec, 2560)


def test_a_size_whose_model_the_config_refuses_is_named_with_the_spec(tmp_path):
    """An unknown named size (`sizes: [giant]`) was refused as "'model.size' must be one of ...", naming neither the
    spec file nor which of its sizes."""
    import re

    from mixmae_scale.scaling.spec import expand

    path = tmp_path / "spec.yaml"
    path.write_text(THREE + "  - giant\nbudgets: [1.0e11]\n")
    spec = load_spec(path)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: sizes[3] (giant): ") + ".*'model.size' must be one of"):
        expand(spec, 2560)


@pytest.mark.parametrize("where", ["gone", "folder"])
def test_a_plan_whose_spec_cannot_be_read_here_says_the_changed_spec_check_was_not_made(tmp_path, where):
    """A sweep folder copied from another machine names a spec path that is not there (or is no file here): the fit
    cannot tell whether the spec changed since its plan was recorded, and said nothing of it."""
    import json

    from mixmae_scale.scaling.sweep_plan import FORMAT, PLAN, rows_of_plan

    spec = tmp_path / "elsewhere" / "sweep.yaml"
    if where == "folder":
        spec.mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / PLAN).write_text(json.dumps({"format": FORMAT, "sweep": "s", "spec": str(spec), "spec_sha256": "ab" * 32,
                                        "runs": ["w8-C2e+10-seed0"]}))
    selection = rows_of_plan([{"run_id": "w8-C2e+10-seed0"}], out)
    said = [w for w in selection.warnings if str(spec) in w]
    assert len(said) == 1 and "cannot be read here" in said[0] and "not checked" in said[0]
    assert str(out / PLAN) in said[0]
    (out / PLAN).write_text(json.dumps({"format": FORMAT, "sweep": "s", "spec": None, "spec_sha256": None,
                                        "runs": ["w8-C2e+10-seed0"]}))
    assert rows_of_plan([{"run_id": "w8-C2e+10-seed0"}], out).warnings == []  # no spec recorded: nothing to say
