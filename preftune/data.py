"""Preference data: reading files, tokenizing pairs, the global-batch sampler and the padded collate.

A pair is tokenized as ``prompt`` and each response separately, then concatenated, so the prompt tokens
are always an exact prefix of prompt+response. The prompt gets the tokenizer's BOS (once) if the tokenizer
adds one; each response ends with exactly one EOS.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

CACHE_VERSION = 1
FORMATS = {
    "nemo": ("prompt", "chosen_response", "rejected_response"),
    "trl": ("prompt", "chosen", "rejected"),
}


class DataError(ValueError):
    """Bad input data: the message names the file, the line and what to do."""


@dataclass
class DatasetStats:
    """What loading a file kept and dropped (and why)."""

    path: str
    format: str
    kept: int = 0
    dropped: Counter | None = None

    def summary(self) -> str:
        dropped = self.dropped or Counter()
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())) or "none"
        return f"{self.path}: {self.format} format, {self.kept} pairs kept, dropped: {reasons}"


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; bad JSON or non-objects raise DataError."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def detect_format(record: dict, where: str) -> str:
    """``nemo`` (prompt/chosen_response/rejected_response) or ``trl`` (prompt/chosen/rejected)."""
    for name, keys in FORMATS.items():
        if all(k in record for k in keys):
            return name
    found = ", ".join(sorted(record)) or "none"
    raise DataError(
        f"{where}: cannot tell the format from the keys ({found}); expected NeMo Aligner keys "
        f"prompt/chosen_response/rejected_response or TRL keys prompt/chosen/rejected"
    )


def parse_record(record: dict, fmt: str, where: str) -> dict[str, Any]:
    """Check one record's fields and return ``{prompt, chosen, rejected, chosen_reward, rejected_reward}``."""
    prompt_key, chosen_key, rejected_key = FORMATS[fmt]
    out: dict[str, Any] = {}
    for key, name in ((prompt_key, "prompt"), (chosen_key, "chosen"), (rejected_key, "rejected")):
        if key not in record:
            raise DataError(f"{where}: missing key '{key}' ({fmt} format, like the file's first record)")
        value = record[key]
        if not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
        if name != "prompt" and not value.strip():
            raise DataError(f"{where}: '{key}' is empty; every pair needs two non-empty responses")
        out[name] = value
    for key, default in (("chosen_reward", 1.0), ("rejected_reward", 0.0)):
        value = record.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{where}: '{key}' must be a finite number, got {value!r}")
        out[key] = float(value)
    return out


