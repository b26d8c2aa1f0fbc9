"""``DPOModel``: a Hugging Face causal LM (the policy), its reference, and the DPO-family loss."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from preftune import losses
from preftune.config import ModelConfig, PreftuneConfig
from preftune.data.batch import MicroBatch, as_micro_batch
from preftune.data.visibility import packed_attention
from preftune.losses import LossSettings
from preftune.modeling import attention  # noqa: F401  (importing it registers preftune_varlen with transformers)
from preftune.modeling.logprobs import SequenceLogprobs, causal_lm, is_peft
from preftune.modeling.parallel import DistInfo, gradient_sync, unwrap, wrap_trainable
from preftune.modeling.peft_setup import add_adapters, quantization_config, uses_adapters
from preftune.modeling.rank0_load import HostWeights, load_from_rank0, share_rng_state, sharing_copy, to_meta
from preftune.modeling.reference import (
    AdaptersOffReference,
    FrozenReference,
    NoReference,
    Reference,
)
from preftune.modeling.router import GlobalRouting, RoutingStatistics, router_loss
from preftune.modeling.tensor_parallel import apply_tensor_parallel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout in ``model``: ``nn.Dropout`` modules and the float ``*dropout*`` attributes that
    attention implementations read directly (e.g. Llama's ``attention_dropout``)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def load_causal_lm(
    model_cfg: ModelConfig, implementation: str | None, *, meta: bool = False
) -> PreTrainedModel:
    """The policy from ``model.path`` with the configured dtype and attention ``implementation`` (None:
    transformers' choice), in 4 bits with ``model.load_in_4bit``, wrapped in adapters per ``model.lora``
    (see ``peft_setup``). ``meta``: the same model on the meta device, no weight read (see ``rank0_load``)."""
    kwargs: dict[str, Any] = {"attn_implementation": implementation} if implementation else {}
    dtype, remote = DTYPES[model_cfg.dtype], model_cfg.trust_remote_code
    if meta:
        config = AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=remote)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=remote, **kwargs)
        with contextlib.suppress(OSError):  # as from_pretrained reads it: generation runs alike on every rank
            model.generation_config = GenerationConfig.from_pretrained(model_cfg.path)
    else:
        quantization = quantization_config(model_cfg)
        if quantization is not None:  # quantized as it loads, straight onto this rank's device
            kwargs["quantization_config"] = quantization
            kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.path, dtype=dtype, trust_remote_code=remote, **kwargs
        )
    if model_cfg.disable_dropout:
        disable_dropout(model)
    if uses_adapters(model_cfg.lora):
        with warnings.catch_warnings():  # on meta, an adapter's saved values (lora.init_from) go nowhere
            if meta:
                warnings.filterwarnings("ignore", message=".*to a meta parameter in the current model")
            model = add_adapters(model, model_cfg.lora)
    return model


class DPOModel(nn.Module):
    """The policy being trained, the reference it is regularised towards, and the DPO-family objective.

    Supports: full fine-tunes and PEFT (LoRA) policies; every loss of ``preftune.losses`` alone or as a
    weighted mixture, plus an SFT term; padded, packed and shared-prompt micro-batches (``MicroBatch``, or a
    ``dpo_custom_collate`` dict); one process, DDP or FSDP2 (``distribute``); bf16 autocast.

    Assumes: the reference (a ``preftune.modeling.reference.Reference``) was built from the starting weights,
    before any checkpoint is restored; ``distribute`` is called after moving to the device, before the
    optimizer is built (a checkpoint's weights restored either side of it).

    Raises: ``ValueError`` when a batch has no reference log-probs to use (``CachedReference`` without cached
    ones).

    Handles: ``policy`` is the Hugging Face model (parameters, checkpoints, config); ``policy_logprobs`` is the
    module its forward runs through (``SequenceLogprobs``, DDP-wrapped or FSDP2-sharded by ``distribute``).
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        reference: Reference | None,
        loss: LossSettings,
        *,
        logprob_chunk_size: int | None = None,
        autocast: torch.dtype | None = None,
    ):
        """``reference`` None: the default for ``policy`` and ``loss`` (``default_reference``)."""
        super().__init__()
        self.policy = policy
        self.policy_logprobs: nn.Module = SequenceLogprobs(policy, logprob_chunk_size, autocast)
        self.loss = loss
        # Not an nn.Module attribute: the reference has no optimizer state, no checkpoint, no train().
        self.reference: Reference = reference or default_reference(self.policy_logprobs, loss)
        self.dist = DistInfo()
        self.bco_delta = losses.RunningMean() if loss.uses_bco_delta else None

    @classmethod
    def from_config(cls, cfg: PreftuneConfig, *, meta: bool = False, shared_copy: bool = False) -> DPOModel:
        """The policy and its reference as ``cfg`` says, in CPU memory (``meta``: on the meta device, no
        weight read: a rank other than 0 that ``distribute`` gives its shards from rank 0). ``shared_copy``: a
        frozen copy of the policy as the reference shares the policy's tensors, no second copy in memory (rank
        0 before ``distribute`` sends them: nothing changes them in between)."""
        model_cfg, data_cfg = cfg.model, cfg.data
        packed = data_cfg.packing or data_cfg.share_prompt
        policy = load_causal_lm(model_cfg, packed_attention(model_cfg.attn_implementation, packed), meta=meta)
        chunk_size = model_cfg.logprob_chunk_size
        autocast = DTYPES[model_cfg.autocast] if model_cfg.autocast else None
        loss = LossSettings.from_config(cfg.dpo)
        reference_path = cfg.reference.path
        reference = None
        if reference_path is not None and not loss.reference_free:
            # the reference at full precision and without adapters, whatever the policy's
            no_adapters = {"r": 0, "init_from": None}
            reference_cfg = OmegaConf.merge(
                model_cfg, {"path": reference_path, "lora": no_adapters, "load_in_4bit": False}
            )
            reference_lm = load_causal_lm(reference_cfg, policy.config._attn_implementation, meta=meta)
            reference = FrozenReference(
                SequenceLogprobs(reference_lm, chunk_size, autocast), f"{reference_path} (online)"
            )
        elif shared_copy and not loss.reference_free and not is_peft(policy):  # else default_reference's
            reference = FrozenReference(SequenceLogprobs(sharing_copy(policy), chunk_size, autocast))
        model = cls(policy, reference, loss, logprob_chunk_size=chunk_size, autocast=autocast)
        model.policy_runner.router = router_loss(
            causal_lm(policy).config, model_cfg.router_aux_loss_coef, model_cfg.router_aux_loss_scope
        )
        if model_cfg.activation_checkpointing:  # the policy only: the reference keeps no activations
            lm = causal_lm(policy)
            if hasattr(lm, "activation_checkpointing_enable"):  # the newer 5.x name; the old one goes in v6
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if model_cfg.compile:
            causal_lm(policy).base_model.compile(dynamic=True)
            if isinstance(model.reference, FrozenReference):
                causal_lm(model.reference.model).base_model.compile(dynamic=True)
        return model

    def distribute(self, strategy: str, info: DistInfo, *, from_rank0: bool = False) -> None:
        """Wrap the policy for data parallelism (DDP) or shard policy and reference (FSDP2; with tensor
        parallelism, first split both over the tensor-parallel ranks).

        Call after moving to the device (``from_rank0``: rank 0's model in CPU memory, the other ranks' on the
        meta device, see ``rank0_load``), before building the optimizer.
        """
        self.dist = info
        runners = [self.policy_logprobs]
        if isinstance(self.reference, FrozenReference):
            runners.append(self.reference.runner)
        host = [to_meta(r) if info.is_main else HostWeights() for r in runners] if from_rank0 else []
        for runner in runners:  # the policy's, and a frozen reference's split the same way
            if info.tensor_parallel > 1:
                apply_tensor_parallel(runner.model, info.tp_mesh)
            if info.context_parallel > 1:  # the batches are split over the context ranks (data.context_split)
                runner.context_group = info.cp_group
        self.policy_logprobs = wrap_trainable(self.policy_logprobs, self.policy, strategy, info)
        if strategy == "fsdp2" and isinstance(self.reference, FrozenReference):
            self.reference.shard(info)
        if from_rank0:
            for runner, weights in zip(runners, host, strict=True):  # the same modules, sharded in place
                load_from_rank0(runner, weights, info)
            share_rng_state(info)

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Context: skip the gradient reduction (all micro-batches of a step but the last)."""
        return gradient_sync(self.policy_logprobs, enabled)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def to(self, *args: Any, **kwargs: Any) -> DPOModel:
        """Move the policy and the reference."""
        super().to(*args, **kwargs)
        self.reference.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> DPOModel:
        self.policy.train(mode)
        return self

    def sequence_logprobs(
        self, model: PreTrainedModel, batch: MicroBatch | Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Summed response log-probs and response token counts of ``model`` (the policy, through its wrapped
        module, or any causal LM), [2P] each: chosen of every pair, then rejected."""
        runner = (
            self.policy_logprobs if model is self.policy else SequenceLogprobs(model, **self._runner_options)
        )
        return runner(as_micro_batch(batch))

    @property
    def _runner_options(self) -> dict[str, Any]:
        root = unwrap(self.policy_logprobs)
        return {"chunk_size": root.chunk_size, "autocast": root.autocast, "context_group": root.context_group}

    @property
    def policy_runner(self) -> SequenceLogprobs:
        """The policy's ``SequenceLogprobs`` itself (inside any DDP wrapper)."""
        return unwrap(self.policy_logprobs)

    def routing_statistics(self, batch: MicroBatch) -> RoutingStatistics:
        """A mixture-of-experts policy's routing statistics of ``batch``: one forward without gradients
        (through the wrapped module: under FSDP2 every rank must join it)."""
        with torch.no_grad():
            return self.policy_logprobs(batch.to(self.device), routing_only=True)

    @contextlib.contextmanager
    def global_routing(self, whole: GlobalRouting | None):
        """Context: the policy's balancing loss is ``whole``'s global batch's (None: each micro-batch's)."""
        self.policy_runner.global_routing = whole
        try:
            yield
        finally:
            self.policy_runner.global_routing = None

    def reference_logprobs(self, batch: MicroBatch | Mapping[str, Tensor]) -> Tensor | None:
        """[2P] reference log-probs: the batch's cached ones if it carries them, else the reference's."""
        batch = as_micro_batch(batch)
        return batch.ref_logps.float() if batch.ref_logps is not None else self.reference.logprobs(batch)

    def get_loss_and_metrics(
        self, batch: MicroBatch | Mapping[str, Tensor], forward_only: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss over the micro-batch's pairs and per-pair-mean metrics (detached 0-d tensors).

        ``rewards_*`` are the implicit rewards β·(log π − log π_ref) (β·log π for reference-free losses),
        beta included, on the same (summed or averaged) log-probs as the preference loss; ``acc`` is the
        fraction of pairs with chosen reward strictly above rejected.
        """
        batch = as_micro_batch(batch).to(self.device)
        num_pairs = batch.num_pairs
        with torch.set_grad_enabled(not forward_only and torch.is_grad_enabled()):
            logps, counts = self.policy_logprobs(batch)
        router = self.policy_runner.router
        aux_loss = self.policy_runner.aux_loss if router is not None else None  # before a reference forward
        ref_logps = self.reference_logprobs(batch)
        counts = counts.clamp(min=1).float()
        loss = self.loss

        def per_pair(values: Tensor | None, average: bool) -> tuple[Tensor | None, Tensor | None]:
            if values is None:
                return None, None
            values = values / counts if average else values
            return values[:num_pairs], values[num_pairs:]

        chosen, rejected = per_pair(logps, loss.average_logps)
        ref_chosen, ref_rejected = per_pair(ref_logps, loss.average_logps)
        rewards_chosen = losses.implicit_rewards(chosen, ref_chosen, loss.beta).detach()
        rewards_rejected = losses.implicit_rewards(rejected, ref_rejected, loss.beta).detach()
        preference = self.preference_loss(chosen, rejected, ref_chosen, ref_rejected, batch, counts)
        sft_chosen, _ = per_pair(logps, loss.sft_average_logps)
        sft = losses.sft_loss(sft_chosen)
        total = loss.preference_weight * preference + loss.sft_weight * sft
        metrics = {
            "loss": total.detach().mean(),
            "sft_loss": sft.detach().mean(),
            "preference_loss": preference.detach().mean(),
            "acc": (rewards_chosen > rewards_rejected).float().mean(),
            "rewards_chosen_mean": rewards_chosen.mean(),
            "rewards_rejected_mean": rewards_rejected.mean(),
            "reward_margin_mean": (rewards_chosen - rewards_rejected).mean(),
            "logps_chosen_mean": logps[:num_pairs].detach().mean(),
            "logps_rejected_mean": logps[num_pairs:].detach().mean(),
        }
        if ref_logps is not None:
            metrics["ref_logps_chosen_mean"] = ref_logps[:num_pairs].mean()
            metrics["ref_logps_rejected_mean"] = ref_logps[num_pairs:].mean()
        objective = total.mean()
        if aux_loss is not None:  # MoE: the router's balancing loss (preftune.modeling.router)
            objective = objective + router.coef * aux_loss
            metrics["loss"], metrics["aux_loss"] = objective.detach(), aux_loss.detach()
        return objective, metrics

    def preference_loss(
        self,
        chosen: Tensor,
        rejected: Tensor,
        ref_chosen: Tensor | None,
        ref_rejected: Tensor | None,
        batch: MicroBatch,
        counts: Tensor,
    ) -> Tensor:
        """[P] the configured preference loss (or weighted mixture) of each pair, from its (summed or averaged)
        policy and reference log-probs, ground-truth rewards and response token ``counts`` ([2P])."""
        loss, num_pairs = self.loss, batch.num_pairs
        return losses.mixture_loss(
            list(loss.names),
            list(loss.weights),
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=loss.beta,
            chosen_rewards=batch.chosen_rewards,
            rejected_rewards=batch.rejected_rewards,
            gt_reward_scale=loss.gt_reward_scale,
            chosen_lengths=counts[:num_pairs],
            rejected_lengths=counts[num_pairs:],
            label_smoothing=loss.label_smoothing,
            simpo_gamma=loss.simpo_gamma,
            rdpo_alpha=loss.rdpo_alpha,
            bco_delta=self.bco_delta.value if self.bco_delta is not None else None,
        )

    def observe_step_rewards(self, chosen_mean: float, rejected_mean: float, num_pairs: int) -> None:
        """Fold an optimizer step's mean implicit rewards (all its pairs, every micro-batch and rank) into
        BCO's running mean: a step's loss uses the mean of the steps before it, whatever the micro-batch
        size or the number of ranks."""
        if self.bco_delta is not None:
            self.bco_delta.update((chosen_mean + rejected_mean) / 2, 2 * num_pairs)

    def loss_state_dict(self) -> dict[str, Any]:
        """Loss state that must survive a resume (BCO's running reward mean)."""
        return {"bco_delta": self.bco_delta.state_dict()} if self.bco_delta is not None else {}

    def load_loss_state_dict(self, state: dict[str, Any]) -> None:
        if self.bco_delta is not None and "bco_delta" in state:
            self.bco_delta.load_state_dict(state["bco_delta"])


def default_reference(policy_runner: SequenceLogprobs, loss: LossSettings) -> Reference:
    """The reference when ``reference.path`` is not set: none for reference-free losses, the policy with its
    adapters off for a PEFT policy, else a frozen copy of the policy's starting weights."""
    if loss.reference_free:
        return NoReference()
    if is_peft(policy_runner.model):
        return AdaptersOffReference(policy_runner)
    copy_runner = SequenceLogprobs(
        copy.deepcopy(policy_runner.model), policy_runner.chunk_size, policy_runner.autocast
    )
    return FrozenReference(copy_runner)
