"""PEFT adapters on the policy: LoRA or DoRA, new or continued from an existing adapter, on a base loaded in
full precision or in 4 bits (QLoRA: bitsandbytes NF4 with double quantization, bf16 compute).

With adapters the reference is the policy with its adapters disabled, i.e. the base model. An adapter from
``model.lora.init_from`` therefore starts the policy at base + adapter while the reference stays the base, so
step 0 does not give DPO's log 2: its implicit rewards already measure what the adapter learnt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel

from preftune.config import LoraConfig, ModelConfig
from preftune.errors import ConfigError


def uses_adapters(lora: LoraConfig) -> bool:
    """Whether the policy trains PEFT adapters (a new one of rank ``r``, or one from ``init_from``)."""
    return lora.r > 0 or bool(lora.init_from)


def quantization_config(model_cfg: ModelConfig) -> BitsAndBytesConfig | None:
    """QLoRA's 4-bit base (``model.load_in_4bit``), or None for a full-precision base."""
    if not model_cfg.load_in_4bit:
        return None
    if not uses_adapters(model_cfg.lora):
        raise ConfigError(
            "model.load_in_4bit freezes the base in 4 bits and trains adapters on it: "
            "set model.lora.r (e.g. 16) or model.lora.init_from"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.load_in_4bit needs bitsandbytes: pip install 'preftune[qlora]'") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora needs peft: pip install 'preftune[lora]'") from None
    return peft


def add_adapters(model: PreTrainedModel, lora: LoraConfig) -> PreTrainedModel:
    """Wrap ``model`` in trainable adapters (its own weights frozen): those saved in ``lora.init_from``, or
    new LoRA (DoRA with ``lora.use_dora``) adapters of rank ``lora.r``."""
    peft = _peft()
    if lora.init_from:
        return load_adapter(model, lora)
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if lora.target_modules else "all-linear",
        use_dora=lora.use_dora,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def load_adapter(model: PreTrainedModel, lora: Mapping[str, Any]) -> PreTrainedModel:
    """Continue training the PEFT LoRA/DoRA adapter saved in ``lora.init_from`` (rank, alpha, targets and
    DoRA come from its ``adapter_config.json``; ``lora.r`` and ``lora.use_dora``, when set, must agree)."""
    peft = _peft()
    source = Path(lora.init_from)
    key = f"model.lora.init_from={source}"
    config_file = source / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"{key}: no adapter_config.json there; point it at a PEFT adapter directory "
            "(e.g. a preftune checkpoint's step_N/model)"
        )
    saved = json.loads(config_file.read_text())
    if saved.get("peft_type") != "LORA":
        raise ConfigError(f"{key}: a {saved.get('peft_type')} adapter; only LoRA/DoRA adapters are supported")
    if lora.r and lora.r != saved["r"]:
        raise ConfigError(
            f"{key}: model.lora.r={lora.r} but the adapter has r={saved['r']}; "
            "leave model.lora.r at 0 to take the adapter's rank"
        )
    if lora.use_dora and not saved.get("use_dora"):
        raise ConfigError(f"{key}: model.lora.use_dora=true but the adapter is plain LoRA")
    try:
        return peft.PeftModel.from_pretrained(model, source, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key}: the adapter (trained on {saved.get('base_model_name_or_path')}) does not fit "
            f"model.path: {first}"
        ) from None
