"""Run by test_faults.py in fresh processes (gloo): for each case `stage:dtype[:fault]`, one step with non-finite
gradients (a finite loss) and one clean step through the real DeepSpeed engine; prints JSON lines. Faults: `nan`
(every gradient NaN, the default) or `inf-on-rank-1` (one element of one gradient +inf on rank 1 alone: the
other rank's gradients are finite until they are reduced). A world of one unless RANK and WORLD_SIZE are set; with
two, a last line `decision {...}` is each rank's `step_decision` over a NaN loss on rank 1 and a stop on rank 0."""

from __future__ import annotations

import json
import os
import socket
import sys

if "RANK" not in os.environ:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(probe.getsockname()[1]))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from mixmae_scale.config.schema import FaultConfig, OptimConfig  # noqa: E402
from mixmae_scale.engine.distributed import skip_shm_allreduce_op  # noqa: E402
from mixmae_scale.engine.fault_injection import injected_loss  # noqa: E402
from mixmae_scale.engine.optimizer import adamw  # noqa: E402

skip_shm_allreduce_op()  # as a run's ranks do: otherwise DeepSpeed compiles its CPU shm op here (35 s, fresh machine)
deepspeed.init_distributed(dist_backend="gloo")
rank = int(os.environ["RANK"])
for case in sys.argv[1:]:
    stage, dtype, fault = (case.split(":") + ["nan"])[:3]
    stage = int(stage)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    optimizer = adamw([{"params": list(model.parameters()), "weight_decay": 0.0}], OptimConfig(), 1e-2, False,
                      False, stage)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": dtype == "bf16"}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x = torch.randn(4, 16).to(next(engine.module.parameters()).dtype)
    faults = FaultConfig(inject_nan_grad_at_batches=[0] if fault == "nan" else [])
    results = {}
    params = list(engine.module.parameters())

    def weights(params=params, stage=stage) -> list[torch.Tensor]:  # ZeRO-3 partitions: gather whole tensors
        if stage != 3:
            return [p.detach().float().clone() for p in params]
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]

    def one_inf(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[5] = float("inf")
        return grad

    for index in (0, 1):  # 0: non-finite gradients, 1: a clean step
        before = weights()
        loss = injected_loss(engine(x).float().pow(2).mean(), index, faults)
        hook = params[2].register_hook(one_inf) if fault == "inf-on-rank-1" and rank == 1 and index == 0 else None
        engine.backward(loss)
        if hook is not None:
            hook.remove()
        engine.step()
        after = weights()
        results[index] = {"loss_finite": bool(torch.isfinite(loss)), "applied": engine.was_step_applied(),
                          "weights_changed": any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)),
                          "weights_finite": all(bool(torch.isfinite(a).all()) for a in after)}
    digest = float(sum(w.double().sum() for w in weights()))  # the same on every rank after the clean step
    print(json.dumps({"stage": stage, "dtype": dtype, "fault": fault, "rank": rank, "nan_grad_step": results[0],
                      "clean_step": results[1], "weights_sum": digest}), flush=True)

if int(os.environ["WORLD_SIZE"]) > 1:  # the loop's agreed read of a micro-step: a NaN loss on rank 1, a stop on 0
    from mixmae_scale.engine.step import step_decision

    decided = step_decision(torch.tensor(float("nan") if rank == 1 else 1.0), stop_requested=rank == 0)
    print("decision " + json.dumps({"rank": rank, "nonfinite_ranks": decided[0], "stop_votes": decided[1]}),
          flush=True)

# Both ranks leave together, and without the interpreter's teardown: with two ranks, one of them aborted after its
# last row about one time in ten ("terminate called without an active exception": a C++ thread still joinable at
# exit), after everything this worker reports had been printed.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
sys.stdout.flush()
os._exit(0)
