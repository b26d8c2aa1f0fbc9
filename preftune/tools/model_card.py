"""The ``README.md`` model card ``preftune export`` writes: Hub metadata (YAML front matter) and what the run
did (loss, β, steps, pairs seen, final validation metrics), read from the run's own files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from preftune.losses import loss_names
from preftune.run_dir import RunDir


@dataclass
class ModelCard:
    """What the card says; ``from_run`` fills it from a checkpoint and its run directory."""

    base_model: str
    losses: list[str]
    beta: float
    steps: int
    pairs_seen: int
    learning_rate: float
    datasets: list[str] = field(default_factory=list)  # training sets' Hub ids (front matter)
    data_files: list[str] = field(default_factory=list)  # training sets read from local files (body only)
    validation_data: list[str] = field(default_factory=list)
    adapter: str | None = None  # e.g. "LoRA r=16 (merged)"
    validation: dict[str, float] = field(default_factory=dict)  # the last val/ metrics at or before `steps`
    validation_step: int | None = None

    @classmethod
    def from_run(cls, checkpoint: Path, run_cfg: DictConfig, *, merged: bool) -> ModelCard:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        model, lora = run_cfg.model, run_cfg.model.lora
        sources = _sources(run_cfg.data.train)
        adapter = None
        adapter_config = checkpoint / "model" / "adapter_config.json"
        if adapter_config.is_file():  # rank and DoRA as saved (with init_from they come from that adapter)
            saved = json.loads(adapter_config.read_text())
            kind = "DoRA" if saved.get("use_dora") else "LoRA"
            base = ", 4-bit NF4 base (QLoRA) de-quantised before merging" if model.load_in_4bit else ""
            adapter = f"{kind} r={saved['r']}{base}{', merged' if merged else ''}"
            if lora.init_from:
                adapter += f", continued from the adapter {lora.init_from}"
        card = cls(
            base_model=str(model.path),
            losses=list(loss_names(run_cfg.dpo.preference_loss)),
            beta=float(run_cfg.dpo.ref_policy_kl_penalty),
            steps=int(state["step"]),
            pairs_seen=int(state["consumed_samples"]),
            learning_rate=float(run_cfg.optim.lr),
            datasets=[s for kind, s in sources if kind == "hub"],
            data_files=[s for kind, s in sources if kind == "local"],
            validation_data=[s for _, s in _sources(run_cfg.data.validation)],
            adapter=adapter,
        )
        card.validation_step, card.validation = _last_validation(checkpoint.parent.parent, card.steps)
        return card

    def render(self, load_from: str) -> str:
        """The card's text; ``load_from`` is what ``from_pretrained`` is given in the example."""
        local_base = Path(self.base_model).is_dir()
        meta: dict[str, Any] = {} if local_base else {"base_model": self.base_model}
        meta["library_name"] = "transformers"
        meta["tags"] = ["dpo", "preftune", *(n for n in self.losses if n != "dpo")]
        if self.datasets:
            meta["datasets"] = self.datasets
        rows = [
            ("base model", self.base_model),
            ("loss", " + ".join(self.losses)),
            ("β (dpo.ref_policy_kl_penalty)", f"{self.beta:g}"),
            ("learning rate", f"{self.learning_rate:g}"),
            ("optimizer steps", str(self.steps)),
            ("preference pairs seen", str(self.pairs_seen)),
        ]
        if self.adapter:
            rows.append(("adapters", self.adapter))
        if self.datasets or self.data_files:
            rows.append(("training data", ", ".join(self.datasets + self.data_files)))
        if self.validation_data:
            rows.append(("validation data", ", ".join(self.validation_data)))
        lines = [
            "---",
            yaml.safe_dump(meta, sort_keys=False).rstrip(),
            "---",
            "",
            f"# {Path(load_from).name}",
            "",
            f"Preference-tuned from `{self.base_model}` with preftune.",
            "",
            "| | |",
            "| --- | --- |",
            *(f"| {name} | {value} |" for name, value in rows),
            "",
            "## Final validation metrics",
            "",
        ]
        if self.validation:
            lines += [f"At step {self.validation_step}:", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {key} | {value:.4f} |" for key, value in self.validation.items()]
        else:
            lines.append("The run had no validation set.")
        lines += [
            "",
            "## How to load it",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{load_from}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{load_from}")',
            "```",
            "",
        ]
        return "\n".join(lines)


def _sources(entries: Any) -> list[tuple[str, str]]:
    """``data.train``/``data.validation`` as (``hub`` | ``local``, name) pairs: a mapping with a ``hub`` key
    names a Hub dataset; any other entry (a path, or a mapping with ``path``) is local, named by its path as
    the run's config gives it (absolute: a run saves its paths so)."""
    if entries is None:
        return []
    entries = OmegaConf.to_container(entries) if OmegaConf.is_config(entries) else entries
    if not isinstance(entries, list):
        entries = [entries]
    out = []
    for entry in entries:
        if isinstance(entry, dict):
            out.append(("hub", str(entry["hub"])) if "hub" in entry else ("local", str(entry.get("path"))))
        else:
            out.append(("local", str(entry)))
    return out


def _last_validation(run_dir: Path, step: int) -> tuple[int | None, dict[str, float]]:
    """The last validation record of ``run_dir/metrics.jsonl`` at or before ``step`` (prefix removed)."""
    path = RunDir(run_dir).metrics
    found: tuple[int | None, dict[str, float]] = (None, {})
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        values = {k.removeprefix("val/"): v for k, v in record.items() if k.startswith("val/")}
        if values and record["step"] <= step:
            found = (record["step"], {k: float(v) for k, v in values.items()})
    return found