class PairTokenizer:
    """Tokenizes prompt and responses separately so the prompt is an exact prefix of prompt+response."""

    def __init__(self, tokenizer: Any, max_seq_length: int):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.eos_id: int = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos_id: int | None = bos if bos is not None and probe[:1] == [bos] else None

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def encode_response(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids[-1:] != [self.eos_id]:
            ids.append(self.eos_id)
        return ids

    def __call__(self, pair: dict[str, Any]) -> dict[str, Any] | str:
        """A tokenized example, or the reason it is dropped."""
        prompt = self.encode_prompt(pair["prompt"])
        chosen = self.encode_response(pair["chosen"])
        rejected = self.encode_response(pair["rejected"])
        prompt, chosen, rejected = truncate(prompt, chosen, rejected, self.max_seq_length, self.bos_id)
        if not chosen or not rejected:
            return "response truncated to zero tokens"
        if chosen == rejected:
            return "identical chosen and rejected"
        return {
            "prompt_ids": prompt,
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "chosen_reward": pair["chosen_reward"],
            "rejected_reward": pair["rejected_reward"],
        }


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


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized preference pairs from one JSONL file (NeMo Aligner or TRL keys, detected from line 1).

    Tokenization is cached in ``cache_dir`` keyed by the file's content, the tokenizer and the settings,
    so a second run (or another rank) loads it instead of tokenizing again.
    """

    def __init__(
        self, path: str | Path, tokenizer: Any, max_seq_length: int, cache_dir: str | Path | None = None
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"data file not found: {self.path}")
        pair_tokenizer = PairTokenizer(tokenizer, max_seq_length)
        self.fingerprint = hashlib.sha256(
            json.dumps(
                [CACHE_VERSION, _file_digest(self.path), tokenizer_fingerprint(tokenizer), max_seq_length]
            ).encode()
        ).hexdigest()[:24]
        """Changes whenever the tokenized examples would (file content, tokenizer, settings)."""
        cache_file = (
            Path(cache_dir) / f"{self.path.stem}-{self.fingerprint}.pt" if cache_dir is not None else None
        )
        if cache_file is not None and cache_file.is_file():
            cached = torch.load(cache_file, weights_only=True)
            self.examples, stats = cached["examples"], cached["stats"]
            self.stats = DatasetStats(
                stats["path"], stats["format"], stats["kept"], Counter(stats["dropped"])
            )
            self.from_cache = True
            return
        self.examples, self.stats = self._tokenize(pair_tokenizer)
        self.from_cache = False
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            stats = {"path": self.stats.path, "format": self.stats.format, "kept": self.stats.kept}
            torch.save(
                {"examples": self.examples, "stats": {**stats, "dropped": dict(self.stats.dropped)}}, tmp
            )
            os.replace(tmp, cache_file)

    def _tokenize(self, pair_tokenizer: PairTokenizer) -> tuple[list[dict], DatasetStats]:
        examples: list[dict] = []
        stats = DatasetStats(str(self.path), "", dropped=Counter())
        lines = read_jsonl(self.path)
        for line_no, record in tqdm(lines, desc=f"tokenizing {self.path.name}", unit=" pairs", disable=None):
            where = f"{self.path}:{line_no}"
            if not stats.format:
                stats.format = detect_format(record, where)
            example = pair_tokenizer(parse_record(record, stats.format, where))
            if isinstance(example, str):
                stats.dropped[example] += 1
            else:
                examples.append(example)
        if not stats.format:
            raise DataError(f"{self.path}: the file has no records")
        if not examples:
            raise DataError(f"{stats.summary()}; nothing left to train on (raise data.max_seq_length?)")
        stats.kept = len(examples)
        return examples, stats

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.examples[index], "index": index}


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's share of each global batch.

    The order of the global batches depends only on (seed, epoch), and a resumed run starts at a batch
    offset, so the sample order is independent of the number of ranks and of the micro-batch size.
    Rank ``r`` takes the ``r``-th contiguous slice of every global batch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if global_batch_size % world_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by {world_size} ranks")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        full, rest = divmod(num_samples, global_batch_size)
        self.batches_per_epoch = full + (1 if rest and not drop_last else 0)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        for b in range(self.start_batch, self.batches_per_epoch):
            batch = order[b * self.global_batch_size : (b + 1) * self.global_batch_size]
            per_rank = math.ceil(len(batch) / self.world_size)
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]


def dpo_custom_collate(
    batch: Sequence[dict[str, Any]], eos_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """Right-pad prompt+chosen and prompt+rejected of a micro-batch to one length.

    Returns ``chosen``, ``rejected`` ([B, T] token ids, padded with ``eos_id``), ``chosen_length``,
    ``rejected_length`` ([B] real lengths), ``chosen_labels``, ``rejected_labels`` ([B, T], -100 on the
    prompt and the padding), ``attention_mask`` and ``position_ids`` ([2B, T]: chosen rows then rejected
    rows, the order of the single policy forward), ``chosen_rewards``, ``rejected_rewards`` ([B]),
    ``indices`` ([B] dataset indices) and ``num_tokens`` (real tokens in the batch).
    """
    chosen = [ex["prompt_ids"] + ex["chosen_ids"] for ex in batch]
    rejected = [ex["prompt_ids"] + ex["rejected_ids"] for ex in batch]
    length = max(len(s) for s in chosen + rejected)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of

    def pad(seqs: list[list[int]], value: int) -> Tensor:
        return torch.tensor([s + [value] * (length - len(s)) for s in seqs], dtype=torch.long)

    def labels(seqs: list[list[int]]) -> Tensor:
        return pad(
            [
                [-100] * len(ex["prompt_ids"]) + s[len(ex["prompt_ids"]) :]
                for ex, s in zip(batch, seqs, strict=True)
            ],
            -100,
        )

    lengths = torch.tensor([len(s) for s in chosen + rejected])
    positions = torch.arange(length)
    return {
        "chosen": pad(chosen, eos_id),
        "rejected": pad(rejected, eos_id),
        "chosen_length": lengths[: len(batch)],
        "rejected_length": lengths[len(batch) :],
        "chosen_labels": labels(chosen),
        "rejected_labels": labels(rejected),
        "attention_mask": (positions[None, :] < lengths[:, None]).long(),
        "position_ids": positions.expand(len(lengths), length).clone(),
        "chosen_rewards": torch.tensor([ex["chosen_reward"] for ex in batch], dtype=torch.float32),
        "rejected_rewards": torch.tensor([ex["rejected_reward"] for ex in batch], dtype=torch.float32),
        "indices": torch.tensor([ex.get("index", -1) for ex in batch], dtype=torch.long),
        "num_tokens": lengths.sum(),
    }


def padded_micro_batches(
    pairs: Sequence[dict[str, Any]],
    *,
    micro_batch_size: int,
    eos_id: int,
    pad_to_multiple_of: int | None = None,
) -> list[dict[str, Tensor]]:
    """A rank's share of a global batch as padded micro-batches of ``micro_batch_size`` pairs."""
    return [
        dpo_custom_collate(pairs[i : i + micro_batch_size], eos_id, pad_to_multiple_of)
        for i in range(0, len(pairs), micro_batch_size)
    ]
