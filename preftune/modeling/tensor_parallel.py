"""Tensor parallelism for Llama-shaped decoder blocks: the plan as data, the pure check a config runs before
any weight loads, and ``apply_tensor_parallel``, which shards a model over the tensor-parallel mesh.

A block's attention projections q/k/v split their output features (whole heads) across the T ranks and o
joins them (rowwise: its input features split, the output summed over the group); the MLP's gate/up split
the intermediate features and down joins them. The input embeddings and the LM head split the vocabulary:
an embedding row lives on one rank (the lookup is summed over the group) and the head's logits are computed
per shard (``preftune.modeling.logprobs.vocab_shard``), never gathered in training. Norms stay whole on every
rank. A family is supported only when a test proves it exact against one process.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from preftune.errors import ConfigError

COLWISE, ROWWISE = "colwise", "rowwise"
# module-name suffix inside a decoder block -> how its weight is split
BLOCK_PLAN: dict[str, str] = {
    "self_attn.q_proj": COLWISE,
    "self_attn.k_proj": COLWISE,
    "self_attn.v_proj": COLWISE,
    "self_attn.o_proj": ROWWISE,
    "mlp.gate_proj": COLWISE,
    "mlp.up_proj": COLWISE,
    "mlp.down_proj": ROWWISE,
}
# model_types whose blocks have exactly BLOCK_PLAN's projections, each head's q/k norm (if any) per head, and a
# vocabulary embedding + LM head; tests/test_tensor_parallel.py proves each exact against one process
TENSOR_PARALLEL_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "granite",
    "smollm3",
)


def tensor_parallel_problem(model_config: Any, tensor_parallel: int) -> str | None:
    """What stops ``model_config`` (a transformers config) from being split over ``tensor_parallel`` ranks, as
    the end of one line, or None when it can be."""
    family = getattr(model_config, "model_type", None)
    if family not in TENSOR_PARALLEL_FAMILIES:
        return (
            f"model_type {family} has no tensor-parallel plan (supported: {', '.join(TENSOR_PARALLEL_FAMILIES)}); "
            "set distributed.tensor_parallel=1"
        )
    heads = model_config.num_attention_heads
    sizes = {
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(model_config, "num_key_value_heads", None) or heads,
        "intermediate_size": model_config.intermediate_size,
    }
    for name, size in sizes.items():
        if size % tensor_parallel:
            return (
                f"{name}={size} does not split over distributed.tensor_parallel={tensor_parallel} ranks; "
                f"set distributed.tensor_parallel to a divisor of {size}"
            )
    return None


def _style(kind: str) -> ParallelStyle:
    return ColwiseParallel() if kind == COLWISE else RowwiseParallel()


def _block_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """``parallelize_module``'s plan for every projection of ``model`` (found by BLOCK_PLAN's suffixes). A PEFT
    LoRA layer splits its base layer like the plain Linear, and the adapter's matrix on the split side the same
    way: lora_B of a colwise layer (its output features), lora_A of a rowwise one (its input features); the
    other adapter matrix stays whole on every rank."""
    plan: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        kind = next(
            (k for suffix, k in BLOCK_PLAN.items() if name == suffix or name.endswith("." + suffix)), None
        )
        if kind is None:
            continue
        if isinstance(module, nn.Linear):
            plan[name] = _style(kind)
        elif hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            if getattr(module, "lora_magnitude_vector", None):  # DoRA (e.g. an adapter from lora.init_from)
                raise ConfigError(
                    f"{name}: a DoRA adapter has no tensor-parallel split yet; set distributed.tensor_parallel=1"
                )
            plan[f"{name}.base_layer"] = _style(kind)
            adapters = module.lora_B if kind == COLWISE else module.lora_A
            for adapter in adapters:
                plan[f"{name}.{'lora_B' if kind == COLWISE else 'lora_A'}.{adapter}"] = _style(kind)
        else:
            raise ValueError(f"{name}: a {type(module).__name__}, not a Linear to split")
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard ``model`` (a causal LM of a ``TENSOR_PARALLEL_FAMILIES`` family, or its PEFT wrapper) over the 1-D
    ``tp_mesh`` in place, before FSDP2 shards it over the data-parallel ranks; every rank of ``tp_mesh`` must
    call it with the same weights. Tied embeddings stay one parameter. Returns ``model``."""
    plan = _block_plan(model)
    if len(plan) < len(BLOCK_PLAN):
        raise ValueError(
            f"{type(model).__name__}: no Llama-shaped projections to split ({', '.join(BLOCK_PLAN)})"
        )
    parallelize_module(model, tp_mesh, plan)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embeddings.weight
    # the lookup's output, summed over the vocabulary shards, replicated; the head's logits gathered (only
    # generation runs the head's forward: training takes its weight shard, preftune.modeling.logprobs)
    parallelize_module(embeddings, tp_mesh, RowwiseParallel(input_layouts=Replicate()))
    parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Replicate()))
    if tied:  # both split the vocabulary rows (Shard(0)): one parameter again
        embeddings.weight = head.weight
    return model
