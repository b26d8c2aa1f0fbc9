"""Preference record formats: detect a file's shape and turn each record into pairs.

A *text pair* has string ``prompt``, ``chosen`` and ``rejected``. A *chat pair* has ``prompt`` (the messages
before the final assistant turn, earlier assistant turns included) and ``chosen`` / ``rejected`` (the final
assistant message of each conversation). Both carry ``chosen_reward`` and ``rejected_reward``. A *tokenized
pair* (format ``tokenized``: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``) holds the token ids themselves,
e.g. iterative DPO's sampled completions, trained exactly as they are.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

from preftune.errors import DataError

FORMATS: dict[str, tuple[str, ...]] = {
    "nemo": ("prompt", "chosen_response", "rejected_response"),
    "nemo_rl": ("context", "completions"),
    "trl": ("prompt", "chosen", "rejected"),
    "trl_conversational": ("prompt", "chosen", "rejected"),
    "trl_implicit": ("chosen", "rejected"),
    "tokenized": ("prompt_ids", "chosen_ids", "rejected_ids"),  # token ids, trained as they are
}
FORMAT_NAMES = ("auto", *FORMATS)
COMPLETION_PAIRINGS = ("best_vs_worst", "all_pairs")
RENAMABLE = ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward")
ROLES = ("system", "user", "assistant", "tool")
# The order in which a record that fits no format is compared with each (first wins a tie).
_NEAREST_ORDER = ("trl", "trl_implicit", "nemo", "nemo_rl")


def _nearest(key: str, found: list[str]) -> str | None:
    match = difflib.get_close_matches(key, found, n=1, cutoff=0.6)
    return match[0] if match else None


def _missing_hint(key: str, found: list[str]) -> str:
    near = _nearest(key, found)
    if near is None:
        return ""
    if key in RENAMABLE:
        return f"; did you mean '{near}'? (set data.columns.{key}={near})"
    return f"; did you mean '{near}'? (rename that column to '{key}')"


def rename_columns(record: dict, columns: Mapping[str, str], where: str) -> dict:
    """Read the file's column ``columns[name]`` as ``name`` (e.g. ``{"prompt": "question"}``)."""
    if not columns:
        return record
    out = {k: v for k, v in record.items() if k not in columns and k not in columns.values()}
    for name, column in columns.items():
        if column not in record:
            found = sorted(record)
            near = _nearest(column, found)
            hint = f"; did you mean '{near}'?" if near else ""
            raise DataError(
                f"{where}: data.columns.{name} names column '{column}', which is not there "
                f"(found: {', '.join(found) or 'none'}){hint}"
            )
        out[name] = record[column]
    return out


def detect_format(record: dict, where: str) -> str:
    """The format a record's columns (and, for TRL, its value types) identify."""
    keys = set(record)
    if set(FORMATS["tokenized"]) <= keys:  # before trl: such a record may carry its texts beside the ids
        return "tokenized"
    if {"context", "completions"} <= keys:
        return "nemo_rl"
    if {"prompt", "chosen_response", "rejected_response"} <= keys:
        return "nemo"
    if {"chosen", "rejected"} <= keys:
        if "prompt" not in keys:
            return "trl_implicit"
        is_list = any(isinstance(record[k], list) for k in FORMATS["trl"])
        return "trl_conversational" if is_list else "trl"
    found = sorted(keys)

    def score(fmt: str) -> float:
        return sum(1.0 if k in keys else 0.5 * bool(_nearest(k, found)) for k in FORMATS[fmt])

    fmt = max(_NEAREST_ORDER, key=score)
    lacking = "; ".join(f"'{k}'{_missing_hint(k, found)}" for k in FORMATS[fmt] if k not in keys)
    raise DataError(
        f"{where}: cannot tell the format from the columns ({', '.join(found) or 'none'}); the nearest, "
        f"{fmt} ({', '.join(FORMATS[fmt])}), lacks {lacking}. Supported: NeMo Aligner "
        f"(prompt, chosen_response, rejected_response), NeMo-RL (context, completions), TRL (prompt, "
        f"chosen, rejected, or chosen and rejected only); map other names with data.columns.NAME=COLUMN"
    )


