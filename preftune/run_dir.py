"""Where a run's files live: every path under ``output_dir``, named once.

::

    output_dir/
      config.yaml          the run's config, absolute paths (a re-run compares its schedule with it)
      metrics.jsonl        one timestamped record per logged step (train/, val/ metrics)
      samples.jsonl        greedy generations at each validation (trainer.samples)
      judged.jsonl         judged validation: the policy's and the reference's generations, rewards, outcomes
      generations.jsonl    generations of online training
      trackers.json        the trackers' run ids and the last step sent to them
      tensorboard/         TensorBoard event files (logger.tensorboard)
      wandb/               W&B's local files (logger.wandb; W&B makes it inside the directory it is given)
      checkpoints/step_N/  complete checkpoints (written as .tmp_step_N, then renamed)
      cache/tokenized/     tokenized data (data.cache_dir overrides it)
      cache/reference/     the reference's log-probs (reference.mode: precompute)
      cache/layout_check/  passed packing self-checks
      cache/judge_reference/  the reference's generations for judged validation (and preftune eval)
      eval_checkpoints.json   ``preftune eval --all-checkpoints``'s results, per checkpoint
      report.html          ``preftune report``'s page (and its PNGs beside it)
      .preftune.lock       one run per output_dir
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".preftune.lock"


@dataclass(frozen=True)
class RunDir:
    """The paths of the run in ``root`` (a run's ``output_dir``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str is taken too

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def judged(self) -> Path:
        return self.root / "judged.jsonl"

    @property
    def generations(self) -> Path:
        return self.root / "generations.jsonl"

    @property
    def trackers(self) -> Path:
        return self.root / "trackers.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def tokenized(self, cache_dir: str | Path | None = None) -> Path:
        """The tokenization cache: ``data.cache_dir`` when set, else ``cache/tokenized``."""
        return Path(cache_dir) if cache_dir else self.cache / "tokenized"

    @property
    def reference_cache(self) -> Path:
        return self.cache / "reference"

    @property
    def layout_check_cache(self) -> Path:
        return self.cache / "layout_check"

    @property
    def judge_reference_cache(self) -> Path:
        return self.cache / "judge_reference"

    @property
    def eval_checkpoints(self) -> Path:
        return self.root / "eval_checkpoints.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run a checkpoint (``output_dir/checkpoints/step_N``) belongs to."""
        return cls(Path(checkpoint).parent.parent)
