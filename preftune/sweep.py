"""``preftune sweep``: one base config trained over a grid of values or an Optuna (TPE) search.

Each trial is an ordinary run in ``DIR/trial_NNN`` (its ``config.yaml``, metrics, checkpoints), so ``report``,
``eval`` and ``export`` work on it. The trials share the work that does not depend on what they vary:

- tokenization: every trial's ``data.cache_dir`` is ``DIR/cache/tokenized`` (the cache is keyed by the files,
  the tokenizer and every data setting, so a trial varying ``data.max_seq_length`` gets its own file);
- the reference pass: ``reference.mode: online`` becomes ``precompute`` (the frozen reference's log-probs do
  not depend on the policy being trained; ``--online-reference`` keeps online), and trials that vary only keys
  the reference's log-probs do not depend on (``REFERENCE_NEUTRAL``) share ``DIR/cache/reference``; the
  others get a directory per value of the keys they vary (the cache's own key, data and model fingerprints,
  covers data, weights and dtype but not e.g. ``model.autocast``).

Resumable: each trial's record ``DIR/trial_NNN/sweep_trial.json`` is written (atomically, rank 0) when it
starts and when it ends; a rerun of the same command skips ended trials and reruns a started one, which
resumes from its newest checkpoint. An Optuna search keeps its study in ``DIR/study.db`` (SQLite). With
``--prune`` the trainer asks after each validation whether to stop (Optuna's median pruner on the metric).
``DIR/sweep.json`` (the spec, every trial, the best one, the work counts) and ``DIR/best.yaml`` are the result.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from preftune.config_checks import load_config
from preftune.errors import ConfigError
from preftune.modeling.parallel import DistInfo, gather_objects
from preftune.recipe import log, run_training
from preftune.run_dir import RunDir, SweepDir
from preftune.tools.sweep_space import Dimension, Range, Values, grid_trials, overrides, parse_space
from preftune.training.distributed import init_distributed
from preftune.training.launcher import env_world_size
from preftune.training.stop_signals import EXIT_STOPPED

METRICS = {"val/loss": "minimize", "val/acc": "maximize", "val/win_rate": "maximize"}
# Keys the reference's log-probs do not depend on: trials that vary only these share one reference cache.
REFERENCE_NEUTRAL = (
    "dpo.",
    "optim.",
    "trainer.",
    "logger.",
    "model.lora.",
    "model.disable_dropout",
    "model.activation_checkpointing",
    "model.router_aux_loss_coef",
    "data.seed",
)
ENDED = ("complete", "pruned")


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep is: a rerun must give the same spec to resume it."""

    config: str  # the base config (absolute path or preset:NAME)
    grid: list[str]  # the --grid items
    search: str  # grid | optuna
    trials: int  # --search optuna: the number of trials (a grid: 0, its size is the product)
    metric: str  # val/loss | val/acc | val/win_rate
    prune: bool


@dataclass
class TrialRecord:
    """One trial, as ``trial_NNN/sweep_trial.json`` and a row of ``sweep.json``."""

    trial: int
    dir: str
    overrides: list[str]  # the varied keys' overrides
    params: dict[str, Any]  # the varied keys' values, as the trial's config holds them
    state: str = "running"  # running | complete | pruned
    metric: float | None = None
    steps: int = 0
    wall_time_s: float = 0.0
    tokenized: bool = False
    reference_pass: bool = False


