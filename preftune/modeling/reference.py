"""Where the reference log-probs come from: one small strategy with one method, ``logprobs(batch)``.

| strategy | when | memory |
| --- | --- | --- |
| ``FrozenReference`` | a full fine-tune (a copy of the starting policy), or ``reference.path`` | one more model |
| ``AdaptersOffReference`` | LoRA: the policy itself with its adapters disabled | nothing more |
| ``CachedReference`` | ``reference.mode: precompute``: the batches carry them (``MicroBatch.ref_logps``) | [N, 2] floats |
| ``NoReference`` | reference-free losses (simpo, orpo) | nothing |

Every strategy runs the reference in eval mode, under ``no_grad``, and never gives it gradients or
optimizer state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from preftune.data.batch import MicroBatch
from preftune.modeling.logprobs import SequenceLogprobs
from preftune.modeling.parallel import DistInfo, shard


class Reference(ABC):
    """The reference model's summed response log-probs for a micro-batch."""

    collective = False
    """Whether each forward is a collective every rank must join (an FSDP2-sharded reference)."""
    description = ""
    """What the reference is, for the line the run starts with."""

    @abstractmethod
    def logprobs(self, batch: MicroBatch) -> Tensor | None:
        """[2P] summed response log-probs (chosen of every pair, then rejected), fp32; None: no reference."""

    def to(self, device: torch.device | str) -> Reference:
        return self


class FrozenReference(Reference):
    """A separate frozen model: a copy of the starting policy, or the model at ``reference.path``."""

    def __init__(self, runner: SequenceLogprobs, description: str = "a frozen copy of the policy (online)"):
        runner.model.eval().requires_grad_(False)
        self.runner = runner
        self.description = description

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @torch.no_grad()
    def logprobs(self, batch: MicroBatch) -> Tensor:
        return self.runner(batch)[0].float()

    def to(self, device: torch.device | str) -> FrozenReference:
        self.runner.to(device)
        return self

    def shard(self, info: DistInfo) -> None:
        """FSDP2: shard the reference's weights over the ranks (the dp x cp ranks of a mesh), like the
        policy's; all of them resharded after each forward (it never runs backward)."""
        if info.distributed:
            shard(self.runner, self.runner.model, info.shard_mesh, forward_only=True)
            self.collective = True


class AdaptersOffReference(Reference):
    """The PEFT-wrapped policy with its adapters disabled: the base model, with no second copy of it."""

    description = "the policy with its adapters off (online)"

    def __init__(self, policy_runner: SequenceLogprobs):
        self.policy_runner = policy_runner

    @torch.no_grad()
    def logprobs(self, batch: MicroBatch) -> Tensor:
        policy = self.policy_runner.model
        training = policy.training
        policy.eval()
        try:
            with policy.disable_adapter():
                return self.policy_runner(batch)[0].float()
        finally:
            policy.train(training)


class CachedReference(Reference):
    """``reference.mode: precompute``: the log-probs were computed once and travel in the batches."""

    description = "precomputed log-probs (cached, then the reference model is freed)"

    def logprobs(self, batch: MicroBatch) -> Tensor:
        if batch.ref_logps is None:
            raise ValueError(
                "this micro-batch carries no cached reference log-probs: with reference.mode=precompute every "
                "dataloader must read a ReferenceCache"
            )
        return batch.ref_logps.float()


class NoReference(Reference):
    """Reference-free losses (simpo, orpo): no reference model is built or run."""

    description = "none (reference-free loss)"

    def logprobs(self, batch: MicroBatch) -> None:
        return None
