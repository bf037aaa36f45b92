"""The pieces of one optimizer step the loop (engine/loop.py) decides with: the agreed read of a micro-step
(finite? stop?), what an attempt at a step came to (`StepOutcome`), and the running loss and throughput between
two logged steps. Whether a checkpoint follows an attempt is the checkpointer's decision
(engine/checkpointing/checkpointer.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mixmae_scale.engine.monitor import Throughput

SIGNAL = "signal"  # a stop asked for by SIGTERM/SIGUSR1 or a vanished launcher (engine/preemption.py)


@dataclass(frozen=True)
class StepOutcome:
    """What one attempt at an optimizer step came to, the same on every rank.

    `applied`: DeepSpeed applied the update, so the step counts; otherwise its gradients were non-finite and the
    step is redone with the next data. `stop`: why the run stops at this boundary (`SIGNAL`), or None."""

    applied: bool
    stop: str | None = None
    seconds: float = 0.0

    @classmethod
    def of(cls, applied: bool, stop_votes: int, seconds: float = 0.0) -> StepOutcome:
        """Any rank asking to stop stops every rank (the votes are all-reduced)."""
        return cls(applied, SIGNAL if stop_votes > 0 else None, seconds)


def step_decision(loss: torch.Tensor, stop_requested: bool) -> tuple[int, int]:
    """(ranks whose loss is non-finite, ranks asking to stop), agreed by every rank: the one host read of a
    micro-step. Both flags are made on the loss's device and reduced in a single collective.

    The read comes before the backward because a non-finite micro-batch must be kept out of the gradients:
    none of DeepSpeed's engines (ZeRO 0-3, fp32/bf16/fp16) can take one out of an accumulated gradient
    afterwards. With accumulation 1 (the at-scale profiles) that is one read per optimizer step for the
    loss's finiteness and the stop flag together; the running loss is read only when logged."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).to(torch.float32),
                         loss.new_full((), float(stop_requested), dtype=torch.float32)])
    if dist.get_world_size() > 1:  # alone (a sweep's runs, the demo) there is nobody to agree with
        dist.all_reduce(flags)  # on the loss's device: NCCL's on GPUs, gloo's on CPUs (engine/distributed.py)
    nonfinite, stop_votes = flags.tolist()
    return int(nonfinite), int(stop_votes)


@dataclass
class LogWindow:
    """The steps since the last logged one: images, data wait and the loss sum, which stays on the device and
    is read once per logging interval (a read per step would wait for the device every step)."""

    loss_sum: torch.Tensor
    loss_count: int = 0
    throughput: Throughput = field(default_factory=Throughput)

    @classmethod
    def on(cls, device: torch.device) -> LogWindow:
        return cls(torch.zeros((), device=device))

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.detach().float()
        self.loss_count += 1
        self.throughput.images += images

    def reset(self) -> None:
        self.throughput.reset()
        self.loss_sum.zero_()
        self.loss_count = 0


def keep_skipping_at_the_minimum_loss_scale(engine) -> None:
    """fp16: DeepSpeed's ZeRO optimizers raise a bare Exception on an overflow at the minimum loss scale, which
    ends the run with a traceback and no checkpoint; ZeRO-0's optimizer skips on at that scale forever. Both
    skip instead, and skips at the minimum count toward faults.nonfinite_skip_limit (`at_the_minimum_loss_scale`),
    so that persistent overflow ends as any non-finite run does: with a stop checkpoint a rerun rolls back from.
    Set after a resume too: a ZeRO checkpoint brings its own pickled scaler."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if getattr(scaler, "raise_error_at_min_scale", False):
        scaler.raise_error_at_min_scale = False


def at_the_minimum_loss_scale(engine) -> bool:
    """fp16 skips below it are the loss scaler's search (hundreds of them are normal over a run); at it, the
    gradients overflow whatever the scale: the data or the weights are bad."""
    from mixmae_scale.config.deepspeed_config import MIN_LOSS_SCALE

    scale = fp16_loss_scale(engine)
    return scale is not None and scale <= MIN_LOSS_SCALE


def fp16_loss_scale(engine) -> float | None:
    """DeepSpeed's dynamic loss scale: `loss_scale` on the ZeRO optimizers, `cur_scale` on the stage-0 one."""
    optimizer = engine.optimizer
    scale = getattr(optimizer, "loss_scale", None) or getattr(optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None
