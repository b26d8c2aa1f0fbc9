"""Per-rank memory of tensor parallelism (``distributed.tensor_parallel=2``) against one process, CPU / gloo.

    python benchmarks/bench_tensor_parallel.py [--output runs/bench/bench_tensor_parallel.json]

Builds a Llama-style model locally (hidden 768, 6 layers, vocab 32,000: about 91M parameters) and a small
preference set, then trains ``--steps`` steps of 8 pairs (full fine-tune, frozen reference copy, AdamW) as
``preftune train`` in one process and under ``torchrun --nproc-per-node=2`` with
``distributed.strategy=fsdp2 distributed.tensor_parallel=2``. Reports, per rank:

- ``weights_mib``: the bytes a rank holds of the policy, its gradients, the Adam state and the reference, from
  the parameters' local shards (computed here, one process per layout, after one optimizer step);
- ``peak_rss_mib``: the peak RSS of the largest process of each run (the child's ``ru_maxrss``), and
  ``idle_rss_mib``, that of a process that only imports preftune's training stack (what every rank pays).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = "alpha beta gamma delta river stone cloud green quick slow bright dark north south east west".split()
HIDDEN, LAYERS, HEADS, VOCAB = 768, 6, 8, 32_000

# one process per layout: the local shards' bytes of policy + gradients + Adam state + reference
WEIGHTS = """
import json, sys, torch
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor
from preftune.config_checks import load_config
from preftune.modeling.model import DPOModel
from preftune.training.distributed import init_distributed, shutdown
from transformers import AutoModelForCausalLM
tp = int(sys.argv[2])
info = init_distributed(tensor_parallel=tp)
cfg = load_config(None, [f"model.path={sys.argv[1]}", "data.train=unused"])
model = DPOModel.from_config(cfg)
if tp > 1:
    model.distribute("fsdp2", info)
params = list(model.policy.parameters())
for p in params:
    p.grad = torch.zeros_like(p)
optimizer = torch.optim.AdamW(params)
optimizer.step()
local = lambda t: t.to_local() if isinstance(t, DTensor) else t
size = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts) / 2**20
state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
found = {"policy": size(params), "gradients": size(p.grad for p in params), "adam": size(state),
         "reference": size(model.reference.model.parameters())}
if info.rank == 0:
    print(json.dumps(found))
shutdown()
"""


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def peak_rss_of(cmd: list[str]) -> float:
    """Run ``cmd`` (via a tiny launcher) and return the peak RSS of its largest process, in MiB."""
    launcher = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-port=29731",
        *args,
    ]


def main() -> None:
    from preftune.tools.tiny import build_tiny_model, save_tiny, train_tokenizer

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pairs = [{"prompt": sentence(rng, 40), "chosen": sentence(rng, 40), "rejected": sentence(rng, 40)}
                 for _ in range(32)]  # fmt: skip
        (root / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        tokenizer = train_tokenizer((sentence(rng, 60) for _ in range(200)), vocab_size=300)
        model = build_tiny_model("llama", VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS)
        parameters = sum(p.numel() for p in model.parameters())
        save_tiny(model, tokenizer, root / "model")
        del model
        (root / "empty.yaml").write_text("{}\n")
        (root / "weights.py").write_text(WEIGHTS)
        train = ["train", "--config", str(root / "empty.yaml"), f"model.path={root / 'model'}",
                 f"data.train={root / 'train.jsonl'}", "data.micro_batch_size=4", "data.global_batch_size=8",
                 f"trainer.max_steps={args.steps}", "trainer.val_check_interval=1000"]  # fmt: skip
        tp = ("distributed.strategy=fsdp2", "distributed.tensor_parallel=2")
        result: dict = {"parameters": parameters, "steps": args.steps}
        for name, nproc, extra in (("one_process", 1, ()), ("tp2", 2, tp)):
            prefix = [sys.executable] if nproc == 1 else torchrun(nproc)
            weights = [*prefix, str(root / "weights.py"), str(root / "model"), str(nproc)]
            found = json.loads(
                subprocess.run(weights, capture_output=True, text=True, check=True).stdout.split("\n")[-2]
            )
            run = [*prefix, "-m", "preftune", *train, f"output_dir={root / name}", *extra]
            result[name] = {
                "weights_mib": {**found, "total": sum(found.values())},
                "peak_rss_mib": peak_rss_of(run),
            }
        result["idle_rss_mib"] = peak_rss_of([sys.executable, "-c", "import preftune.recipe"])
        result["tp2_over_one_process"] = {
            "weights": result["tp2"]["weights_mib"]["total"] / result["one_process"]["weights_mib"]["total"],
            "peak_rss_above_idle": (result["tp2"]["peak_rss_mib"] - result["idle_rss_mib"])
            / (result["one_process"]["peak_rss_mib"] - result["idle_rss_mib"]),
        }
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
