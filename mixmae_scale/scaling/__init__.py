"""Scaling-law experiments: fit (L(C) and L(N, D) laws, bootstrap intervals, compute-optimal sizes).
The sweep spec, runner and report are still to come (issue 9)."""
