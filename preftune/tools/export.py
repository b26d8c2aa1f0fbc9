"""``preftune export``: a checkpoint's policy as a plain Hugging Face model directory with a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from preftune.file_modes import apply_umask
from preftune.run_dir import RunDir
from preftune.tools.model_card import ModelCard


def run_config(checkpoint: Path) -> DictConfig | None:
    """The config the checkpoint's run trained with (``output_dir/config.yaml``), if it is still there."""
    path = RunDir.of_checkpoint(checkpoint).config
    return OmegaConf.load(path) if path.is_file() else None


def load_base(base_path: str, run_cfg: DictConfig | None) -> PreTrainedModel:
    """The adapter's base model in full precision. A QLoRA base (``model.load_in_4bit``) is loaded in 4 bits
    exactly as in training and de-quantised, so the merge adds the adapter to the weights it was trained on
    (the 4-bit values), not to the original ones."""
    quantized = run_cfg is not None and run_cfg.model.get("load_in_4bit", False)
    try:
        if not quantized:
            return AutoModelForCausalLM.from_pretrained(base_path)
        from preftune.modeling.peft_setup import quantization_config

        return AutoModelForCausalLM.from_pretrained(
            base_path, quantization_config=quantization_config(run_cfg.model), dtype="float32"
        ).dequantize()
    except OSError as e:  # a moved base model, or an adapter saved with a relative path
        raise ValueError(
            f"the adapter's base model {base_path!r} (adapter_config.json: base_model_name_or_path) cannot be "
            f"loaded ({str(e).strip().splitlines()[0]}); set it to the base model's directory"
        ) from None


def export_checkpoint(
    checkpoint: str | Path, output: str | Path, *, merge: bool = False, hub_repo: str | None = None
) -> Path:
    """Write ``checkpoint/model`` to ``output`` as a model ``AutoModelForCausalLM.from_pretrained`` loads,
    with a ``README.md`` model card when the run's config and state are there to describe it (its loading
    example names ``hub_repo`` when the export is pushed there).

    A full fine-tune is copied as is. A LoRA/DoRA adapter needs ``merge``: its base model (recorded in the
    adapter config) is loaded, the adapter merged into its weights, and the result saved with the tokenizer.
    """
    checkpoint = Path(checkpoint)
    source = checkpoint / "model"
    output = Path(output)
    if not source.is_dir():
        raise FileNotFoundError(
            f"{source} does not exist: pass a checkpoint directory (output_dir/checkpoints/step_N)"
        )
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty")
    adapter_config = source / "adapter_config.json"
    cfg = run_config(checkpoint)
    if not adapter_config.is_file():
        shutil.copytree(source, output, dirs_exist_ok=True)
    elif not merge:
        raise ValueError(
            f"{checkpoint} holds a LoRA adapter: pass --merge to write merged weights "
            f"(or load it with peft.PeftModel.from_pretrained(base, '{source}'))"
        )
    else:
        from peft import PeftModel

        base = load_base(json.loads(adapter_config.read_text())["base_model_name_or_path"], cfg)
        merged = PeftModel.from_pretrained(base, source).merge_and_unload()
        merged.save_pretrained(output, safe_serialization=True)
        AutoTokenizer.from_pretrained(source).save_pretrained(output)
    apply_umask(output)  # also a checkpoint written 0600 before this was fixed
    if cfg is not None and (checkpoint / "trainer_state.json").is_file():
        card = ModelCard.from_run(checkpoint, cfg, merged=merge)
        (output / "README.md").write_text(card.render(hub_repo or str(output)))
    return output
