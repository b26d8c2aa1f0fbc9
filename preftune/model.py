"""``DPOModel``: a Hugging Face causal LM (the policy) and its frozen reference, and the DPO-family loss."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from preftune import losses
from preftune.logprobs import token_logprobs

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


def load_causal_lm(model_cfg: Mapping[str, Any]) -> PreTrainedModel:
    """The policy from ``model.path`` with the configured dtype and attention implementation."""
    kwargs = {"attn_implementation": model_cfg["attn_implementation"]} if model_cfg["attn_implementation"] else {}
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg["path"],
        dtype=DTYPES[model_cfg["dtype"]],
        trust_remote_code=model_cfg["trust_remote_code"],
        **kwargs,
    )
    if model_cfg["disable_dropout"]:
        disable_dropout(model)
    return model


class DPOModel(nn.Module):
    """The policy being trained and the reference it is regularised towards.

    The reference is a frozen copy of the policy taken at construction (before any checkpoint is
    restored), always in eval mode and run under ``no_grad``. When the batch carries precomputed
    ``ref_chosen_logps``/``ref_rejected_logps`` those are used instead.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        reference: PreTrainedModel | None,
        dpo_cfg: Mapping[str, Any],
        *,
        logprob_chunk_size: int = 1024,
    ):
        super().__init__()
        self.policy = policy
        # Not registered as a submodule: the reference has no optimizer state, no checkpoint, no train().
        self._reference = [reference] if reference is not None else []
        if reference is not None:
            reference.eval().requires_grad_(False)
        self.dpo_cfg = dict(dpo_cfg)
        self.beta = float(self.dpo_cfg["ref_policy_kl_penalty"])
        self.loss_name = self.dpo_cfg["preference_loss"]
        self.logprob_chunk_size = logprob_chunk_size

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DPOModel:
        policy = load_causal_lm(cfg["model"])
        reference = copy.deepcopy(policy)
        return cls(policy, reference, cfg["dpo"], logprob_chunk_size=cfg["model"]["logprob_chunk_size"])

    @property
    def reference(self) -> PreTrainedModel | None:
        return self._reference[0] if self._reference else None

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def to(self, *args: Any, **kwargs: Any) -> DPOModel:
        """Move the policy and the reference."""
        super().to(*args, **kwargs)
        if self.reference is not None:
            self.reference.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> DPOModel:
        self.policy.train(mode)
        return self

    def sequence_logprobs(self, model: PreTrainedModel, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed response log-probs and response token counts, [2B] each (chosen rows, then rejected).

        One forward over chosen and rejected concatenated; the lm-head runs only on the positions whose
        next token is a response token, in chunks (see ``preftune.logprobs``).
        """
        input_ids = torch.cat([batch["chosen"], batch["rejected"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        hidden = model.base_model(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        ).last_hidden_state
        targets = labels[:, 1:]
        selected = targets != -100
        rows = torch.arange(len(labels), device=labels.device)[:, None].expand_as(targets)[selected]
        head = model.get_output_embeddings()
        states = hidden[:, :-1][selected]
        scale = getattr(model.config, "logit_scale", None)
        if scale is not None:
            states = states * scale
        token_lp = token_logprobs(
            states,
            head.weight,
            targets[selected],
            head.bias,
            chunk_size=self.logprob_chunk_size,
            softcap=getattr(model.config, "final_logit_softcapping", None),
        )
        logps = torch.zeros(len(labels), device=token_lp.device, dtype=torch.float32)
        logps = logps.index_add(0, rows, token_lp)
        counts = selected.sum(dim=1)
        return logps, counts

    def get_loss_and_metrics(
        self, batch: Mapping[str, Tensor], forward_only: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss over the micro-batch's pairs and per-pair-mean metrics (detached 0-d tensors).

        ``rewards_*`` are the implicit rewards β·(log π − log π_ref), beta included, on the same
        (summed or averaged) log-probs as the preference loss; ``acc`` is the fraction of pairs with
        chosen reward strictly above rejected.
        """
        device = self.device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        num_pairs = len(batch["chosen"])
        with torch.set_grad_enabled(not forward_only and torch.is_grad_enabled()):
            logps, counts = self.sequence_logprobs(self.policy, batch)
        if "ref_chosen_logps" in batch:
            ref_logps = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float()
        else:
            with torch.no_grad():
                ref_logps, _ = self.sequence_logprobs(self.reference, batch)
        counts = counts.clamp(min=1).float()
        cfg = self.dpo_cfg
        pref_logps = logps / counts if cfg["preference_average_log_probs"] else logps
        pref_ref = ref_logps / counts if cfg["preference_average_log_probs"] else ref_logps
        chosen, rejected = pref_logps[:num_pairs], pref_logps[num_pairs:]
        ref_chosen, ref_rejected = pref_ref[:num_pairs], pref_ref[num_pairs:]
        preference = losses.preference_loss(
            self.loss_name,
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            chosen_rewards=batch["chosen_rewards"],
            rejected_rewards=batch["rejected_rewards"],
            gt_reward_scale=cfg["gt_reward_scale"],
        )
        sft_logps = logps / counts if cfg["sft_average_log_probs"] else logps
        sft = losses.sft_loss(sft_logps[:num_pairs])
        total = cfg["preference_loss_weight"] * preference + cfg["sft_loss_weight"] * sft
        rewards_chosen = losses.implicit_rewards(chosen, ref_chosen, self.beta).detach()
        rewards_rejected = losses.implicit_rewards(rejected, ref_rejected, self.beta).detach()
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
            "ref_logps_chosen_mean": ref_logps[:num_pairs].mean(),
            "ref_logps_rejected_mean": ref_logps[num_pairs:].mean(),
        }
        return total.mean(), metrics
