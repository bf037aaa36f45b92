"""Messages that count shards, runs or images say "1 shard" and "2 shards", never "1 shard(s)": data/errors.py's
`plural`, used where the count is printed. A tiny set or a one-run sweep is where these lines are read first."""

from __future__ import annotations

import re
from pathlib import Path

from mixmae_scale.data.manifest import _not_a_shard_set
from mixmae_scale.scaling.in_process import DeviceShare
from mixmae_scale.shards.saved_plan import SourceChanges


def test_the_device_share_counts_runs_and_threads():
    one = DeviceShare("2 CPU cores", parallel=1, per_process=1, threads=1).describe()
    assert one == "1 run at a time shares 2 CPU cores, 1 thread each; one process per run"
    two = DeviceShare("2 CPU cores", parallel=2, per_process=1, threads=2).describe()
    assert two == "2 runs at a time share 2 CPU cores, 2 threads each; one process per run"


def test_a_changed_source_counts_files_and_extra_shards():
    one = SourceChanges(["a.jpg"], ["new.jpg"], ["train-000008"]).describe("train")
    assert "1 planned file vanished (first: a.jpg)" in one
    assert "1 new file (first: new.jpg) goes to 1 extra shard after the planned ones (train-000008)" in one
    two = SourceChanges(["a.jpg", "b.jpg"], ["new.jpg", "z.jpg"], ["train-000008", "train-000009"]).describe("train")
    assert "2 planned files vanished (first: a.jpg)" in two
    assert "2 new files (first: new.jpg) go to 2 extra shards after the planned ones (train-000008..train-000009)" \
        in two