@dataclass
class Sweep:
    """A sweep under way: its spec, directory, the overrides every trial shares, and the trials' records."""

    spec: SweepSpec
    root: SweepDir
    space: list[Dimension]
    shared: list[str]
    info: DistInfo
    integer_keys: set[str]  # the keys whose values are integers (their ranges drawn as integers)
    reference_cache_set: bool  # the base config names reference.cache_dir: every trial uses it
    reference_mode: str  # the trials' reference.mode
    seed: int  # trainer.seed of the base config: the Optuna sampler's
    worker: tuple[int, int] = (0, 1)  # (I, K): this process runs the trials numbered I mod K
    records: dict[int, TrialRecord] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return METRICS[self.spec.metric]

    def trial_config(self, number: int, params: dict[str, str]) -> DictConfig:
        """The trial's config: base, the shared overrides, its reference cache, its values, its output_dir."""
        cache = (
            []
            if self.reference_cache_set
            else [f"reference.cache_dir={reference_cache_dir(self.root, params)}"]
        )
        output_dir = f"output_dir={self.root.trial(number).root}"
        return load_config(self.spec.config, [*self.shared, *cache, *overrides(params), output_dir])

    def run_trial(
        self, number: int, params: dict[str, str], should_stop: Callable[[int, dict], bool] | None = None
    ) -> tuple[TrialRecord, bool]:
        """Train (or resume) one trial; its record and whether it ended (False: stopped by a signal or
        trainer.max_time, to be resumed by the same command)."""
        cfg = self.trial_config(number, params)
        record = self.new_record(number, params, cfg)
        log(f"trial {number}: {' '.join(record.overrides) or '(the base config)'}")
        self.save_record(record)
        start = time.monotonic()
        result = run_training(cfg, should_stop)
        record.wall_time_s = round(time.monotonic() - start, 3)
        record.steps = result.steps
        record.tokenized = result.tokenized
        record.reference_pass = result.reference_computed
        if result.val_metrics:
            record.metric = metric_value(result.val_metrics, self.spec.metric, record.dir)
        ended = result.finished or result.stopped_by_callback
        if ended:
            record.state = "pruned" if result.stopped_by_callback else "complete"
        self.save_record(record)
        return record, ended

    def new_record(self, number: int, params: dict[str, str], cfg: DictConfig) -> TrialRecord:
        """A started trial's record: its values as its config holds them."""
        values = {key: _select(cfg, key) for key in params}
        return TrialRecord(number, self.root.trial(number).root.name, overrides(params), values)

    def save_record(self, record: TrialRecord) -> None:
        self.records[record.trial] = record
        if self.info.is_main:
            write_json(self.root.trial(record.trial).sweep_trial, asdict(record))

    def load_records(self) -> None:
        """The records of a previous run of this sweep (rank 0 reads them, every rank gets them)."""
        found = {}
        if self.info.is_main:
            for path in self.root.trial_records():
                record = TrialRecord(**json.loads(path.read_text()))
                found[record.trial] = record
        self.records = gather_objects(found, self.info)[0]


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as ``path`` (indented JSON), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def reference_cache_dir(root: SweepDir, params: dict[str, str]) -> Path:
    """The reference cache of a trial: ``DIR/cache/reference``, or a directory of its own per value of the
    keys it varies that are not in ``REFERENCE_NEUTRAL``."""
    varied = sorted((k, v) for k, v in params.items() if not k.startswith(REFERENCE_NEUTRAL))
    base = root.reference_cache
    return base / hashlib.sha256(json.dumps(varied).encode()).hexdigest()[:12] if varied else base


def metric_value(metrics: dict[str, float], metric: str, trial: str) -> float:
    """``metric`` (``val/NAME``) from a validation's metrics (named without the prefix)."""
    name = metric.removeprefix("val/")
    if name not in metrics:
        raise ConfigError(
            f"--metric {metric}: {trial} logged no {metric} (its validation metrics: "
            f"{', '.join(sorted(metrics))}); pick one of those"
        )
    return float(metrics[name])


def shared_overrides(base: DictConfig, root: SweepDir, online_reference: bool) -> list[str]:
    """What every trial shares: the tokenization cache, and precompute for the reference (said once)."""
    shared = []
    if base.data.cache_dir is None:
        shared.append(f"data.cache_dir={root.tokenized}")
    if base.reference.mode == "online" and not online_reference:
        shared.append("reference.mode=precompute")
        log(
            "reference.mode: online -> precompute for every trial: one reference pass serves the trials "
            "(--online-reference keeps a reference forward per step)"
        )
    return shared


