"""Log-probs of the responses: per token under the LM head, chunked over tokens, and per sequence.

`token_logprobs(hidden, weight, labels)` returns log p(label | hidden) without ever holding the full
[tokens x vocab] logits: a custom autograd function computes each chunk's logits in forward, keeps
only the inputs (plus an [N] logsumexp), and recomputes the chunk's logits in backward.
Under tensor parallelism the head's weight is a DTensor sharded over the vocabulary: each rank then works on its
own rows of the vocabulary and the per-token max, log-sum-exp and label logit are reduced across the tensor-parallel
group (`VocabShard`), so no rank holds even one chunk's full-vocabulary logits.
`SequenceLogprobs` runs a causal LM on a `MicroBatch` and sums them per response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Shard
from transformers import PreTrainedModel

from preftune.data.batch import MicroBatch
from preftune.modeling.attention import carry_blocks
from preftune.modeling.context_parallel import ContextGroup, sum_over_context
from preftune.modeling.router import GlobalRouting, RouterLoss, RoutingStatistics


def _buffers(rows: int, weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """Reusable [rows, V] logits buffers: accumulation dtype (>= fp32), plus one in the weight's dtype if lower."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    buf = weight.new_empty(rows, weight.shape[0], dtype=acc)
    return buf, (weight.new_empty(rows, weight.shape[0]) if weight.dtype != acc else None)