def test_a_folder_of_images_is_counted_in_images(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.jpg").write_bytes(b"")
    assert "it is a folder of 1 image; convert it first" in _not_a_shard_set(one, str(one))
    (one / "b.jpg").write_bytes(b"")
    assert "it is a folder of 2 images; convert it first" in _not_a_shard_set(one, str(one))


BRACKETED_PLURAL = re.compile(r"[a-z]\((?:s|es|ies)\)", re.IGNORECASE)  # shard(s), match(es), entr(ies)
ROOT = Path(__file__).resolve().parents[2]


def _literal_text(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each string literal of a module: an f-string without its replacement fields, where
    `{len(s)}` is code, not a plural (Python 3.12 and later hand over the literal parts alone)."""
    import io
    import tokenize

    parts = (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING))
    found = []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type not in parts:
            continue
        text = token.string
        if token.type == tokenize.STRING and "f" in text[:text.index(text[-1])].lower():
            while re.search(r"\{[^{}]*\}", text):
                text = re.sub(r"\{[^{}]*\}", "", text)
        found.append((token.start[0], text))
    return found


def test_no_module_writes_a_counted_noun_with_a_plural_ending_in_brackets():
    """`mixmae launch --dry-run` printed "1 node(s) x 1 GPU(s)" and "1 step(s)" on every launch, `mixmae plan`
    "1 GPU(s)", a conversion "holds split(s) adopted" for one split: their strings now count with `plural`. Read
    from every module's string literals (f-strings included) and from the shell scripts the package ships, so that a
    new one is caught where it is written."""
    import mixmae_scale

    package = Path(mixmae_scale.__file__).parent
    found = [f"{path.relative_to(package)}:{line}: {text.strip()[:60]}" for path in sorted(package.rglob("*.py"))
             for line, text in _literal_text(path) if BRACKETED_PLURAL.search(text)]
    scripts = sorted((ROOT / "launch").rglob("*.sh")) + sorted((ROOT / "launch").rglob("*.sbatch"))
    assert scripts
    found += [f"{path.relative_to(ROOT)}:{number}: {line.strip()[:60]}" for path in scripts
              for number, line in enumerate(path.read_text().splitlines(), 1) if BRACKETED_PLURAL.search(line)]
    assert found == []


def test_the_scan_sees_a_bracketed_plural_in_text_and_not_in_an_f_strings_code(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('a = f"{plural(len(s), \'shard\')} of {n} match(es)"\nb = "no GPU(s)"\nc = f"{len(s)}"\n')
    assert [line for line, text in _literal_text(module) if BRACKETED_PLURAL.search(text)] == [1, 2]


def test_a_batch_on_one_gpu_is_refused_naming_1_gpu():
    from mixmae_scale.config.derive import too_few_samples

    assert "no global batch fits on 1 GPU: the smallest is 2" in too_few_samples(32, 1, 1, False)
    assert "the largest global batch on 1 GPU is 6" in too_few_samples(32, 7, 1, False)
    assert "the largest global batch on 2 GPUs is 4" in too_few_samples(32, 7, 2, False)


def test_the_plan_of_one_gpu_counts_1_gpu(capsys):
    from mixmae_scale.cli import main

    assert main(["plan", "tiny", "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert " 1 GPU of 80 GB" in out and " x 1 GPU = global batch" in out, out


def test_the_launch_plan_counts_nodes_gpus_and_steps():
    from mixmae_scale.cluster.compose import batch_report
    from mixmae_scale.config import load_resolved

    sets = ["batch.micro=8", "batch.global_batch=8", "cluster.gpus_per_node=1"]
    lines = batch_report(load_resolved("tiny", overrides=sets, world_size=1, train_samples=64))
    assert lines[0].endswith("= 1 node x 1 GPU") and lines[2].endswith(" 1 step")


def test_a_law_short_of_points_and_a_budget_short_of_minima_count_in_words():
    """A one-budget sweep's report read "the runs give 1 compute levels (budgets)", and one interior budget of four
    "1 of 4 budgets have an interior minimum"."""
    from mixmae_scale.scaling.intervals import too_few_points
    from mixmae_scale.scaling.isoflop import fit_iso_flop
    from mixmae_scale.scaling.synthetic import bent_power_law_sweep

    assert too_few_points("L", 1, 3).endswith("the runs give 1 distinct point; it needs at least 4")
    assert too_few_points("L", 2, 3).endswith("the runs give 2 distinct points; it needs at least 4")
    rows = bent_power_law_sweep([1.0, 1.0], budgets=(1e12, 1e13))
    one_budget = [r for r in rows if r["budget"] == 1e12]
    levels = ("compute level (budget)", "compute levels (budgets)")
    assert too_few_points("L", 1, 3, levels).endswith("the runs give 1 compute level (budget); it needs at least 4")
    rising = [r for r in rows if r["budget"] == 1e13 and float(r["run_id"].split("-")[1]) >= 1]  # no interior minimum
    fit = fit_iso_flop(one_budget + rising, bootstrap=0)
    assert fit.n_opt.verdict == "not identified (1 of 2 budgets has an interior minimum; a law needs 3)"


def test_a_resume_on_another_number_of_ranks_counts_them_in_words():
    """A 2 -> 1 and a 1 -> 2 rank resume logged "the 2 saved ones do not share out over 1 ranks", "the 1 saved ones"."""
    from mixmae_scale.engine.checkpointing import checkpointer

    down = checkpointer.reseed_note(9, 2, 1)
    assert "step 9" in down and "2 ranks saved do not share out over 1 rank)" in down
    assert "the generators 1 rank saved do not share out over 2 ranks" in checkpointer.reseed_note(21, 1, 2)


def test_one_tar_offered_for_adoption_is_it_and_two_are_them(tmp_path):
    """'1 .tar file is there (000.tar): `mixmae shards adopt ...` indexes them': the pronoun counts too."""
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "000.tar").write_bytes(b"\0" * 1024)
    one = _not_a_shard_set(tmp_path / "one", str(tmp_path / "one"))
    assert "1 .tar file is there (000.tar)" in one and "indexes it without rewriting" in one, one
    (tmp_path / "one" / "001.tar").write_bytes(b"\0" * 1024)
    two = _not_a_shard_set(tmp_path / "one", str(tmp_path / "one"))
    assert "2 .tar files are there" in two and "indexes them without rewriting" in two, two


def test_one_budget_with_a_size_run_once_is_counted_with_a_singular_verb():
    """"1 of 3 interior budgets have a size run once" read wrong (the known leftover of journey4): the verb agrees
    with the count, 1 has and 2 have; and the plain points' form, "1 of 5 points were run once", too."""
    from mixmae_scale.scaling.intervals import Support, judge
    from mixmae_scale.scaling.isoflop import fit_iso_flop
    from mixmae_scale.scaling.synthetic import bent_power_law_sweep

    rows = bent_power_law_sweep([1.0, 1.0, 1.0])
    one = [r for r in rows if r["run_id"] != "1e+13-1-1"]  # the middle budget's optimum run once
    assert fit_iso_flop(one, bootstrap=20).n_opt.verdict == (
        "not identified (one seed: 1 of 3 interior budgets has a size run once)")
    two = [r for r in one if r["run_id"] != "1e+14-1-1"]
    assert fit_iso_flop(two, bootstrap=20).n_opt.verdict == (
        "not identified (one seed: 2 of 3 interior budgets have a size run once)")
    said = judge({"E": 1.0}, {"E": []}, Support(5, 1, once=1)).verdicts["E"]
    assert said == "not identified (one seed: 1 of 5 points was run once)", said
    said = judge({"E": 1.0}, {"E": []}, Support(5, 1, once=2)).verdicts["E"]
    assert said == "not identified (one seed: 2 of 5 points were run once)", said


def test_scaling_plan_counts_a_one_run_plan_in_the_singular(tmp_path, capsys):
    """`scaling plan` of a one-run grid printed "1 runs, 3.2e+09 training FLOPs in total" (and
    tests/unit/test_scaling_plan.py asserted it)."""
    from mixmae_scale.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text("name: x\nprofile: tiny\nshards: s\nsizes: [tiny]\ndata_fractions: [1]\nsteps: [5]\n")
    assert main(["scaling", "plan", str(path), "--train-samples", "320"]) == 0
    out = capsys.readouterr().out
    assert "\n1 run, " in out and "1 runs" not in out, out


def test_a_one_run_report_counts_its_run_and_its_resample_in_the_singular():
    """A report of one run (a sweep's first row, read early) opened "1 runs; ... Bootstrap: 1 resamples asked for"."""
    from mixmae_scale.scaling.report import fit_results, report_markdown

    rows = [{"run_id": "a", "params": 1000, "images_seen": 100, "flops": 6e5, "heldout_loss": 0.9, "seed": 0}]
    head = report_markdown(rows, fit_results(rows, bootstrap=1), []).splitlines()[2]
    assert head.startswith("1 run; ") and "Bootstrap: 1 resample asked for per fit" in head, head