def check_spec(spec: SweepSpec, space: list[Dimension], base: DictConfig, parallel: int) -> None:
    """The sweep's options against each other and the base config (each mistake one line)."""
    if spec.metric not in METRICS:
        raise ConfigError(f"--metric {spec.metric}: use one of {', '.join(METRICS)}")
    if spec.search not in ("grid", "optuna"):
        raise ConfigError(f"--search {spec.search}: use grid or optuna")
    if spec.search == "grid" and spec.prune:
        raise ConfigError("--prune stops trials by comparing them: it needs --search optuna")
    if spec.search == "optuna" and spec.trials < 1:
        raise ConfigError("--search optuna needs --trials N (N >= 1)")
    if spec.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("--search optuna needs optuna: pip install 'preftune[sweep]'")
    if spec.search == "grid" and spec.trials:
        raise ConfigError("--trials goes with --search optuna (a grid runs every combination)")
    if base.data.validation is None and base.data.validation_fraction is None:
        raise ConfigError(
            f"{spec.config}: no validation data (data.validation or data.validation_fraction): a sweep "
            f"compares trials by {spec.metric}"
        )
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: must be >= 1")
    if parallel > 1 and env_world_size() > 1:
        raise ConfigError(
            f"--parallel {parallel} starts its own workers: run it without torchrun / srun tasks"
        )
    if parallel > 1:
        import torch

        gpus = torch.cuda.device_count()
        if gpus < parallel:
            raise ConfigError(
                f"--parallel {parallel} runs trials side by side on {parallel} GPU groups; this machine has "
                f"{gpus} GPU(s): leave --parallel out (trials then run one after another)"
            )
    for dim in space:
        if isinstance(dim, Range):
            value = OmegaConf.select(base, dim.key, default=None)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(
                    f"--grid {dim.key}: a range needs a number key ({dim.key} is {value!r}); list values instead"
                )
            if isinstance(value, int) and not (dim.low.is_integer() and dim.high.is_integer()):
                raise ConfigError(f"--grid {dim.key}: an integer key needs whole-number range ends")


def _check_resumable(root: SweepDir, spec: SweepSpec) -> None:
    path = root.state
    if path.is_file():
        saved = json.loads(path.read_text()).get("spec")
        if saved != asdict(spec):
            raise ConfigError(
                f"{root.root} holds another sweep ({path} has a different spec): rerun its own command to resume "
                "it, or use a new --output-dir"
            )


def run_sweep(
    spec: SweepSpec,
    root: Path,
    *,
    online_reference: bool = False,
    parallel: int = 1,
    worker: tuple[int, int] | None = None,
) -> tuple[dict, bool]:
    """Run (or resume) the sweep; its summary (``sweep.json``) and whether every trial ended. With
    ``parallel`` K > 1, K worker processes (``worker`` (I, K)) share the trials; a worker writes its trials'
    records only, the summary is written once they are all done."""
    space = parse_space(spec.grid)
    base = load_config(spec.config)
    check_spec(spec, space, base, 1 if worker else parallel)
    out = SweepDir(root.resolve())
    _check_resumable(out, spec)
    info = init_distributed(base.distributed.tensor_parallel, base.distributed.context_parallel)
    sweep = Sweep(
        spec,
        out,
        space,
        shared_overrides(base, out, online_reference),
        info,
        integer_keys={d.key for d in space if type(OmegaConf.select(base, d.key, default=None)) is int},
        reference_cache_set=base.reference.cache_dir is not None,
        reference_mode="online" if base.reference.mode == "online" and online_reference else "precompute",
        seed=base.trainer.seed,
        worker=worker or (0, 1),
    )
    sweep.load_records()
    run_trials = run_grid if spec.search == "grid" else run_optuna
    if worker is not None:  # one of --parallel K's processes: its trials only
        return {}, run_trials(sweep)
    if info.is_main:
        write_json(out.state, summary(sweep))
    if parallel > 1:
        if spec.search == "grid":
            grid_configs(sweep)  # a bad value: one line before any worker starts
        done = run_workers(spec, out.root, online_reference, parallel)
        sweep.load_records()  # the trials the workers ran
    else:
        done = run_trials(sweep)
    result = summary(sweep)
    if info.is_main:
        write_json(out.state, result)
        if result["best"] is not None:
            best = OmegaConf.load(RunDir(out.root / result["best"]).config)
            OmegaConf.save(best, out.best)
        log(summary_table(result))
    return result, done


def grid_configs(sweep: Sweep) -> list[dict[str, str]]:
    """The grid's trials, each trial's config loaded (and so checked) before any training."""
    trials = grid_trials(sweep.space)
    for number, params in enumerate(trials):
        sweep.trial_config(number, params)
    return trials


def run_grid(sweep: Sweep) -> bool:
    """Every combination in order (checked up front: a bad value stops the sweep before any training)."""
    trials = grid_configs(sweep)
    log(f"grid: {len(trials)} trials over {', '.join(d.key for d in sweep.space)}")
    for number, params in enumerate(trials):
        previous = sweep.records.get(number)
        if (previous is not None and previous.state in ENDED) or number % sweep.worker[1] != sweep.worker[0]:
            continue
        _, ended = sweep.run_trial(number, params)
        if not ended:
            return False
    return True


