"""``preftune export``: a checkpoint's policy as a plain Hugging Face model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, merge: bool = False) -> Path:
    """Write ``checkpoint/model`` to ``output`` as a model ``AutoModelForCausalLM.from_pretrained`` loads.

    A full fine-tune is copied as is. A LoRA adapter needs ``merge``: its base model (recorded in the
    adapter config) is loaded, the adapter merged into its weights, and the result saved with the tokenizer.
    """
    source = Path(checkpoint) / "model"
    output = Path(output)
    if not source.is_dir():
        raise FileNotFoundError(
            f"{source} does not exist: pass a checkpoint directory (output_dir/checkpoints/step_N)"
        )
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty")
    adapter_config = source / "adapter_config.json"
    if not adapter_config.is_file():
        shutil.copytree(source, output, dirs_exist_ok=True)
        return output
    if not merge:
        raise ValueError(
            f"{checkpoint} holds a LoRA adapter: pass --merge to write merged weights "
            f"(or load it with peft.PeftModel.from_pretrained(base, '{source}'))"
        )
    from peft import PeftModel

    base_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path)
    except OSError as e:  # a moved base model, or an adapter saved with a relative path
        raise ValueError(
            f"the adapter's base model {base_path!r} ({adapter_config}: base_model_name_or_path) cannot be "
            f"loaded ({str(e).strip().splitlines()[0]}); set it to the base model's directory"
        ) from None
    merged = PeftModel.from_pretrained(base, source).merge_and_unload()
    merged.save_pretrained(output, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(output)
    return output