def _require(record: dict, fmt: str, where: str) -> None:
    for key in FORMATS[fmt]:
        if key not in record:
            found = sorted(record)
            raise DataError(
                f"{where}: missing column '{key}' ({fmt} format, like the file's first record; found: "
                f"{', '.join(found) or 'none'}){_missing_hint(key, found)}"
            )


def _rewards(record: dict, where: str) -> dict[str, float]:
    out = {}
    for key, default in (("chosen_reward", 1.0), ("rejected_reward", 0.0)):
        value = record.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{where}: '{key}' must be a finite number, got {value!r}")
        out[key] = float(value)
    return out


def _messages(value: Any, name: str, where: str) -> list[dict]:
    """A non-empty list of ``{role, content}`` messages; keys whose value is null are dropped."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise DataError(
            f"{where}: '{name}' must be a non-empty list of {{role, content}} messages, got {got}"
        )
    out = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: message {i} of '{name}' must be an object with role and content, "
                f"got {type(message).__name__}"
            )
        message = {k: v for k, v in message.items() if v is not None}
        for key in ("role", "content"):
            if key not in message:
                keys = ", ".join(sorted(message)) or "none"
                raise DataError(
                    f"{where}: message {i} of '{name}' has no '{key}' (keys: {keys}); every message needs "
                    f"a role ({', '.join(ROLES)}) and a string content"
                )
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}: message {i} of '{name}' has role {message['role']!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where}: message {i} of '{name}': content must be a string, "
                f"got {type(message['content']).__name__}"
            )
        out.append(message)
    return out


def _check_order(conversation: list[dict], name: str, where: str) -> None:
    """System only first, no assistant before a user, tool only after assistant/tool, assistant last."""
    roles = [m["role"] for m in conversation]
    problem = None
    for i, role in enumerate(roles):
        if role == "system" and i:
            problem = f"message {i + 1} is a system message; one is allowed, first"
        elif role == "assistant" and "user" not in roles[:i]:
            problem = f"assistant message {i + 1} comes before any user message"
        elif role == "tool" and (not i or roles[i - 1] not in ("assistant", "tool")):
            problem = f"tool message {i + 1} does not follow an assistant message"
        if problem:
            break
    if problem is None and roles[-1] != "assistant":
        problem = f"it must end with the assistant's response, not a {roles[-1]} message"
    if problem:
        raise DataError(f"{where}: roles in an impossible order in '{name}' ({' > '.join(roles)}): {problem}")


def chat_pair(chosen: list[dict], rejected: list[dict], where: str) -> dict[str, Any]:
    """Split two full conversations into the shared prompt and the two final assistant messages."""
    if chosen[:-1] != rejected[:-1]:
        common = min(len(chosen), len(rejected)) - 1
        k = next((i for i in range(common) if chosen[i] != rejected[i]), common)
        raise DataError(
            f"{where}: chosen and rejected differ at message {k + 1}, before their final assistant turn; "
            f"only the final assistant turn may differ (make one record per turn)"
        )
    for conversation, name in ((chosen, "chosen"), (rejected, "rejected")):
        if not conversation[-1]["content"].strip():
            raise DataError(
                f"{where}: the final assistant message of '{name}' is empty; every pair needs two "
                f"non-empty responses"
            )
    return {"prompt": chosen[:-1], "chosen": chosen[-1], "rejected": rejected[-1]}


def parse_record(record: dict, fmt: str, where: str) -> dict[str, Any]:
    """The pair of a record of a single-pair format (every format but ``nemo_rl``)."""
    _require(record, fmt, where)
    rewards = _rewards(record, where)
    if fmt in ("nemo", "trl"):
        out: dict[str, Any] = {}
        for key, name in zip(FORMATS[fmt], ("prompt", "chosen", "rejected"), strict=True):
            value = record[key]
            if not isinstance(value, str):
                raise DataError(
                    f"{where}: '{key}' must be a string, got {type(value).__name__} "
                    f"(message lists: data.format=trl_conversational or auto)"
                )
            if name != "prompt" and not value.strip():
                raise DataError(f"{where}: '{key}' is empty; every pair needs two non-empty responses")
            out[name] = value
        return {**out, **rewards}
    if fmt == "tokenized":
        ids = {}
        for key in FORMATS[fmt]:
            value = record[key]
            if not isinstance(value, list) or not all(isinstance(t, int) and t >= 0 for t in value):
                raise DataError(f"{where}: '{key}' must be a list of token ids (ints >= 0), got {value!r}")
            ids[key] = value
        return {**ids, **rewards}
    if fmt == "trl_conversational":
        prompt = _messages(record["prompt"], "prompt", where)
        chosen = prompt + _messages(record["chosen"], "chosen", where)
        rejected = prompt + _messages(record["rejected"], "rejected", where)
    elif fmt == "trl_implicit":
        if isinstance(record["chosen"], str) or isinstance(record["rejected"], str):
            raise DataError(
                f"{where}: 'chosen' and 'rejected' are strings and there is no 'prompt' column: add one "
                f"(or map it with data.columns.prompt=COLUMN), or give full conversations as lists of "
                f"{{role, content}} messages"
            )
        chosen = _messages(record["chosen"], "chosen", where)
        rejected = _messages(record["rejected"], "rejected", where)
    else:
        raise ValueError(f"parse_record handles single-pair formats, not {fmt!r}")
    _check_order(chosen, "chosen", where)
    _check_order(rejected, "rejected", where)
    return {**chat_pair(chosen, rejected, where), **rewards}


def _rank(item: Any, i: int, where: str) -> float:
    if not isinstance(item, dict) or "rank" not in item or "completion" not in item:
        raise DataError(f"{where}: completion {i} must be an object with 'rank' and 'completion'")
    rank = item["rank"]
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not math.isfinite(rank):
        raise DataError(f"{where}: completion {i}: 'rank' must be a finite number, got {rank!r}")
    return float(rank)


def parse_pairs(record: dict, fmt: str, where: str, completions: str = "best_vs_worst") -> list[dict]:
    """Every pair a record gives; an empty list when its completions are all ranked the same.

    NeMo-RL: the lower rank is preferred; ``best_vs_worst`` pairs the best with the worst completion,
    ``all_pairs`` every two completions of different rank.
    """
    if fmt != "nemo_rl":
        return [parse_record(record, fmt, where)]
    _require(record, fmt, where)
    context = _messages(record["context"], "context", where)
    items = record["completions"]
    if not isinstance(items, list) or len(items) < 2:
        raise DataError(f"{where}: 'completions' must be a list of at least two {{rank, completion}} objects")
    ranked = []
    for i, item in enumerate(items, start=1):
        rank = _rank(item, i, where)
        name = f"completions[{i}]"
        conversation = context + _messages(item["completion"], f"{name}.completion", where)
        _check_order(conversation, f"context + {name}", where)
        ranked.append((rank, conversation))
    ranked.sort(key=lambda r: r[0])  # stable: file order among equal ranks
    if completions == "best_vs_worst":
        chosen_rejected = [(ranked[0][1], ranked[-1][1])] if ranked[0][0] < ranked[-1][0] else []
    else:
        chosen_rejected = [
            (better, worse)
            for i, (better_rank, better) in enumerate(ranked)
            for worse_rank, worse in ranked[i + 1 :]
            if better_rank < worse_rank
        ]
    rewards = {"chosen_reward": 1.0, "rejected_reward": 0.0}
    return [{**chat_pair(c, r, where), **rewards} for c, r in chosen_rejected]
