"""What packed and shared-prompt rows need from a model's attention, read from the model's own configuration.

Segment-wise attention (``preftune_varlen``) takes from every attention call what the model passes it: the
scaling, the layer's sliding window, soft-capping and attention sinks (gpt-oss's ``s_aux``). So every family
whose attention goes through transformers' attention-function interface is routed, whatever its name. The
masked path (sdpa, eager, flex_attention) builds the masks itself and needs each layer's window up front:
``layer_windows`` reads them from ``config.layer_types`` and ``config.sliding_window``. What cannot be laid
out this way (bidirectional or chunked attention, unknown layer types) is refused here; what the configuration
does not show (custom code that ignores the interface) is refused by the self-check
(``preftune.modeling.layout_check``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from preftune.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

FULL, SLIDING = "full_attention", "sliding_attention"
HINT = "set data.packing=false and data.share_prompt=false"


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding window (None: full causal attention), as the model's own masks apply them.

    With ``layer_types`` (Qwen2/3, Gemma 2/3, SmolLM3, gpt-oss...) a sliding layer uses ``sliding_window``;
    without (Mistral, Mixtral, Phi-3, StarCoder2, Qwen3-MoE...) every layer uses ``sliding_window`` when it is
    set (these configs already clear it when ``use_sliding_window`` is off), and families without the key
    (Llama, GPT-2, GPT-NeoX, Phi, OLMo 2, Granite, Cohere...) attend fully.
    """
    family = config.model_type
    if getattr(config, "use_bidirectional_attention", False):
        raise ConfigError(
            f"packing / shared prompt need causal attention; this {family} model is bidirectional; {HINT}"
        )
    if getattr(config, "attention_chunk_size", None):
        raise ConfigError(f"packing / shared prompt do not support {family}'s chunked attention; {HINT}")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * config.num_hidden_layers
    windows = []
    for layer_type in layer_types:
        if layer_type not in (FULL, SLIDING) or (layer_type == SLIDING and window is None):
            raise ConfigError(
                f"packing / shared prompt do not support {family}'s layer type {layer_type!r} "
                f"(sliding_window={window}); {HINT}"
            )
        windows.append(window if layer_type == SLIDING else None)
    return windows


def mask_windows(config: PretrainedConfig) -> int | dict[str, int | None] | None:
    """The window of the one mask every layer takes, or, when layers differ, a dict of windows by layer type
    (the per-layer-type masks that models with ``layer_types`` accept in place of building their own)."""
    windows = layer_windows(config)
    if len(set(windows)) == 1:
        return windows[0]
    return dict(zip(config.layer_types, windows, strict=True))
