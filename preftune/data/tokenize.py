"""Tokenizing one preference pair so the prompt is an exact prefix of prompt+response.

A text pair is tokenized as ``prompt`` and each response separately, then concatenated: the prompt gets the
tokenizer's BOS (once) if the tokenizer adds one; each response ends with exactly one EOS. A chat pair is
rendered with the chat template (``preftune.data.chat``), which decides BOS and the end-of-turn token itself.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from preftune.data.chat import (
    BAD_END,
    NO_TEMPLATE,
    ChatTemplate,
    tokenizer_template,
)
from preftune.errors import DataError

IDENTICAL = "identical chosen and rejected"
TRUNCATED_AWAY = "response truncated to zero tokens"


class PairTokenizer:
    """Tokenizes a pair so the prompt is an exact prefix of prompt+chosen and of prompt+rejected.

    ``chat_template`` (Jinja text) renders chat pairs in place of the tokenizer's own template.
    """

    def __init__(self, tokenizer: Any, max_seq_length: int, chat_template: str | None = None):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.eos_id: int = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos_id: int | None = bos if bos is not None and probe[:1] == [bos] else None
        self.chat_template = chat_template if chat_template is not None else tokenizer_template(tokenizer)
        """The template chat pairs are rendered with (None: chat pairs are an error)."""
        self._chat: ChatTemplate | None = None

    @property
    def chat(self) -> ChatTemplate:
        if self._chat is None:
            if self.chat_template is None:
                raise DataError(NO_TEMPLATE)
            self._chat = ChatTemplate(self.tokenizer, self.chat_template)
        return self._chat

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, no special tokens added, in one batched call (a fast tokenizer encodes the
        batch on all cores, without the GIL)."""
        if not texts:
            return []
        return self.tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
        )["input_ids"]

    def texts(self, pair: dict[str, Any]) -> tuple[str, str, str] | str:
        """The prompt, chosen and rejected texts to encode (a chat pair rendered with its template), or the
        reason the pair is dropped. A chat template failing on the conversation raises ``DataError``."""
        if isinstance(pair["prompt"], list):
            return self.chat.render_pair(pair["prompt"], pair["chosen"], pair["rejected"])
        return pair["prompt"], pair["chosen"], pair["rejected"]

    def finish(
        self, pair: dict[str, Any], prompt: list[int], chosen: list[int], rejected: list[int]
    ) -> dict[str, Any] | str:
        """The example from the encoded ``texts`` of ``pair``: one BOS (text prompts), one end-of-turn or EOS
        ending each response, truncated; or the reason it is dropped."""
        if isinstance(pair["prompt"], list):
            chosen_end, rejected_end = self.chat.end_response(chosen), self.chat.end_response(rejected)
            if chosen_end is None or rejected_end is None:
                return BAD_END
            chosen, rejected = chosen_end, rejected_end
        else:
            if self.bos_id is not None and prompt[:1] != [self.bos_id]:
                prompt = [self.bos_id, *prompt]
            for ids in (chosen, rejected):
                if ids[-1:] != [self.eos_id]:
                    ids.append(self.eos_id)
        prompt, chosen, rejected = truncate(prompt, chosen, rejected, self.max_seq_length, self.bos_id)
        return example(prompt, chosen, rejected, pair)

    def finish_ids(self, pair: dict[str, Any]) -> dict[str, Any] | str:
        """The example of a tokenized pair: its ids as they are (no BOS or EOS added), truncated; or the
        reason it is dropped."""
        prompt, chosen, rejected = truncate(
            pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"], self.max_seq_length, self.bos_id
        )
        return example(prompt, chosen, rejected, pair)

    def __call__(self, pair: dict[str, Any]) -> dict[str, Any] | str:
        """A tokenized example, or the reason it is dropped (one pair; ``preftune.data.pipeline`` batches)."""
        texts = self.texts(pair)
        if isinstance(texts, str):
            return texts
        return self.finish(pair, *self.encode_texts(list(texts)))


def truncate(
    prompt: list[int], chosen: list[int], rejected: list[int], max_len: int, bos_id: int | None
) -> tuple[list[int], list[int], list[int]]:
    """Fit prompt + each response into ``max_len``: cut the prompt from the left first (keeping its BOS and
    at least one token), then cut the responses from the right."""
    excess = len(prompt) + max(len(chosen), len(rejected)) - max_len
    if excess > 0:
        keep_head = 1 if bos_id is not None and prompt[:1] == [bos_id] else 0
        removable = max(0, len(prompt) - keep_head - 1)
        cut = min(excess, removable)
        prompt = prompt[:keep_head] + prompt[keep_head + cut :]
    room = max_len - len(prompt)
    return prompt, chosen[:room], rejected[:room]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(
        json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer("a")["input_ids"]]).encode()
    )
    return h.hexdigest()


def example(
    prompt: list[int], chosen: list[int], rejected: list[int], pair: dict[str, Any]
) -> dict[str, Any] | str:
    """The training example of a pair's (truncated) ids and its rewards; or why it is dropped (a response
    truncated to nothing, or two identical responses)."""
    if not chosen or not rejected:
        return TRUNCATED_AWAY
    if chosen == rejected:
        return IDENTICAL
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "chosen_reward": pair["chosen_reward"],
        "rejected_reward": pair["rejected_reward"],
    }
