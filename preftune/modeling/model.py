"""``DPOModel``: a Hugging Face causal LM (the policy) and its frozen reference, and the DPO-family loss."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from preftune import losses
from preftune.modeling import attention  # importing it registers preftune_varlen with transformers
from preftune.modeling.logprobs import token_logprobs
from preftune.modeling.router import RouterLoss, router_loss
from preftune.training.distributed import DistInfo, gradient_sync, shard, wrap_trainable

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


def load_causal_lm(model_cfg: Mapping[str, Any], default_attention: str | None = None) -> PreTrainedModel:
    """The policy from ``model.path`` with the configured dtype and attention implementation (when
    ``model.attn_implementation`` is null: ``default_attention``, or transformers' choice if that is None)."""
    implementation = model_cfg["attn_implementation"] or default_attention
    kwargs = {"attn_implementation": implementation} if implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg["path"],
        dtype=DTYPES[model_cfg["dtype"]],
        trust_remote_code=model_cfg["trust_remote_code"],
        **kwargs,
    )
    if model_cfg["disable_dropout"]:
        disable_dropout(model)
    lora = model_cfg["lora"]
    if lora["r"] > 0:
        model = add_lora(model, lora)
    return model


def add_lora(model: PreTrainedModel, lora: Mapping[str, Any]) -> PreTrainedModel:
    """Wrap ``model`` in PEFT LoRA adapters (the base weights are frozen)."""
    try:
        import peft
    except ImportError:
        raise ImportError("model.lora.r > 0 needs peft: pip install 'preftune[lora]'") from None
    config = peft.LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]) if lora["target_modules"] else "all-linear",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face causal LM itself (inside a PEFT wrapper its LoRA layers stay in place)."""
    return model.get_base_model() if is_peft(model) else model


def token_layout(batch: Mapping[str, Tensor]) -> dict[str, Any]:
    """The model's view of a micro-batch of P pairs, whatever its layout (padded, packed, shared prompt).

    ``input_ids``, ``position_ids`` [R, L] and ``attention_mask`` (anything the model accepts: [R, L], a 4-D
    mask, a per-layer-type dict, a flex-attention BlockMask) go to the forward; each trained token n is
    predicted by the hidden state at flat position ``hidden_index[n]`` of the [R * L] rows, is the token
    ``target_ids[n]``, and belongs to sequence ``sequence_index[n]`` (pair i's chosen is i, its rejected
    P + i). A packed or shared-prompt batch carries these keys itself; a padded batch from
    ``dpo_custom_collate`` is converted here (chosen rows, then rejected rows, run without a mask).
    """
    if "hidden_index" in batch:
        return dict(batch)
    input_ids = torch.cat([batch["chosen"], batch["rejected"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    rows, length = labels.shape
    next_labels = labels[:, 1:]
    selected = next_labels != -100
    positions = torch.arange(rows * length, device=labels.device).view(rows, length)[:, :-1]
    row_index = torch.arange(rows, device=labels.device)[:, None].expand_as(next_labels)
    return {
        "input_ids": input_ids,
        "position_ids": batch["position_ids"],
        # Right padding: causal attention alone keeps every real token from seeing the padding after it, so
        # no mask is needed, and without one SDPA takes its fused causal kernel instead of a masked one.
        "attention_mask": None,
        "hidden_index": positions[selected],
        "target_ids": next_labels[selected],
        "sequence_index": row_index[selected],
        "token_weights": batch.get("attention_mask"),  # the real tokens (for the router's balancing loss)
    }


LOGITS_CHUNK_ELEMENTS = 2**25  # 128 MiB of fp32 logits per chunk


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per lm-head chunk when ``model.logprob_chunk_size`` is null: 1024, or fewer for vocabularies
    above 32k so a chunk's logits stay within 128 MiB (e.g. 261 tokens for a 128,256 vocab)."""
    return max(1, min(1024, LOGITS_CHUNK_ELEMENTS // vocab_size))


class SequenceLogprobs(nn.Module):
    """Runs a causal LM on a token layout and returns per-sequence summed response log-probs and response
    token counts. It is the module DDP wraps and FSDP2 shards, so the forward goes through their hooks."""

    def __init__(
        self, model: PreTrainedModel, chunk_size: int | None = None, autocast: torch.dtype | None = None
    ):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.autocast = autocast
        self.router: RouterLoss | None = None  # MoE policy: the last forward's balancing loss in aux_loss
        self.aux_loss: Tensor | None = None

    def forward(self, layout: Mapping[str, Any], num_sequences: int) -> tuple[Tensor, Tensor]:
        lm = causal_lm(self.model)
        device_type = layout["input_ids"].device.type
        with torch.autocast(
            device_type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
        ):
            outputs = lm.base_model(
                input_ids=layout["input_ids"],
                attention_mask=layout["attention_mask"],
                position_ids=layout["position_ids"],
                use_cache=False,
                **({"attention_blocks": layout["attention_blocks"]} if "attention_blocks" in layout else {}),
                **({"output_router_logits": True} if self.router is not None else {}),
            )
        hidden = outputs.last_hidden_state
        if self.router is not None:
            self.aux_loss = self.router(outputs.router_logits, layout["token_weights"])
        states = hidden.flatten(0, 1)[layout["hidden_index"]]
        config = lm.config
        if getattr(config, "logit_scale", None) is not None:
            states = states * config.logit_scale
        if getattr(config, "logits_scaling", None) is not None:  # Granite divides its logits
            states = states / config.logits_scaling
        head = lm.get_output_embeddings()
        token_lp = token_logprobs(
            states,
            head.weight,
            layout["target_ids"],
            head.bias,
            chunk_size=auto_chunk_size(head.weight.shape[0]) if self.chunk_size is None else self.chunk_size,
            softcap=getattr(config, "final_logit_softcapping", None),
        )
        sequence = layout["sequence_index"]
        logps = torch.zeros(num_sequences, device=token_lp.device, dtype=torch.float32)
        logps = logps.index_add(0, sequence, token_lp)
        return logps, torch.bincount(sequence, minlength=num_sequences)


class DPOModel(nn.Module):
    """The policy being trained and the reference it is regularised towards.

    The reference is a frozen copy of the policy taken at construction (before any checkpoint is
    restored), always in eval mode and run under ``no_grad``; with LoRA it is the policy itself with its
    adapters disabled (no second copy of the weights). When the batch carries precomputed
    ``ref_chosen_logps``/``ref_rejected_logps`` those are used instead.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        reference: PreTrainedModel | None,
        dpo_cfg: Mapping[str, Any],
        *,
        logprob_chunk_size: int | None = None,
        autocast: torch.dtype | None = None,
    ):
        super().__init__()
        self.policy = policy
        self.autocast = autocast
        self.policy_root = SequenceLogprobs(policy, logprob_chunk_size, autocast)
        self.policy_logprobs: nn.Module = self.policy_root  # DDP-wrapped or FSDP2-sharded by distribute()
        # Not registered as a submodule: the reference has no optimizer state, no checkpoint, no train().
        self._reference: list[SequenceLogprobs] = []
        self.logprob_chunk_size = logprob_chunk_size
        self.dist = DistInfo()
        self.reference_sharded = False  # FSDP2: reference forwards are collectives every rank must join
        self.adapter_reference = is_peft(policy)  # LoRA: the reference is the policy with adapters off
        if reference is not None:
            self.set_reference(reference)
        self.dpo_cfg = dict(dpo_cfg)
        self.beta = float(self.dpo_cfg["ref_policy_kl_penalty"])
        names = self.dpo_cfg["preference_loss"]
        self.loss_names: list[str] = [names] if isinstance(names, str) else list(names)
        self.loss_weights: list[float] = list(
            self.dpo_cfg.get("preference_loss_weights") or [1.0] * len(self.loss_names)
        )
        self.reference_free = all(n in losses.REFERENCE_FREE_LOSSES for n in self.loss_names)
        average = self.dpo_cfg.get("preference_average_log_probs")
        self.average_preference_logps: bool = (
            any(n in losses.LENGTH_AVERAGED_LOSSES for n in self.loss_names)
            if average is None
            else bool(average)
        )
        self.bco_delta = losses.RunningMean() if "bco_pair" in self.loss_names else None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DPOModel:
        model_cfg, data_cfg = cfg["model"], cfg["data"]
        # Packed and shared-prompt rows: segment-wise attention unless the user picks a masked implementation.
        packed = data_cfg["packing"] or data_cfg["share_prompt"]
        policy = load_causal_lm(model_cfg, default_attention=attention.VARLEN if packed else None)
        if model_cfg["compile"] and policy.config._attn_implementation == attention.VARLEN:
            raise ValueError(
                f"model.compile does not support {attention.VARLEN} attention (its per-sequence loop would "
                "recompile on every batch); set model.attn_implementation=sdpa or model.compile=false"
            )
        dpo_cfg = OmegaConf.to_container(cfg["dpo"]) if isinstance(cfg["dpo"], DictConfig) else cfg["dpo"]
        autocast = DTYPES[model_cfg["autocast"]] if model_cfg["autocast"] else None
        model = cls(
            policy, None, dpo_cfg, logprob_chunk_size=model_cfg["logprob_chunk_size"], autocast=autocast
        )
        model.policy_root.router = router_loss(causal_lm(policy).config, model_cfg["router_aux_loss_coef"])
        if model.reference_free:  # simpo/orpo: no reference model is built at all
            model.adapter_reference = False
        elif not model.adapter_reference:
            model.set_reference(copy.deepcopy(policy))
        if model_cfg["activation_checkpointing"]:  # the policy only: the reference keeps no activations
            lm = causal_lm(policy)
            if hasattr(lm, "activation_checkpointing_enable"):  # the newer 5.x name; the old one goes in v6
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if model_cfg["compile"]:
            for lm in (policy, model.reference):
                if lm is not None:
                    causal_lm(lm).base_model.compile(dynamic=True)
        return model

    def set_reference(self, reference: PreTrainedModel | None) -> None:
        """Install the frozen reference (eval mode, no grad), or drop it (None) once its log-probs are cached."""
        if reference is not None:
            reference.eval().requires_grad_(False)
        else:
            self.adapter_reference = False
        self._reference = (
            [SequenceLogprobs(reference, self.logprob_chunk_size, self.autocast)]
            if reference is not None
            else []
        )

    @property
    def has_reference(self) -> bool:
        """Whether reference log-probs can be computed (a frozen copy, or the policy with adapters off)."""
        return bool(self._reference) or self.adapter_reference

    @torch.no_grad()
    def reference_logprobs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``sequence_logprobs`` of the reference, in eval mode and without gradients."""
        if self._reference:
            return self.sequence_logprobs(self.reference, batch)
        if not self.adapter_reference:
            raise ValueError(
                "this model has no reference (reference-free loss, or its log-probs were cached)"
            )
        training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                return self.policy_root(token_layout(batch), 2 * len(batch["chosen_rewards"]))
        finally:
            self.policy.train(training)

    @property
    def reference(self) -> PreTrainedModel | None:
        return self._reference[0].model if self._reference else None

    def distribute(self, strategy: str, info: DistInfo) -> None:
        """Wrap the policy for data parallelism (DDP) or shard policy and reference (FSDP2).

        Call after moving to the device and restoring checkpoint weights, before building the optimizer.
        """
        self.dist = info
        self.policy_logprobs = wrap_trainable(self.policy_root, self.policy, strategy, info)
        if strategy == "fsdp2" and info.distributed and is_peft(self.policy):
            raise ValueError("LoRA with distributed.strategy=fsdp2 is not supported yet: use ddp")
        if strategy == "fsdp2" and info.distributed and self._reference:
            shard(self._reference[0], self._reference[0].model)
            self.reference_sharded = True

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Context: skip the gradient reduction (all micro-batches of a step but the last)."""
        return gradient_sync(self.policy_logprobs, enabled)

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
        """Summed response log-probs and response token counts of ``model`` (the policy, the reference or
        any causal LM), [2P] each: chosen of every pair, then rejected.

        One forward over the whole micro-batch (see ``token_layout``); the lm-head runs only on the hidden
        states that predict a response token, in chunks (see ``preftune.modeling.logprobs``).
        """
        if model is self.policy:
            runner = self.policy_logprobs
        elif model is self.reference:
            runner = self._reference[0]
        else:
            runner = SequenceLogprobs(model, self.logprob_chunk_size, self.autocast)
        return runner(token_layout(batch), 2 * len(batch["chosen_rewards"]))

    def get_loss_and_metrics(
        self, batch: Mapping[str, Tensor], forward_only: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss over the micro-batch's pairs and per-pair-mean metrics (detached 0-d tensors).

        ``rewards_*`` are the implicit rewards β·(log π − log π_ref) (β·log π for reference-free losses),
        beta included, on the same (summed or averaged) log-probs as the preference loss; ``acc`` is the
        fraction of pairs with chosen reward strictly above rejected.
        """
        device = self.device
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
        num_pairs = len(batch["chosen_rewards"])
        with torch.set_grad_enabled(not forward_only and torch.is_grad_enabled()):
            logps, counts = self.sequence_logprobs(self.policy, batch)
        aux_loss = self.policy_root.aux_loss if self.policy_root.router is not None else None
        if "ref_chosen_logps" in batch:
            ref_logps = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float()
        elif self.has_reference:
            ref_logps, _ = self.reference_logprobs(batch)
        else:
            ref_logps = None
        counts = counts.clamp(min=1).float()
        cfg = self.dpo_cfg

        def per_pair(values: Tensor | None, average: bool) -> tuple[Tensor | None, Tensor | None]:
            if values is None:
                return None, None
            values = values / counts if average else values
            return values[:num_pairs], values[num_pairs:]

        chosen, rejected = per_pair(logps, self.average_preference_logps)
        ref_chosen, ref_rejected = per_pair(ref_logps, self.average_preference_logps)
        rewards_chosen = losses.implicit_rewards(chosen, ref_chosen, self.beta).detach()
        rewards_rejected = losses.implicit_rewards(rejected, ref_rejected, self.beta).detach()
        preference = losses.mixture_loss(
            self.loss_names,
            self.loss_weights,
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            chosen_rewards=batch["chosen_rewards"],
            rejected_rewards=batch["rejected_rewards"],
            gt_reward_scale=cfg["gt_reward_scale"],
            chosen_lengths=counts[:num_pairs],
            rejected_lengths=counts[num_pairs:],
            label_smoothing=cfg["label_smoothing"],
            simpo_gamma=cfg["simpo_gamma"],
            rdpo_alpha=cfg["rdpo_alpha"],
            bco_delta=self.bco_delta.value if self.bco_delta is not None else None,
        )
        sft_chosen, _ = per_pair(logps, cfg["sft_average_log_probs"])
        sft = losses.sft_loss(sft_chosen)
        total = cfg["preference_loss_weight"] * preference + cfg["sft_loss_weight"] * sft
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
        loss = total.mean()
        if aux_loss is not None:  # MoE: the router's balancing loss (preftune.modeling.router)
            loss = loss + self.policy_root.router.coef * aux_loss
            metrics["loss"], metrics["aux_loss"] = loss.detach(), aux_loss.detach()
        return loss, metrics

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