def _chunk_logits(
    h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, buf: Tensor, low: Tensor | None
) -> Tensor:
    """Write one chunk's (soft-capped) logits into `buf`; the matmul runs in the weight's dtype."""
    torch.mm(h.to(weight.dtype), weight.T, out=buf if low is None else low)
    if low is not None:
        buf.copy_(low)
    if bias is not None:
        buf += bias
    if softcap is not None:
        buf.div_(softcap).tanh_().mul_(softcap)
    return buf


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows ``[start, start + size)`` of a head sharded over the vocabulary across ``group``."""

    group: dist.ProcessGroup
    start: int

    def local_labels(self, labels: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """(each label's row in this shard, clamped into it; whether this shard holds it)."""
        local = labels - self.start
        held = (local >= 0) & (local < size)
        return local.clamp(0, size - 1), held


def _all_reduce(value: Tensor, shard: VocabShard | None, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    if shard is not None:
        dist.all_reduce(value, op=op, group=shard.group)
    return value


def _forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    step: int,
    softcap: float | None,
    shard: VocabShard | None = None,
) -> tuple[Tensor, Tensor]:
    """Return (log p(label), logsumexp), both [N], one chunk of `step` tokens at a time (vocabulary-parallel
    with `shard`: two all-reduces per chunk, the max and then the label logit with the sum of exponentials)."""
    n = hidden.shape[0]
    buf, low = _buffers(min(step, n), weight)
    logp = hidden.new_empty(n, dtype=buf.dtype)
    lse = torch.empty_like(logp)
    for s in range(0, n, step):
        c = min(step, n - s)
        z = _chunk_logits(hidden[s : s + c], weight, bias, softcap, buf[:c], None if low is None else low[:c])
        if shard is None:
            logp[s : s + c] = z.gather(1, labels[s : s + c, None]).squeeze(1)
        else:
            local, held = shard.local_labels(labels[s : s + c], z.shape[1])
            logp[s : s + c] = z.gather(1, local[:, None]).squeeze(1).where(held, 0.0)
        m = _all_reduce(z.amax(dim=1), shard, dist.ReduceOp.MAX)
        sum_exp = z.sub_(m[:, None]).exp_().sum(dim=1)  # in-place logsumexp
        if shard is not None:
            both = _all_reduce(torch.stack([logp[s : s + c], sum_exp]), shard)
            logp[s : s + c], sum_exp = both[0], both[1]
        lse[s : s + c] = sum_exp.log_() + m
    logp -= lse
    return logp, lse


class _TokenLogprobs(torch.autograd.Function):
    """Chunked log-softmax + label gather; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        step: int,
        softcap: float | None,
        shard: VocabShard | None,
    ) -> Tensor:
        logp, lse = _forward(hidden, weight, bias, labels, step, softcap, shard)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.step, ctx.softcap, ctx.shard = step, softcap, shard
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        step, softcap, shard, n = ctx.step, ctx.softcap, ctx.shard, hidden.shape[0]
        buf, low = _buffers(min(step, n), weight)
        dbuf = torch.empty_like(buf) if softcap is not None else None
        grad_out = grad_out.to(buf.dtype)
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = lse.new_zeros(weight.shape[0]) if need_b else None
        for s in range(0, n, step):
            c = min(step, n - s)
            h, go = hidden[s : s + c].to(weight.dtype), grad_out[s : s + c, None]
            label, held_go = labels[s : s + c, None], go
            if shard is not None:
                local, held = shard.local_labels(labels[s : s + c], weight.shape[0])
                label, held_go = local[:, None], go * held[:, None]
            low_c = None if low is None else low[:c]
            z = _chunk_logits(h, weight, bias, softcap, buf[:c], low_c)
            dcap = None if dbuf is None else torch.div(z, softcap, out=dbuf[:c]).square_().neg_().add_(1)
            g = z.sub_(lse[s : s + c, None]).exp_().mul_(-go)  # -grad * softmax
            g.scatter_add_(1, label, held_go)  # + grad * onehot(label)
            if dcap is not None:
                g.mul_(dcap)  # soft-cap derivative 1 - tanh^2
            if gb is not None:
                gb += g.sum(dim=0)
            if low_c is not None:
                g = low_c.copy_(g)
            if gh is not None:
                gh[s : s + c] = g @ weight
            if gw is not None:
                gw.addmm_(g.T, h)
        if gh is not None:  # every shard's part of the hidden states' gradient
            _all_reduce(gh, shard)
        return gh, gw, None if gb is None else gb.to(bias.dtype), None, None, None, None


def vocab_shard(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None, VocabShard | None]:
    """(local weight, local bias, its `VocabShard`) of a head weight that is a DTensor sharded over the
    vocabulary on a 1-D (tensor-parallel) mesh; a plain tensor comes back as it is, with None.
    Rows are split as ``torch.chunk`` splits them: rank r holds rows from r * ceil(V / T)."""
    if not isinstance(weight, DTensor):
        return weight, bias, None
    mesh = weight.device_mesh
    if mesh.ndim != 1 or weight.placements != (Shard(0),):
        raise ValueError(f"a head weight sharded as {weight.placements} on {mesh}: expected Shard(0) on 1-D")
    start = mesh.get_local_rank() * math.ceil(weight.shape[0] / mesh.size())
    local_bias = bias.to_local() if isinstance(bias, DTensor) else bias
    return weight.to_local(), local_bias, VocabShard(mesh.get_group(), start)


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> Tensor:
    """Return [N] log p(labels | hidden) under the LM head `hidden @ weight.T + bias`, in fp32 (fp64 for fp64).

    hidden [N, H] (fp32 or bf16), weight [V, H], labels [N] int64 in [0, V), bias [V] or None.
    softcap: Gemma-2 final-logit soft-capping, logits = softcap * tanh(logits / softcap).
    A weight (and bias) that is a DTensor sharded over the vocabulary (tensor parallelism, `vocab_shard`):
    every rank of its group calls this with the same hidden states and labels; each computes the logits of
    its rows only, the result is the same on every rank, the weight's gradient is its shard's and the
    hidden states' gradient is summed over the group.

    Tokens are processed `chunk_size` at a time (<= 0: one chunk; N <= chunk_size is one chunk)
    through reused [chunk_size, V] buffers, so the peak extra memory is O(chunk_size x V) in forward
    and backward; autograd keeps only the inputs and an [N] logsumexp. Backward recomputes each
    chunk's logits: 4 matmuls instead of the naive path's 3, paid back on CPU by never allocating
    [N, V] buffers. The matmul runs in the weight's dtype, bias / soft-cap / softmax in fp32;
    gradients come back in the inputs' dtypes, only for inputs that require grad (weight grads
    accumulate in the weight's dtype). Not twice differentiable.

    chunk_size=1024 (benchmarks/bench_logprobs.py, fp32 fwd+bwd, N=2048, H=256, 2 CPU cores): at
    V=32000 it takes 0.98-1.01x the naive path's time (0.84x on idle cores) with 0.21x its peak
    memory (156 vs 750 MiB). 256 uses 0.08x the memory and is 0.8x the time single-threaded, but
    1.2x (up to 3x at V=4096) on oversubscribed cores, where each of its many small ops waits on a
    thread barrier; 4096 (one chunk here) saves the least memory and is 1.0-1.2x the time.
    """
    step = chunk_size if chunk_size > 0 else max(hidden.shape[0], 1)
    weight, bias, shard = vocab_shard(weight, bias)  # differentiable: the shard's gradient is a DTensor's
    needs_grad = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return _TokenLogprobs.apply(hidden, weight, bias, labels, step, softcap, shard)
    return _forward(hidden, weight, bias, labels, step, softcap, shard)[0]


LOGITS_CHUNK_ELEMENTS = 2**25  # 128 MiB of fp32 logits per chunk


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per lm-head chunk when ``model.logprob_chunk_size`` is null: 1024, or fewer for vocabularies
    above 32k so a chunk's logits stay within 128 MiB (e.g. 261 tokens for a 128,256 vocab)."""
    return max(1, min(1024, LOGITS_CHUNK_ELEMENTS // vocab_size))


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face causal LM itself (inside a PEFT wrapper its LoRA layers stay in place)."""
    return model.get_base_model() if is_peft(model) else model


class SequenceLogprobs(nn.Module):
    """Runs a causal LM on a ``MicroBatch`` and returns per-sequence summed response log-probs and response
    token counts, [2P] each (chosen of every pair, then rejected; a response of a K-completion group that is in
    several pairs is computed once and repeated). It is the module DDP wraps and FSDP2
    shards, so the forward goes through their hooks.

    One forward over the whole micro-batch; the lm-head runs only on the hidden states that predict a
    response token, in chunks of ``chunk_size`` tokens (None: ``auto_chunk_size``). A batch split for
    context parallelism (``MicroBatch.context_shard``) runs its attention over ``context_group``'s ranks and
    returns the sums over them (each rank's backward takes the gradient of its own tokens).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        chunk_size: int | None = None,
        autocast: torch.dtype | None = None,
        context_group: ProcessGroup | None = None,
    ):
        super().__init__()
        carry_blocks(model)
        self.model = model
        self.chunk_size = chunk_size
        self.autocast = autocast
        self.context_group = context_group  # the context ranks of a context-split batch (None: the default)
        self.router: RouterLoss | None = None  # a MoE policy's balancing loss, computed into aux_loss
        self.aux_loss: Tensor | None = None  # the last forward's
        self.global_routing: GlobalRouting | None = None  # global_batch scope: the current global batch's

    def forward(
        self, batch: MicroBatch, routing_only: bool = False
    ) -> tuple[Tensor, Tensor] | RoutingStatistics:
        """``routing_only`` (a MoE policy): the batch's routing statistics instead, from the transformer
        alone (no lm-head)."""
        lm = causal_lm(self.model)
        device_type = batch.input_ids.device.type
        blocks = {}  # preftune_varlen's keywords (the layers' attention reads them, ``carry_blocks``)
        if batch.attention_blocks is not None:  # one forward's masks, made once for all its layers
            blocks = {"attention_blocks": batch.attention_blocks, "shared_masks": {}}
        context = (
            None if batch.context_shard is None else ContextGroup(batch.context_shard, self.context_group)
        )
        if context is not None:
            blocks["context_parallel"] = context
        with torch.autocast(
            device_type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
        ):
            outputs = lm.base_model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
                **blocks,
                **({"output_router_logits": True} if self.router is not None else {}),
            )
        if self.router is not None:
            if batch.token_weights is None:
                raise ValueError("a mixture-of-experts policy needs the micro-batch's token_weights")
            if routing_only:
                return self.router.statistics(outputs.router_logits, batch.token_weights).detach()
            self.aux_loss = self.router(
                outputs.router_logits, batch.token_weights, batch.num_pairs, self.global_routing
            )
        states = outputs.last_hidden_state.flatten(0, 1)[batch.hidden_index]
        config = lm.config
        if getattr(config, "logit_scale", None) is not None:
            states = states * config.logit_scale
        if getattr(config, "logits_scaling", None) is not None:  # Granite divides its logits
            states = states / config.logits_scaling
        head = lm.get_output_embeddings()
        token_lp = token_logprobs(
            states,
            head.weight,
            batch.target_ids,
            head.bias,
            chunk_size=auto_chunk_size(head.weight.shape[0]) if self.chunk_size is None else self.chunk_size,
            softcap=getattr(config, "final_logit_softcapping", None),
        )
        num_sequences = batch.sequence_count()
        logps = torch.zeros(num_sequences, device=token_lp.device, dtype=torch.float32)
        logps = logps.index_add(0, batch.sequence_index, token_lp)
        counts = torch.bincount(batch.sequence_index, minlength=num_sequences)
        if context is not None:  # each context rank holds part of every sequence's tokens
            logps, counts = sum_over_context(logps, context), sum_over_context(counts, context)
        if batch.pair_sequences is not None:  # K-completion groups: each pair's two responses, computed once
            order = batch.pair_sequences.flatten()
            logps, counts = logps[order], counts[order]
        return logps, counts
