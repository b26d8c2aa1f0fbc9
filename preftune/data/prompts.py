"""The prompts of online training: prompt-only records, or the prompts (and chosen responses) of pairs.

``data.train`` may hold prompt-only records, ``{"prompt": "text"}`` or TRL's conversational
``{"prompt": [messages]}`` (any other columns are ignored), or pairs in any preference format: their
distinct prompts are used, each with its first pair's chosen response (what ``online.pairing: spin`` trains
towards). Prompts are tokenized exactly as in offline training (``preftune.data.tokenize``): a text prompt
gets the tokenizer's BOS once, a conversation is rendered by the chat template with the generation prompt and
encoded without special tokens; a prompt longer than ``max_prompt_length`` loses its oldest tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from preftune.data.chat import load_chat_template
from preftune.data.dataset import PreferenceDataset
from preftune.data.formats import _messages, rename_columns
from preftune.data.loading import dataset_options
from preftune.data.sources import resolve_sources
from preftune.data.tokenize import PairTokenizer, truncate
from preftune.errors import DataError

CHAT_FORMATS = ("trl_conversational", "trl_implicit", "nemo_rl")
PAIR_COLUMNS = {"chosen", "rejected", "chosen_response", "rejected_response", "completions", "context"}


def is_prompt_record(record: Mapping[str, Any]) -> bool:
    """A record with a prompt and no response columns."""
    return "prompt" in record and not PAIR_COLUMNS & set(record)


class PromptSet:
    """Tokenized prompts; item i is ``{"prompt_ids", "index": i}`` plus ``chosen_ids`` when it came from a
    pair. Indexes like a dataset, so ``GlobalBatchSampler`` draws global batches of prompts from it."""

    def __init__(
        self, prompts: list[list[int]], chosen: list[list[int]] | None, where: str, stop_ids: list[int]
    ):
        self.prompts, self.chosen, self.where = prompts, chosen, where
        self.stop_ids = stop_ids
        """The tokens that end a completion: EOS, and the chat template's end-of-turn for conversations."""

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"prompt_ids": self.prompts[index], "index": index}
        if self.chosen is not None:
            item["chosen_ids"] = self.chosen[index]
        return item

    def load_summary(self) -> str:
        kind = "pairs' prompts" if self.chosen is not None else "prompt-only records"
        return f"{self.where}: {len(self)} distinct prompts ({kind})"


def load_prompts(
    data: Mapping[str, Any], tokenizer: Any, cache_dir: str | Path | None, max_prompt_length: int
) -> PromptSet:
    """The prompts of ``data.train`` (prompt-only records, or pairs of any format)."""
    sources = resolve_sources(data["train"])
    columns = {k: v for k, v in data["columns"].items() if v is not None}
    first = next((record for _, record in sources[0].records()), None)
    if first is None:
        raise DataError(f"{sources[0].where(1)}: data.train has no records")
    where = ", ".join(str(getattr(s, "path", None) or s.where(0)) for s in sources)
    pair_tokenizer = PairTokenizer(tokenizer, max_prompt_length, load_chat_template(data["chat_template"]))
    seen: dict[tuple[int, ...], int] = {}
    prompts: list[list[int]] = []

    def stop_ids(chat: bool) -> list[int]:
        end = pair_tokenizer.chat.end_id if chat else None
        return [pair_tokenizer.eos_id] + ([end] if end is not None and end != pair_tokenizer.eos_id else [])

    if is_prompt_record(rename_columns(first, columns, sources[0].where(1))):
        chat = False
        for source in sources:
            for n, record in source.records():
                record = rename_columns(record, columns, source.where(n))
                if "prompt" not in record:
                    raise DataError(f"{source.where(n)}: no 'prompt' column (the first record has one)")
                chat = chat or isinstance(record["prompt"], list)
                ids = tuple(prompt_ids(record["prompt"], pair_tokenizer, source.where(n)))
                if seen.setdefault(ids, len(prompts)) == len(prompts):
                    prompts.append(list(ids))
        return PromptSet(prompts, None, where, stop_ids(chat))
    pairs = PreferenceDataset(
        data["train"], tokenizer, data["max_seq_length"], cache_dir, **dataset_options(data)
    )
    chosen: list[list[int]] = []
    for i in range(len(pairs)):
        pair = pairs.examples[i]
        ids = tuple(cut_prompt(pair["prompt_ids"], max_prompt_length, pair_tokenizer.bos_id))
        if seen.setdefault(ids, len(prompts)) == len(prompts):
            prompts.append(list(ids))
            chosen.append(pair["chosen_ids"])
    return PromptSet(prompts, chosen, where, stop_ids(any(f in CHAT_FORMATS for f in pairs.formats)))


def prompt_ids(prompt: Any, pair_tokenizer: PairTokenizer, where: str) -> list[int]:
    """A prompt's ids as offline training makes them: a text with one BOS, or a conversation rendered with
    the generation prompt (the template decides BOS); cut to ``pair_tokenizer.max_seq_length``."""
    if isinstance(prompt, list):
        chat = pair_tokenizer.chat
        text = chat.render_prompt(_messages(prompt, "prompt", where))
        ids = pair_tokenizer.encode_texts([text])[0]
    elif isinstance(prompt, str) and prompt.strip():
        ids = pair_tokenizer.encode_texts([prompt])[0]
        bos = pair_tokenizer.bos_id
        if bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
    else:
        raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of messages, got {prompt!r}")
    return cut_prompt(ids, pair_tokenizer.max_seq_length, pair_tokenizer.bos_id)


def cut_prompt(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    """``ids`` cut from the left to ``max_length`` (its BOS kept), as ``truncate`` cuts a pair's prompt."""
    return truncate(list(ids), [], [], max_length, bos_id)[0]
