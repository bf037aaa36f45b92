"""After a crash, the steps replayed from the checkpoint must not be logged twice."""

from __future__ import annotations

import json

from mixmae_scale.engine.monitor import MetricsLog, drop_rows_after


def test_rows_past_the_resumed_step_are_dropped_from_csv_and_jsonl(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    for step in range(1, 9):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"step": s, "top1": s}) + "\n" for s in (2, 4, 6, 8)))
    assert drop_rows_after(tmp_path / "metrics.csv", 6) == 2
    assert drop_rows_after(tmp_path / "eval.jsonl", 6) == 1
    log = MetricsLog(tmp_path / "metrics.csv")  # the resumed run appends from step 7
    log.write({"step": 7, "loss": 0.5})
    log.close()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,") and [int(x.split(",")[0]) for x in lines[1:]] == [1, 2, 3, 4, 5, 6, 7]
    assert [json.loads(x)["step"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [2, 4, 6]
    assert drop_rows_after(tmp_path / "missing.csv", 3) == 0


def test_a_process_killed_before_its_first_row_leaves_a_header_the_next_launch_keeps(tmp_path):
    """The header was buffered until the first row: a rank 0 killed in between (the held-out pass, compiling) left
    metrics.csv at 0 bytes, the next launch saw a file and wrote rows without a header, and the first row was read
    as the header (a later resume then kept one row)."""
    import csv
    import subprocess
    import sys

    path = tmp_path / "metrics.csv"
    subprocess.run([sys.executable, "-c", "import os\nfrom pathlib import Path\n"
                    "from mixmae_scale.engine.monitor import MetricsLog\n"
                    f"MetricsLog(Path({str(path)!r}))\nos._exit(9)"], check=False)  # killed: nothing flushed at exit
    assert path.read_text().startswith("step,")
    path.write_text("")  # what a kill left before this fix: an empty file
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0})
    log.close()
    assert drop_rows_after(path, 2) == 1
    assert [int(row["step"]) for row in csv.DictReader(path.open())] == [1, 2]
