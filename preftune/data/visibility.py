"""Which token of a packed or shared-prompt row sees which: the one rule every mask and attention block
follows (``visible``), the branch ids it reads, and the attention implementations that can lay such rows out.

A row holds segments (one pair, or one prompt's K responses, each); a segment holds a context (the prompt,
seen by every response) and one branch per response (each seen only by itself). Imports no torch: ``visible`` works elementwise on
whatever tensors (or numbers) it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from preftune.errors import ConfigError

VARLEN = "preftune_varlen"  # no "sdpa" in the name: transformers would demand sdpa support (Gemma 2 lacks it)
ATTENTION_IMPLEMENTATIONS = (VARLEN, "sdpa", "eager", "flex_attention")  # what packed rows can run on

# Branches: the context (a shared prompt) is seen by every response after it; response j of a segment (a
# pair's chosen: 0, rejected: 1) is branch RESPONSE + j and sees only itself and the context.
CONTEXT, RESPONSE = 0, 1


def visible(query: Sequence[Any], key: Sequence[Any], q: Any, k: Any, window: int | None) -> Any:
    """Whether query token q may attend to key token k, elementwise: the one rule of every mask and block.
    ``query`` and ``key`` are the tokens' (segment, branch, position) ids, ``q`` and ``k`` their offsets in
    the row: same segment, not after the query, context or the query's own branch, within the window."""
    (seg_q, branch_q, pos_q), (seg_k, branch_k, pos_k) = query, key
    ok = (seg_q == seg_k) & (k <= q) & ((branch_k == CONTEXT) | (branch_k == branch_q))
    if window is not None:
        ok = ok & (pos_q - pos_k < window)
    return ok


def packed_attention(attn_implementation: str | None, packed: bool) -> str | None:
    """The attention implementation the policy loads with: ``model.attn_implementation``, else
    ``preftune_varlen`` for packed / shared-prompt rows, else None (transformers' choice)."""
    return attn_implementation or (VARLEN if packed else None)


def check_packed_attention(attn_implementation: str | None) -> None:
    """Packed / shared-prompt rows need an implementation that takes their blocks or masks."""
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            f"model.attn_implementation={attn_implementation}: packing / shared prompt needs one of "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)} (or set data.packing=false and data.share_prompt=false)"
        )
