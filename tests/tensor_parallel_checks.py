"""Run on both ranks of test_distributed.py's two-process launch (gloo), before its training runs: tensor
parallelism over both ranks against the same model unsharded in this process. ``run_checks`` writes the largest
differences (and a few facts) as JSON from rank 0; tests/test_tensor_parallel.py asserts on them.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

sys.path.insert(0, str(Path(__file__).parent))

from test_families import EOS, SIZES, dpo_cfg, dpo_model, family_model, pairs, trained
from transformers import AutoConfig, AutoModelForCausalLM

from preftune.config import LoraConfig, read_config
from preftune.data.batch import dpo_custom_collate, micro_batch_from_padded
from preftune.data.packing import build_packed_collate
from preftune.data.visibility import VARLEN
from preftune.losses import LossSettings
from preftune.modeling.logprobs import SequenceLogprobs, token_logprobs
from preftune.modeling.model import DPOModel, load_causal_lm
from preftune.modeling.parallel import DistInfo
from preftune.modeling.peft_setup import add_adapters
from preftune.modeling.rank0_load import computed_buffers
from preftune.modeling.tensor_parallel import TENSOR_PARALLEL_FAMILIES, apply_tensor_parallel
from preftune.training.distributed import init_distributed

STEPS = 3


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference, relative to the larger of 1 and the largest value (summed log-probs of -90
    are exact in float32 to 8e-6 only)."""
    a, b = full(a).detach().float(), full(b).detach().float()
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() / max(1.0, a.abs().max().item()) if a.numel() else 0.0


