"""Tiny local tokenizers and random-init causal LMs (demo, tests, benchmarks); nothing is downloaded.

The model families are chosen to cover the traps a DPO trainer must handle: untied vs tied heads, attention
bias, sliding-window attention, logit soft-capping, scaled embeddings, learned positions and default dropout.
"""

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from preftune.file_modes import apply_umask

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<unk>")  # ids 0, 1, 2, 3 in every tokenizer built here
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt2")
SLIDING_WINDOW = 16  # small enough to matter on the short sequences of tests and the demo


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, *, extra_special_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; encoding with special tokens prepends <bos> and never appends <eos>."""
    bos, eos, pad, unk = SPECIAL_TOKENS
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        extra_special_tokens=list(extra_special_tokens),
    )


def build_tiny_model(
    arch: str,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    bos_token_id: int = BOS_ID,
    eos_token_id: int = EOS_ID,
    pad_token_id: int = PAD_ID,
    **overrides,
) -> PreTrainedModel:
    """A seeded random-init fp32 causal LM of family `arch`; `overrides` are extra config kwargs.

    The default special-token ids match `train_tokenizer`; gpt2 keeps its default dropout of 0.1.
    """
    inter = intermediate_size or 4 * hidden_size
    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    head_dim = hidden_size // num_heads
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=inter,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        **ids,
    )
    # Each family keeps its own defaults except for what is set here; comments name the trap it covers.
    if arch == "llama":  # untied head, RoPE, grouped-query attention
        config_cls, kwargs = LlamaConfig, dict(common, tie_word_embeddings=False)
    elif arch == "qwen2":  # q/k/v bias, tied embeddings
        config_cls, kwargs = Qwen2Config, dict(common, tie_word_embeddings=True)
    elif arch == "qwen3":  # per-head RMSNorm on queries and keys, no q/k/v bias
        config_cls, kwargs = Qwen3Config, dict(common, tie_word_embeddings=False)
    elif arch == "mistral":  # sliding-window attention on every layer
        config_cls, kwargs = MistralConfig, dict(common, sliding_window=SLIDING_WINDOW)
    elif arch == "gemma2":  # attention + final-logit soft-capping, sliding layers, scaled embeddings
        config_cls = Gemma2Config
        kwargs = dict(common, query_pre_attn_scalar=head_dim, sliding_window=SLIDING_WINDOW)
        kwargs.update(tie_word_embeddings=True)
    elif arch == "gpt2":  # learned absolute positions, LayerNorm, tied head, dropout 0.1
        config_cls = GPT2Config
        kwargs = dict(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, **ids)
        kwargs.update(n_inner=inter, n_positions=max_position_embeddings)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {TINY_ARCHS}")
    config = config_cls(**{**kwargs, **overrides})
    attn = "eager" if arch == "gemma2" else "sdpa"  # gemma2 soft-caps attention scores, which sdpa cannot do
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def save_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """Save model (safetensors) and tokenizer so the Auto classes load them from `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    apply_umask(out)
    return out
