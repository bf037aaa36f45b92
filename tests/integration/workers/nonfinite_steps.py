"""Run by test_faults.py in a fresh process (a world of one, gloo): for each ZeRO stage and precision given, one
step with NaN gradients (a finite loss) and one clean step through the real DeepSpeed engine; prints JSON lines."""

from __future__ import annotations

import json
import os
import socket
import sys

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
for case in sys.argv[1:]:
    stage, dtype = int(case.split(":")[0]), case.split(":")[1]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    optimizer = adamw([{"params": list(model.parameters()), "weight_decay": 0.0}], OptimConfig(), 1e-2, False,
                      False, stage)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": dtype == "bf16"}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x = torch.randn(4, 16).to(next(engine.module.parameters()).dtype)
    faults = FaultConfig(inject_nan_grad_at_batches=[0])
    results = {}
    params = list(engine.module.parameters())

    def weights(params=params, stage=stage) -> list[torch.Tensor]:  # ZeRO-3 partitions: gather whole tensors
        if stage != 3:
            return [p.detach().float().clone() for p in params]
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]

    for index in (0, 1):  # 0: NaN gradients, 1: a clean step
        before = weights()
        loss = injected_loss(engine(x).float().pow(2).mean(), index, faults)
        engine.backward(loss)
        engine.step()
        after = weights()
        results[index] = {"loss_finite": bool(torch.isfinite(loss)), "applied": engine.was_step_applied(),
                          "weights_changed": any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)),
                          "weights_finite": all(bool(torch.isfinite(a).all()) for a in after)}
    print(json.dumps({"stage": stage, "dtype": dtype, "nan_grad_step": results[0], "clean_step": results[1]}),
          flush=True)
