"""Scaling-law experiments: a sweep spec (spec.py) run locally (run.py: what is there already read back by
recorded.py, runs side by side by workers.py, several per process where they are small: in_process.py), or emitted
as launch commands (commands.py); laws fitted with bootstrap intervals (fit.py,
isoflop.py, intervals.py) and a report that says what the runs can and cannot identify (report.py)."""
