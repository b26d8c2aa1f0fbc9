"""Where a run's files live: every path under ``output_dir``, named once.

::

    output_dir/
      config.yaml          the run's config, absolute paths (a re-run compares its schedule with it)
      metrics.jsonl        one timestamped record per logged step (train/, val/ metrics)
      samples.jsonl        greedy generations at each validation (trainer.samples)
      judged.jsonl         judged validation: the policy's and the reference's generations, rewards, outcomes
      generations.jsonl    generations of online training (iterative: of every iteration, with ``iteration``)
      iterations/NNN/      iterative DPO, iteration NNN: chunks/ (its generations, written chunk by chunk),
                           pairs.jsonl (the pairs it trains on), train/ (its offline run), policy/ (the result)
      trackers.json        the trackers' run ids and the last step sent to them
      tensorboard/         TensorBoard event files (logger.tensorboard)
      wandb/               W&B's local files (logger.wandb; W&B makes it inside the directory it is given)
      checkpoints/step_N/  complete checkpoints (written as .tmp_step_N, then renamed)
      cache/tokenized/     tokenized data (data.cache_dir overrides it)
      cache/reference/     the reference's log-probs (reference.mode: precompute; reference.cache_dir overrides it)
      cache/layout_check/  passed packing self-checks
      cache/judge_reference/  the reference's generations for judged validation (and preftune eval)
      eval_checkpoints.json   ``preftune eval --all-checkpoints``'s results, per checkpoint
      report.html          ``preftune report``'s page (and its PNGs beside it)
      .preftune.lock       one run per output_dir
      sweep_trial.json     a sweep's trial: its values, state and metric (preftune sweep; see SweepDir)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".preftune.lock"
TRIAL_RECORD = "sweep_trial.json"  # a sweep's trial: its record (preftune sweep)


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

    def iteration(self, n: int) -> Path:
        """Iterative DPO: iteration ``n``'s directory (``iterations/001`` for the first)."""
        return self.root / "iterations" / f"{n:03d}"

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

    def reference_cache(self, cache_dir: str | Path | None = None) -> Path:
        """The reference log-probs' cache: ``reference.cache_dir`` when set, else ``cache/reference``."""
        return Path(cache_dir) if cache_dir else self.cache / "reference"

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

    @property
    def sweep_trial(self) -> Path:
        return self.root / TRIAL_RECORD

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir:
        """The run a checkpoint (``output_dir/checkpoints/step_N``) belongs to."""
        return cls(Path(checkpoint).parent.parent)


@dataclass(frozen=True)
class SweepDir:
    """The paths of a ``preftune sweep`` in ``root`` (its ``--output-dir``)::

    root/
      sweep.json           the spec, every trial's record, the best trial, the shared work counted
      best.yaml            the best complete trial's config
      study.db             the Optuna study (--search optuna)
      cache/tokenized/     the tokenization cache every trial shares (data.cache_dir)
      cache/reference/     the reference log-probs the trials share (reference.cache_dir)
      trial_NNN/           each trial, an ordinary run directory (RunDir) with its sweep_trial.json
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def state(self) -> Path:
        return self.root / "sweep.json"

    @property
    def best(self) -> Path:
        return self.root / "best.yaml"

    @property
    def study(self) -> Path:
        return self.root / "study.db"

    @property
    def tokenized(self) -> Path:
        return self.root / "cache" / "tokenized"

    @property
    def reference_cache(self) -> Path:
        return self.root / "cache" / "reference"

    def trial(self, number: int) -> RunDir:
        return RunDir(self.root / f"trial_{number:03d}")

    def trial_records(self) -> list[Path]:
        """Every trial's ``sweep_trial.json`` present, in trial order."""
        return sorted(self.root.glob(f"trial_*/{TRIAL_RECORD}"))
