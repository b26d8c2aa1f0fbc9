"""Chat templates: conversational pairs rendered so the prompt is an exact prefix of each sequence.

The prompt is the conversation before the final assistant turn rendered with ``add_generation_prompt=True``;
each response is the text the template adds when that final assistant message follows. Both are tokenized
with ``add_special_tokens=False``: the template alone decides BOS, so it is never doubled. A response keeps
exactly one end-of-turn token at its end (the first special token the template writes after an assistant
message's content, e.g. ``<|im_end|>`` or ``<|eot_id|>``); text the template writes after that token (the
``\\n`` after ``<|im_end|>``) is not trained. A template with no special end token gets the tokenizer's EOS.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from preftune.errors import DataError

logger = logging.getLogger(__name__)

BROKEN_PREFIX = "chat template breaks the prefix property"
BAD_END = "response does not end with exactly one end-of-turn token"
# Chat formats shipped as preftune/data/templates/<name>.jinja, usable as data.chat_template=<name>
NAMED_TEMPLATES = ("chatml", "gemma", "llama3", "mistral", "qwen", "zephyr")
NO_TEMPLATE = (
    "conversational data needs a chat template and the tokenizer has none: set data.chat_template to the "
    f"format the model was trained with, one of {', '.join(NAMED_TEMPLATES)} (e.g. data.chat_template=chatml), "
    "or to a Jinja template (inline or a file), or set the tokenizer's chat_template in its tokenizer_config.json"
)
_PROBE_USER = "preftune probe question"
_PROBE_REPLY = "preftune probe reply"
_PROBE_SYSTEM = "preftune probe system"


def load_chat_template(setting: str | None) -> str | None:
    """``data.chat_template``: a Jinja string (it contains ``{{`` or ``{%``), a shipped template's name
    (``NAMED_TEMPLATES``) or the path of a file holding one."""
    if setting is None or "{{" in setting or "{%" in setting:
        return setting
    if setting in NAMED_TEMPLATES:
        template = resources.files("preftune").joinpath(f"data/templates/{setting}.jinja")
        return template.read_text(encoding="utf-8")
    path = Path(setting)
    if not path.is_file():
        raise DataError(
            f"data.chat_template={setting!r} is neither a Jinja template (no {{{{ or {{%) nor an existing file; "
            f"shipped templates: {', '.join(NAMED_TEMPLATES)}"
        )
    return path.read_text(encoding="utf-8")


def tokenizer_template(tokenizer: Any) -> str | None:
    """The tokenizer's own (default) chat template, or None."""
    try:
        return tokenizer.get_chat_template()
    except ValueError:
        return None


class ChatTemplate:
    """One chat template on one tokenizer, probed once for its end-of-turn token and system support."""

    def __init__(self, tokenizer: Any, template: str):
        self.tokenizer, self.template = tokenizer, template
        self.eos_id: int = tokenizer.eos_token_id
        probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]
        full = self.render(probe, add_generation_prompt=False)
        if _PROBE_REPLY not in full:
            raise DataError("the chat template does not write the assistant message's content")
        after = self.tokenizer(
            full[full.rindex(_PROBE_REPLY) + len(_PROBE_REPLY) :], add_special_tokens=False
        )["input_ids"]
        special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        first = next((i for i, token in enumerate(after) if token in special), None)
        self.end_id: int | None = None if first is None else after[first]
        """The end-of-turn token (None: the template writes none; responses then end with EOS)."""
        self.after_end: list[int] = [] if first is None else after[first + 1 :]
        """What the template writes after the end-of-turn token of the last message (not trained)."""
        self.system_supported = self._renders_system()
        self._warned_fold = False

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as e:
            raise DataError(f"the chat template fails on this conversation: {e}") from None

    def _renders_system(self) -> bool:
        messages = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}]
        try:
            return _PROBE_SYSTEM in self.render(messages, add_generation_prompt=True)
        except DataError:  # templates that reject system messages raise
            return False

    def _fold_system(self, messages: list[dict]) -> list[dict]:
        """Where the template drops or rejects system messages, prepend the system text to the first user turn."""
        if self.system_supported or messages[0]["role"] != "system":
            return messages
        if not self._warned_fold:
            logger.warning(
                "the chat template has no system turn: system messages go into the first user turn"
            )
            self._warned_fold = True
        system, first, *rest = messages
        return [{**first, "content": f"{system['content']}\n\n{first['content']}"}, *rest]

    def end_response(self, ids: list[int]) -> list[int] | None:
        """A response's ids cut after its one end-of-turn token (None: it has none at its end, or two)."""
        if self.end_id is None:
            return ids if ids[-1:] == [self.eos_id] else [*ids, self.eos_id]
        end = len(ids) - len(self.after_end) - 1
        if end < 0 or ids[end] != self.end_id or ids[end + 1 :] != self.after_end:
            return None
        if self.end_id in ids[:end]:
            return None
        return ids[: end + 1]

    def render_prompt(self, prompt: list[dict]) -> str:
        """The text of a conversation before the assistant's turn, with the generation prompt."""
        return self.render(self._fold_system(prompt), add_generation_prompt=True)

    def render_pair(self, prompt: list[dict], chosen: dict, rejected: dict) -> tuple[str, str, str] | str:
        """The prompt text and the text each response adds to it, or the reason the pair cannot be trained on.

        Rendering is separate from encoding so that many pairs' texts can be encoded in one batched call;
        each response's ids then go through ``end_response``.
        """
        prompt = self._fold_system(prompt)
        prompt_text = self.render_prompt(prompt)
        responses = []
        for message in (chosen, rejected):
            text = self.render([*prompt, message], add_generation_prompt=False)
            if not text.startswith(prompt_text):
                return BROKEN_PREFIX
            responses.append(text[len(prompt_text) :])
        return prompt_text, responses[0], responses[1]
