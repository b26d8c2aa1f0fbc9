"""``preftune`` command line: ``train``, ``sweep``, ``inspect``, ``eval``, ``report``, ``export`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from preftune.errors import PreftuneError, PushError
from preftune.run_dir import RunDir
from preftune.training.launcher import env_rank
from preftune.training.stop_signals import EXIT_INTERRUPTED, EXIT_STOPPED

# Exit statuses (README "Failures and recovery"): a finished run, a mistake to fix, a run that stopped
# early and resumes with the same command (SIGTERM/SIGUSR1, Ctrl-C, trainer.max_time: requeue on it).
EXIT_FINISHED, EXIT_MISTAKE = 0, 2
TORCHRUN_GRACE_S = 10  # how long other ranks wait for torchrun to stop them once rank 0 reported a mistake


def _config(path: str | Path | None, overrides: Sequence[str]) -> DictConfig:
    """The checked config (imported here: ``preftune --help`` loads no checks)."""
    from preftune.config_checks import load_config

    return load_config(path, overrides)


def _train(args: argparse.Namespace) -> int:
    cfg = _config(args.config, args.overrides)  # a mistake in it is reported before torch is imported
    from preftune.recipe import run_training
    from preftune.training.distributed import shutdown

    try:
        result = run_training(cfg)
    except BaseException:
        shutdown(wait=False)
        raise
    shutdown()
    return EXIT_FINISHED if result.finished else EXIT_STOPPED


def _inspect(args: argparse.Namespace) -> int:
    from preftune.config_checks import check_environment

    cfg = _config(args.config, args.overrides)
    check_environment(cfg, tokenizer_only=True)  # inspect reads the tokenizer, not the model
    from preftune.tools.inspect_data import run_inspect

    return run_inspect(cfg, args.json)


def _demo(args: argparse.Namespace) -> int:
    from preftune.recipe import log, train
    from preftune.tools.demo import prepare_demo, rule_share
    from preftune.tools.report import write_report
    from preftune.training.console import quiet_libraries

    quiet_libraries()
    if args.online:
        return _demo_online(args)
    paths = prepare_demo(Path(args.output_dir))
    cfg = _config(paths["config"], args.overrides)
    metrics = train(cfg)
    acc = metrics.get("acc", float("nan"))
    log(f"demo config: {paths['config']}")
    log(f"held-out pairs: acc {acc:.3f}, loss {metrics.get('loss', float('nan')):.4f} (acc was 0 at step 0)")
    run = RunDir(cfg.output_dir)
    if run.samples.is_file():
        share = rule_share(run.samples)
        first, last = min(share), max(share)
        log(
            f"greedy generations for held-out prompts that obey the rule: {share[first]:.0%} at step {first}, "
            f"{share[last]:.0%} at step {last}"
        )
    if "win_rate" in metrics:
        log(
            f"judged by the rule against the step-0 model on {cfg.trainer.judge_prompts} held-out prompts: "
            f"win rate {metrics['win_rate']:.3f}, length-controlled {metrics['lc_win_rate']:.3f} "
            f"(length ratio {metrics['length_ratio']:.2f})"
        )
    log(
        f"run directory: {run.root}  ({run.metrics.name}, {run.samples.name}, {run.judged.name}, "
        f"{run.checkpoints.name}/step_N/model)"
    )
    log(f"report: {write_report([cfg.output_dir])}")
    return 0


def _demo_online(args: argparse.Namespace) -> int:
    """``demo --online``: online DPO from the offline demo's last checkpoint (the offline demo first if it has
    not run in ``--output-dir``), judged by the demo's rule; the rule share of greedy held-out generations
    before and after."""
    from preftune.recipe import log, train
    from preftune.tools.demo import online_demo_config, rule_share
    from preftune.training.checkpoint import Checkpointer

    demo_dir = Path(args.output_dir)
    checkpoint = Checkpointer(demo_dir / "run").latest()
    if checkpoint is None:
        log(f"no offline demo in {demo_dir}: running it first")
        _demo(argparse.Namespace(output_dir=args.output_dir, overrides=[], online=False))
        checkpoint = Checkpointer(demo_dir / "run").latest()
    cfg = _config(online_demo_config(demo_dir, checkpoint / "model"), args.overrides)
    train(cfg)
    share = rule_share(RunDir(cfg.output_dir).samples)
    first, last = min(share), max(share)
    log(
        f"greedy generations for held-out prompts that obey the rule: {share[first]:.0%} from the offline "
        f"checkpoint ({checkpoint.name}), {share[last]:.0%} after {last} online steps"
    )
    log(f"run directory: {cfg.output_dir}  (generations.jsonl, samples.jsonl, metrics.jsonl)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from preftune.config_checks import check_environment

    cfg = _config(args.config, args.overrides)
    check_environment(cfg)
    from preftune.tools.evaluate import run_eval, run_eval_all

    if args.all_checkpoints:
        return run_eval_all(cfg, args.all_checkpoints, args.json)
    return run_eval(cfg, args.checkpoint, args.json)


def _report(args: argparse.Namespace) -> int:
    from preftune.tools.report import write_report

    page = write_report(args.run_dirs, args.output)
    print(f"[preftune] report: {page}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from preftune.tools.export import export_checkpoint
    from preftune.tools.hub_upload import check_can_push, push_folder

    try:
        if args.push_to_hub:
            check_can_push(args.push_to_hub)
        out = export_checkpoint(args.checkpoint, args.output, merge=args.merge, hub_repo=args.push_to_hub)
        print(f"[preftune] exported {args.checkpoint} to {out}")
        if args.push_to_hub:
            print(f"[preftune] pushed {out} to {push_folder(out, args.push_to_hub, private=args.private)}")
    except PushError as e:
        print(f"preftune: error: {e}", file=sys.stderr)
        return EXIT_MISTAKE if e.user_fixable else 1
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"preftune: error: {e}", file=sys.stderr)
        return EXIT_MISTAKE
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from preftune.sweep import SweepSpec, run_sweep
    from preftune.training.distributed import shutdown

    config = args.config if args.config.startswith("preset:") else str(Path(args.config).resolve())
    spec = SweepSpec(config, args.grid, args.search, args.trials or 0, args.metric, args.prune)
    try:
        worker = tuple(int(n) for n in args.worker.split("/")) if args.worker else None
        _, done = run_sweep(
            spec,
            Path(args.output_dir),
            online_reference=args.online_reference,
            parallel=args.parallel,
            worker=worker,
        )
    except BaseException:
        shutdown(wait=False)
        raise
    shutdown()
    return EXIT_FINISHED if done else EXIT_STOPPED


def _presets(args: argparse.Namespace) -> int:
    from preftune.tools.presets import describe_presets

    print(describe_presets())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune", description="Preference optimisation (DPO family) for causal LMs"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_commands(sub)
    add_tool_commands(sub)
    add_sweep_command(sub)
    add_demo_commands(sub)
    return parser


def add_run_commands(sub: argparse._SubParsersAction) -> None:
    """``train``, ``inspect`` and ``eval``: commands on one config."""
    train = sub.add_parser("train", help="train (or resume) from a YAML config")
    train.add_argument("--config", required=True, help="YAML config file, or preset:NAME (preftune presets)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-6")
    train.set_defaults(run=_train)
    inspect = sub.add_parser(
        "inspect", help="read and tokenize the configured data as training would, and report on it"
    )
    inspect.add_argument("--config", required=True, help="YAML config file")
    inspect.add_argument("--json", help="also write the report as JSON to this path")
    inspect.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.format=trl")
    inspect.set_defaults(run=_inspect)
    evaluate = sub.add_parser(
        "eval",
        help="validation metrics (judged ones with a judge) of a checkpoint, of model.path, or of every "
        "checkpoint of a run",
    )
    evaluate.add_argument("--config", required=True, help="YAML config file (the run's config.yaml works)")
    which = evaluate.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="output_dir/checkpoints/step_N; omitted: model.path itself")
    which.add_argument(
        "--all-checkpoints",
        metavar="RUN_DIR",
        help="every checkpoint of the run in step order (resumable: results kept in RUN_DIR/eval_checkpoints.json)",
    )
    evaluate.add_argument("--json", help="also write the metrics (the table) as JSON to this path")
    evaluate.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. data.validation=f.jsonl"
    )
    evaluate.set_defaults(run=_eval)


def add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """``report`` and ``export``: commands on what runs wrote."""
    report = sub.add_parser("report", help="an HTML page of curves, final metrics and samples of runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run output directories")
    report.add_argument("--output", help="the page to write (default: RUN_DIR/report.html, the first)")
    report.set_defaults(run=_report)
    export = sub.add_parser("export", help="write a checkpoint's policy as a plain Hugging Face model")
    export.add_argument(
        "--checkpoint", required=True, help="a checkpoint directory, output_dir/checkpoints/step_N"
    )
    export.add_argument("--output", required=True, help="directory to write (must be new or empty)")
    export.add_argument(
        "--merge", action="store_true", help="merge a LoRA adapter into its base model's weights"
    )
    export.add_argument("--push-to-hub", metavar="REPO", help="upload the export to this Hub model repo")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    export.set_defaults(run=_export)


def add_sweep_command(sub: argparse._SubParsersAction) -> None:
    """``sweep``: one config over a grid or a search."""
    sweep = sub.add_parser(
        "sweep",
        help="train one config over a grid or an Optuna search, sharing tokenization and the reference",
    )
    sweep.add_argument("--config", required=True, help="the base YAML config (or preset:NAME)")
    sweep.add_argument(
        "--grid",
        required=True,
        nargs="+",
        action="extend",
        metavar="KEY=SPEC",
        help="KEY=V1,V2,... (values), KEY=LOW:HIGH or KEY=log:LOW:HIGH (ranges, with --search optuna)",
    )
    sweep.add_argument("--search", default="grid", help="grid (every combination) or optuna (TPE)")
    sweep.add_argument("--trials", type=int, help="with --search optuna: how many trials")
    sweep.add_argument("--metric", default="val/loss", help="val/loss (lowest best), val/acc or val/win_rate")
    sweep.add_argument("--output-dir", default="runs/sweep", help="the sweep's directory (trial_NNN/ inside)")
    sweep.add_argument(
        "--prune",
        action="store_true",
        help="with --search optuna: stop trials below the median at validation",
    )
    sweep.add_argument(
        "--parallel", type=int, default=1, metavar="K", help="K trials side by side on K GPU groups"
    )
    sweep.add_argument(
        "--online-reference",
        action="store_true",
        help="keep reference.mode=online (default: precompute, one reference pass for every trial)",
    )
    sweep.add_argument("--worker", help=argparse.SUPPRESS)  # I/K: one of --parallel K's processes
    sweep.set_defaults(run=_sweep)


def add_demo_commands(sub: argparse._SubParsersAction) -> None:
    """``presets`` and ``demo``."""
    presets = sub.add_parser("presets", help="list the packaged configs usable as --config preset:NAME")
    presets.set_defaults(run=_presets)
    demo = sub.add_parser(
        "demo", help="build a tiny local model and preference set, train, validate, checkpoint"
    )
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument(
        "--online",
        action="store_true",
        help="continue from the offline demo's checkpoint with online DPO judged by the demo's rule",
    )
    demo.add_argument("overrides", nargs="*", help="dotted key=value overrides on the demo config")
    demo.set_defaults(run=_demo)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PreftuneError as e:  # a mistake to fix: its one line, exit 2
        _report_mistake(f"preftune: error: {e}")
        return EXIT_MISTAKE
    except KeyboardInterrupt:  # Ctrl-C before training started (during it, the trainer stops cleanly)
        if env_rank() == 0:
            print("\npreftune: interrupted before training started; nothing was saved", file=sys.stderr)
        return EXIT_INTERRUPTED


def _report_mistake(line: str) -> None:
    """Print a user's mistake once: every rank finds the same one, rank 0 says so. Under torchrun rank 0
    also leaves it in its error file and exits first (the others wait to be stopped), so torchrun's failure
    report names the line as its root cause instead of a traceback."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if env_rank() != 0:
        if error_file:
            time.sleep(TORCHRUN_GRACE_S)
        return
    print(line, file=sys.stderr)
    if error_file:
        record = {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}
        Path(error_file).write_text(json.dumps({"message": record}))
