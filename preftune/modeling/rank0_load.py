"""Loading a model sharded over many ranks without any rank but 0 ever holding it whole.

Under FSDP2 over several ranks (``distributed.strategy: fsdp2``, any mesh, ``loads_from_rank0``) the ranks
other than 0 build the policy and its reference on the meta device: their structure only, no weights read,
no memory. Rank 0 builds them in CPU memory (never on its accelerator), the weights read as one process reads
them (a frozen copy of the policy as the reference shares the policy's tensors: ``sharing_copy``).
``DPOModel.distribute`` then takes rank 0's weights aside (``to_meta``: its modules go to the meta device
too), so every rank splits and shards the same meta modules (the tensor-parallel plan, then ``fully_shard``);
each rank then allocates only its shards on its device (``to_empty``) and receives their values from rank 0,
tensor by tensor (``load_from_rank0``); rank 0's CPU copy is dropped once sent.

Buffers computed when a module is built rather than saved (a rotary embedding's ``inv_freq``, Gemma's
embedding scale) are sent the same way: rank 0 computed them as one process does, on CPU, so every rank gets
the one-process values (recomputing them on each rank's device could round differently).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from preftune.modeling.parallel import DistInfo


def loads_from_rank0(strategy: str, load_in_4bit: bool, info: DistInfo) -> bool:
    """Whether the ranks other than 0 build the model on the meta device and get their shards from rank 0:
    FSDP2 over several ranks (a 4-bit base is quantized as it loads, onto each rank's device: not)."""
    return strategy == "fsdp2" and info.distributed and not load_in_4bit


@dataclass
class HostWeights:
    """A module's full weights in rank 0's CPU memory, by name (other ranks: empty): its state dict and its
    computed (non-persistent) buffers."""

    state: dict[str, Tensor] = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)


def computed_buffers(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``module``'s non-persistent buffers (computed at construction, absent from its state dict), by name."""
    for prefix, sub in module.named_modules():
        for name in sorted(sub._non_persistent_buffers_set):
            buffer = sub._buffers.get(name)
            if buffer is not None:
                yield f"{prefix}.{name}" if prefix else name, buffer


def sharing_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters (new ones: their ``requires_grad`` is the copy's own) and buffers
    are ``module``'s tensors: no memory. Only for weights nothing changes until ``load_from_rank0`` sends
    them (rank 0's frozen copy of the starting policy)."""
    memo: dict[int, object] = {id(p): nn.Parameter(p.detach(), p.requires_grad) for p in module.parameters()}
    memo.update((id(b), b) for b in module.buffers())
    return copy.deepcopy(module, memo)


def to_meta(module: nn.Module) -> HostWeights:
    """``module``'s weights (its tensors themselves, no copy) taken aside, the module left on the meta device
    with its parameters still shared where they were (tied embeddings stay one parameter, which
    ``module.to("meta")`` would split)."""
    weights = HostWeights(
        {name: t.detach() for name, t in module.state_dict().items()},
        {name: t.detach() for name, t in computed_buffers(module)},
    )
    on_meta: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                if id(param) not in on_meta:
                    on_meta[id(param)] = nn.Parameter(
                        torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                    )
                sub._parameters[name] = on_meta[id(param)]
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = torch.empty_like(buffer, device="meta")
    return weights


def load_from_rank0(module: nn.Module, weights: HostWeights, info: DistInfo) -> None:
    """Give the sharded meta ``module`` (every rank calls it) its values: each rank allocates its shards on its
    device, rank 0 sends every tensor of ``weights`` (its own; the other ranks pass an empty one), each rank
    keeping its shard of it. Rank 0's ``weights`` are emptied as they are sent."""
    module.to_empty(device=info.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, weights.state, options=options)
    with torch.no_grad():
        for name, buffer in computed_buffers(module):
            # a tensor-parallel module's buffers are replicated DTensors (Gemma's embedding scale): whole here
            local = buffer.to_local() if isinstance(buffer, DTensor) else buffer
            if info.is_main:
                local.copy_(weights.buffers[name])
            dist.broadcast(local, src=0)
    weights.state.clear()
    weights.buffers.clear()


def share_rng_state(info: DistInfo) -> None:
    """Every rank's torch generator set to rank 0's: rank 0 drew from it building the model (new LoRA
    adapters' initial values), the meta ranks did not, and the ranks must keep drawing alike."""
    state = [torch.get_rng_state()]
    dist.broadcast_object_list(state, src=0)
    torch.set_rng_state(state[0])