def vocab_parallel_logprobs(tp_mesh) -> dict[str, float]:
    """token_logprobs on a head sharded over the vocabulary (V=37: shards of 19 and 18 rows; 3 chunks of 5
    tokens) against the one-process function: values and the gradients of hidden, weight and bias."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 13, 16, 37
    hidden, weight, bias = (
        torch.randn(n, h, generator=g),
        torch.randn(v, h, generator=g),
        torch.randn(v, generator=g),
    )
    labels, grad = torch.randint(0, v, (n,), generator=g), torch.randn(n, generator=g)
    out = {}
    for softcap in (None, 3.0):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        one = token_logprobs(leaves[0], leaves[1], labels, leaves[2], chunk_size=5, softcap=softcap)
        one.backward(grad)
        sharded = [
            hidden.clone().requires_grad_(),
            distribute_tensor(weight, tp_mesh, [Shard(0)]).requires_grad_(),
            distribute_tensor(bias, tp_mesh, [Shard(0)]).requires_grad_(),
        ]
        two = token_logprobs(sharded[0], sharded[1], labels, sharded[2], chunk_size=5, softcap=softcap)
        two.backward(grad)
        with torch.no_grad():
            no_grad = token_logprobs(hidden, sharded[1], labels, sharded[2], chunk_size=5, softcap=softcap)
        key = f"softcap={softcap}"
        out[f"{key} logp"] = max(diff(one, two), diff(one, no_grad))
        for name, a, b in zip(("hidden", "weight", "bias"), leaves, sharded, strict=True):
            out[f"{key} grad {name}"] = diff(a.grad, b.grad)
        out[f"{key} weight grad is a shard"] = sharded[1].grad.to_local().shape[0] < v
    return out


def padded(exs: list[dict]):
    return micro_batch_from_padded(dpo_custom_collate(exs, EOS))


def family_logprobs(tp_mesh) -> dict[str, float]:
    """Every supported family's per-sequence log-probs, TP=2 against the same model in one process (padded
    rows under eager attention; for llama also packed shared-prompt rows under preftune_varlen)."""
    out = {}
    for model_type in TENSOR_PARALLEL_FAMILIES:
        model = family_model(model_type)
        sharded = apply_tensor_parallel(copy.deepcopy(model), tp_mesh)
        with torch.no_grad():
            a = SequenceLogprobs(model, chunk_size=7)(padded(pairs()))[0]
            b = SequenceLogprobs(sharded, chunk_size=7)(padded(pairs()))[0]
        out[model_type] = diff(a, b)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        out[f"{model_type} tied"] = tied
        out[f"{model_type} tied kept"] = tied == (
            sharded.get_output_embeddings().weight is sharded.get_input_embeddings().weight
        )
    model = copy.deepcopy(family_model("llama"))
    sharded = apply_tensor_parallel(copy.deepcopy(model), tp_mesh)
    collate = build_packed_collate(eos_id=EOS, model_config=model.config, attn_implementation=VARLEN, pack=True,
                                   share_prompt=True, max_tokens_per_row=64, rows_per_micro_batch=99)  # fmt: skip
    (batch,) = collate(pairs())
    for lm in (model, sharded):
        lm.set_attn_implementation(VARLEN)
    with torch.no_grad():
        out["llama packed+shared"] = diff(
            SequenceLogprobs(model)(batch)[0], SequenceLogprobs(sharded)(batch)[0]
        )
    return out


def uneven_tied_vocabulary(tp_mesh) -> dict[str, float]:
    """A llama with 97 tokens (shards of 49 and 48 rows) and tied embeddings: log-probs and every gradient
    (the tied weight's from the lookup and the head together) of a sum of log-probs."""
    config = AutoConfig.for_model("llama", **{**SIZES, "vocab_size": 97, "tie_word_embeddings": True})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    sharded = apply_tensor_parallel(copy.deepcopy(model), tp_mesh)
    a, b = (SequenceLogprobs(m, chunk_size=7)(padded(pairs()))[0] for m in (model, sharded))
    a.sum().backward()
    b.sum().backward()
    grads = [diff(p.grad, q.grad) for p, q in zip(model.parameters(), sharded.parameters(), strict=True)]
    return {
        "logps": diff(a, b),
        "grads": max(grads),
        "tied kept": sharded.lm_head.weight is sharded.model.embed_tokens.weight,
    }


def training_steps(one, sharded) -> dict[str, float]:
    """Log-probs, loss, every gradient and STEPS AdamW steps of two DPOModels (one in this process, one
    sharded), on different pairs each step."""
    out: dict[str, float] = {}
    params = [dict((n, p) for n, p in m.policy.named_parameters() if p.requires_grad) for m in (one, sharded)]
    assert params[0].keys() == params[1].keys()
    optims = [torch.optim.AdamW(p.values(), lr=1e-2, eps=1e-4) for p in params]
    for step in range(STEPS):
        batch = padded(pairs(step))
        results = []
        for model, optim in zip((one, sharded), optims, strict=True):
            optim.zero_grad(set_to_none=True)
            with torch.no_grad():
                logps = model.sequence_logprobs(model.policy, batch)[0]
            loss, metrics = model.get_loss_and_metrics(batch, forward_only=False)
            loss.backward()
            results.append((logps.detach(), loss.detach(), metrics))
        (la, a, ma), (lb, b, mb) = results
        out["logps"] = max(out.get("logps", 0.0), diff(la, lb))
        out["loss"] = max(out.get("loss", 0.0), diff(a, b))
        out["metrics"] = max(out.get("metrics", 0.0), max(diff(ma[k], mb[k]) for k in ma))
        out["grads"] = max(
            out.get("grads", 0.0), max(diff(params[0][k].grad, params[1][k].grad) for k in params[0])
        )
        for optim in optims:
            optim.step()
    out["weights"] = max(diff(params[0][k], params[1][k]) for k in params[0])
    out["last loss"] = a.item()
    return out


def full_fine_tune(info: DistInfo) -> dict[str, float]:
    one = trained("llama")  # a policy moved away from its frozen reference
    sharded = dpo_model(copy.deepcopy(one.policy), copy.deepcopy(one.reference.model), sft_loss_weight=0.5)
    sharded.distribute("fsdp2", info)
    return training_steps(one, sharded)


def lora(info: DistInfo) -> dict[str, float]:
    """LoRA on every linear layer (the reference: adapters off), adapters moved off their zero start."""
    policy = add_adapters(copy.deepcopy(family_model("llama")), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    one, sharded = (
        DPOModel(p, None, LossSettings.from_config(dpo_cfg())).train(False)
        for p in (policy, copy.deepcopy(policy))
    )
    sharded.distribute("fsdp2", info)
    return training_steps(one, sharded)


def local_slice(full_value: torch.Tensor, sharded: torch.Tensor) -> torch.Tensor:
    """The part of the one-process ``full_value`` that ``sharded`` (a DTensor, or a whole tensor) holds here."""
    if not isinstance(sharded, DTensor):
        return full_value
    shape, offset = compute_local_shape_and_global_offset(
        full_value.shape, sharded.device_mesh, sharded.placements
    )
    return full_value[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


def loaded_from_rank0(info: DistInfo, directory: Path) -> dict[str, float | bool]:
    """``DPOModel.from_config`` as the recipe calls it under FSDP2 (rank 1 on the meta device), then
    ``distribute(from_rank0=True)``: what each rank held before (rank 1: every parameter and buffer of policy
    and frozen reference on meta; rank 0: the reference, a copy of the policy, in the policy's memory) and
    after (each local shard the one-process weight's slice, a part of the whole; the computed buffers the
    one-process values; tied embeddings one parameter; the generators equal). A tied gemma2 (rotary buffers,
    a scaled embedding) split over the 2 tensor-parallel ranks."""
    path = directory / "gemma2"
    if info.is_main:
        family_model("gemma2").save_pretrained(path)
    dist.barrier()
    cfg = read_config(None, [f"model.path={path}", "model.attn_implementation=eager", "data.train=unused"])
    torch.manual_seed(1)
    model = DPOModel.from_config(cfg, meta=not info.is_main, shared_copy=True)
    lms = [model.policy, model.reference.model]
    meta = all(t.is_meta for lm in lms for t in [*lm.parameters(), *lm.buffers()])
    pairs = zip(model.policy.parameters(), model.reference.model.parameters(), strict=True)
    shared = all(p.data_ptr() == q.data_ptr() and p is not q and not q.requires_grad for p, q in pairs)
    model.distribute("fsdp2", info, from_rank0=True)
    one = load_causal_lm(cfg.model, "eager")  # one process's model, read whole here to compare with
    expected, computed = one.state_dict(), dict(computed_buffers(one))
    shards, local, whole = 0.0, 0, 0
    for lm in lms:
        for name, value in lm.state_dict().items():
            mine = value.to_local() if isinstance(value, DTensor) else value
            shards = max(shards, diff(mine, local_slice(expected[name], value)))
            local, whole = local + mine.numel(), whole + value.numel()
    found = {
        "meta before": meta,
        "reference shares the policy's memory": shared,
        "shards": shards,
        "local fraction": local / whole,
        "computed buffers": max(diff(b, computed[n]) for lm in lms for n, b in computed_buffers(lm)),
        "buffers counted": len(computed),
        "tied kept": all(lm.get_output_embeddings().weight is lm.get_input_embeddings().weight for lm in lms),
        "rng": torch.get_rng_state().sum().item(),
    }
    ranks: list[dict] = [{}, {}]
    dist.all_gather_object(ranks, found)
    return {f"rank{r} {k}": v for r, f in enumerate(ranks) for k, v in f.items()}


def run_checks(out: Path) -> None:
    """Every check above, written to ``out`` (rank 0); joins (or starts) the 2-rank group of the launch."""
    info = init_distributed(tensor_parallel=2)  # torchrun's variables: 2 ranks, the ("dp", "cp", "tp") mesh
    torch.manual_seed(0)
    results = {
        "vocab_parallel": vocab_parallel_logprobs(info.tp_mesh),
        "families": family_logprobs(info.tp_mesh),
        "uneven_tied_vocabulary": uneven_tied_vocabulary(info.tp_mesh),
        "full": full_fine_tune(info),
        "lora": lora(info),
        "from_rank0": loaded_from_rank0(info, out.parent),
    }
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))
