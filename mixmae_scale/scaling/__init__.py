"""Scaling-law experiments: a sweep spec (spec.py) run locally, several runs per process where they are small
(in_process.py), or emitted as launch commands (run.py); laws fitted with bootstrap intervals (fit.py,
isoflop.py, intervals.py) and a report that says what the runs can and cannot identify (report.py)."""