def suggest(trial: Any, space: Sequence[Dimension], integer_keys: set[str]) -> dict[str, str]:
    """An Optuna trial's values as override texts (a resumed trial returns the values it drew before)."""
    params = {}
    for dim in space:
        if isinstance(dim, Values):
            params[dim.key] = trial.suggest_categorical(dim.key, list(dim.texts))
        elif dim.key in integer_keys:
            params[dim.key] = str(trial.suggest_int(dim.key, int(dim.low), int(dim.high), log=dim.log))
        else:
            params[dim.key] = repr(trial.suggest_float(dim.key, dim.low, dim.high, log=dim.log))
    return params


def open_study(sweep: Sweep) -> Any:
    """The Optuna study in ``DIR/study.db`` (created, or loaded to resume) with the median pruner (no trial
    pruned before the first trial ended, nor at step 0); ``sampler`` draws each trial's values."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep.root.root.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name="preftune-sweep",
        storage=f"sqlite:///{sweep.root.study}",
        load_if_exists=True,
        direction=sweep.direction,
        sampler=sampler(sweep, 0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )


def sampler(sweep: Sweep, number: int) -> Any:
    """TPE for trial ``number``, seeded by ``trainer.seed`` + ``number``: its values depend on the seed and the
    trials before it only, so a search killed and resumed draws what it would have drawn in one go."""
    import optuna

    return optuna.samplers.TPESampler(seed=sweep.seed + number)


def _next_optuna_trial(sweep: Sweep, study: Any) -> tuple[Any, int, dict[str, str]] | None:
    """Rank 0's next trial (a started one first, else a new one), or None when ``--trials`` have ended."""
    from optuna.trial import Trial, TrialState

    index, workers = sweep.worker
    trials = study.get_trials(deepcopy=False)
    running = [
        t
        for t in trials
        if t.state == TrialState.RUNNING and t.user_attrs.get("worker", 0) % workers == index
    ]
    if running:
        trial = Trial(study, running[0]._trial_id)  # resumed: its values are read back from the study
    elif len(trials) < sweep.spec.trials:
        study.sampler = sampler(sweep, len(trials))
        trial = study.ask()
        trial.set_user_attr("worker", index)
    else:
        return None
    return trial, trial.number, suggest(trial, sweep.space, sweep.integer_keys)


def run_optuna(sweep: Sweep) -> bool:
    """TPE trials until ``--trials`` have ended; rank 0 holds the study and tells every rank the next trial."""
    study = open_study(sweep) if sweep.info.is_main else None
    while True:
        chosen = _next_optuna_trial(sweep, study) if study is not None else None
        number_params = gather_objects(chosen[1:] if chosen else None, sweep.info)[0]
        if number_params is None:
            return True
        number, params = number_params
        trial = chosen[0] if chosen else None
        sweep.trial_config(number, params)  # a value the config refuses: one line before training
        previous = sweep.records.get(number)
        if previous is not None and previous.state in ENDED:  # ended, but the study was not told (killed)
            if study is not None:
                _tell(study, trial, previous)
            continue
        if sweep.spec.prune and _pruned_before_kill(sweep, study, trial, number, params):
            continue
        should_stop = _pruning(sweep, trial) if sweep.spec.prune else None
        record, ended = sweep.run_trial(number, params, should_stop)
        if not ended:
            return False
        if study is not None:
            _tell(study, trial, record)


def _pruned_before_kill(sweep: Sweep, study: Any, trial: Any, number: int, params: dict[str, str]) -> bool:
    """A resumed trial the pruner had already stopped at its last reported validation (the sweep was killed
    before the trial ended): recorded and told as pruned there, not trained on. Every rank gets the answer."""
    pruned = False
    if study is not None:
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        if frozen.intermediate_values and trial.should_prune():
            step = max(frozen.intermediate_values)
            record = sweep.new_record(number, params, sweep.trial_config(number, params))
            record.state, record.steps, record.metric = "pruned", step, frozen.intermediate_values[step]
            sweep.save_record(record)
            _tell(study, trial, record)
            pruned = True
    return gather_objects(pruned, sweep.info)[0]


def _tell(study: Any, trial: Any, record: TrialRecord) -> None:
    from optuna.trial import TrialState

    if record.state == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, record.metric)


