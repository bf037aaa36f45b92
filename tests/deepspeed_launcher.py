"""How tests start ranks through DeepSpeed's launcher.

On one host, DeepSpeed's runner (the `deepspeed` command) resolves the GPUs, then starts its per-node launcher,
`python -u -m deepspeed.launcher.launch --world_info=<b64> --master_addr=... --master_port=...`, which starts and
watches the ranks (environment, --local_rank, killing the others when one fails). Tests whose subject is not the
runner start that per-node launcher directly, with the arguments the runner gives it: the runner's own start-up
(importing torch and DeepSpeed before launch.py does it again) took 3.5-4 s per launch on a 2-core machine (a
2-rank launch of /bin/true: 7.3-7.8 s through `deepspeed`, 3.5-4.2 s through launch.py). Tests of the runner
itself (signals to it, a failing rank, two launchers as two hosts, the
wheel, the quickstart, the Slurm relay) start `deepspeed`.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path


def launcher(ranks: int, port: int, runner: bool = False) -> list[str]:
    """The command up to the script: `deepspeed --num_gpus N` (runner) or the launch.py line it would run."""
    if runner:
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port)]
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(ranks))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
            "--master_addr=127.0.0.1", f"--master_port={port}"]


def deepspeed_would_start(runner_args: list[str], monkeypatch) -> list[str]:
    """The command DeepSpeed's runner `main` would start for `runner_args` (what follows `deepspeed`): its own
    validation runs (include/exclude against --num_nodes/--num_gpus, its backends' rules, the hostfile), its ssh
    check and the start of the backend are replaced, so no rank starts."""
    import deepspeed.launcher.runner as runner

    started = []

    class Started:
        returncode = 0

        def __init__(self, cmd, env=None):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", Started)
    monkeypatch.setattr(runner.subprocess, "check_call", lambda *a, **k: 0)
    for backend in (runner.PDSHRunner, runner.OpenMPIRunner):
        monkeypatch.setattr(backend, "backend_exists", lambda self: True)
    runner.main(runner_args)
    return started[0]