def worker_command(spec: SweepSpec, root: Path, online_reference: bool, worker: str) -> list[str]:
    """The ``preftune sweep`` arguments of worker ``I/K`` of a ``--parallel K`` sweep."""
    args = ["sweep", "--config", spec.config, "--output-dir", str(root), "--grid", *spec.grid]
    args += ["--search", spec.search, "--metric", spec.metric, "--worker", worker]
    args += ["--trials", str(spec.trials)] * (spec.search == "optuna")
    return args + ["--prune"] * spec.prune + ["--online-reference"] * online_reference


def run_workers(spec: SweepSpec, root: Path, online_reference: bool, parallel: int) -> bool:
    """``--parallel K``: K workers, each on its own group of this node's GPUs (torchrun when a group has
    several), stop signals passed on to them. The others start once worker 0's first trial (trial 0) is
    training, so the tokenization and reference caches they read exist. Whether every worker ended its
    trials."""
    import torch

    per_group = torch.cuda.device_count() // parallel
    procs: list[subprocess.Popen] = []

    def forward(signum: int, frame: Any) -> None:
        for proc in procs:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        for index in range(parallel):
            devices = ",".join(str(d) for d in range(index * per_group, (index + 1) * per_group))
            launcher = [sys.executable]
            if per_group > 1:
                launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={per_group}"]
            worker = worker_command(spec, root, online_reference, f"{index}/{parallel}")
            command = [*launcher, "-m", "preftune", *worker]
            log(f"worker {index}: CUDA_VISIBLE_DEVICES={devices} {' '.join(command[1:])}")
            procs.append(subprocess.Popen(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": devices}))
            while index == 0 and procs[0].poll() is None and not SweepDir(root).trial(0).metrics.exists():
                time.sleep(1)  # metrics.jsonl is opened after the data and reference caches are written
        codes = [proc.wait() for proc in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if any(code not in (0, EXIT_STOPPED) for code in codes):
        raise RuntimeError(f"--parallel {parallel}: worker exit statuses {codes} (see their output above)")
    return all(code == 0 for code in codes)


def _pruning(sweep: Sweep, trial: Any) -> Callable[[int, dict], bool]:
    """``should_stop`` for the trainer: rank 0 reports the metric and asks the pruner."""

    def should_stop(step: int, metrics: dict[str, float]) -> bool:
        if trial is None:
            return False
        trial.report(metric_value(metrics, sweep.spec.metric, f"trial {trial.number}"), step)
        return trial.should_prune()

    return should_stop


def summary(sweep: Sweep) -> dict[str, Any]:
    """``sweep.json``: the spec, every trial's record, the best ended trial, the shared work counted."""
    records = [sweep.records[n] for n in sorted(sweep.records)]
    scored = [
        r for r in records if r.state == "complete" and r.metric is not None and not math.isnan(r.metric)
    ]
    sign = 1 if sweep.direction == "minimize" else -1
    best = min(scored, key=lambda r: sign * r.metric) if scored else None
    return {
        "spec": asdict(sweep.spec),
        "direction": sweep.direction,
        "varied": [d.key for d in sweep.space],
        "shared_overrides": sweep.shared,
        "reference_mode": sweep.reference_mode,
        "trials": [asdict(r) for r in records],
        "best": best.dir if best else None,
        "tokenizations": sum(r.tokenized for r in records),
        "reference_passes": sum(r.reference_pass for r in records),
    }


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def summary_table(result: dict[str, Any]) -> str:
    """The printed result: one row per trial (the best marked *), then the shared work."""
    metric = result["spec"]["metric"]
    header = ["trial", *result["varied"], metric, "steps", "wall time", "state"]
    rows = []
    for r in result["trials"]:
        value = "—" if r["metric"] is None else f"{r['metric']:.4f}"
        mark = " *" if r["dir"] == result["best"] else ""
        params = [_shown(r["params"][k]) for k in result["varied"]]
        rows.append(
            [r["dir"] + mark, *params, value, str(r["steps"]), f"{r['wall_time_s']:.1f} s", r["state"]]
        )
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    n = len(result["trials"])
    if result["reference_mode"] == "online":
        lines.append(
            f"tokenizations: {result['tokenizations']} for {n} trials (reference: online, every step)"
        )
    else:
        passes = result["reference_passes"]
        lines.append(f"tokenizations: {result['tokenizations']}, reference passes: {passes} for {n} trials")
    if result["best"]:
        lines.append(f"best: {result['best']} (config: best.yaml)")
    return "sweep result:\n" + "\n".join(lines)
