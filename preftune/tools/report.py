"""``preftune report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page (PNG images embedded, opens
offline) of one or several runs: train and validation curves overlaid, each run's final validation
metrics, steps and wall time, the config keys that differ between the runs, and each run's latest samples.
With judged validation (``judged.jsonl``) or ``preftune eval --all-checkpoints`` results
(``eval_checkpoints.json``): win rate, length-controlled win rate, judged reward and length ratio against
steps, and the reference's and the policy's generations side by side with their rewards. The PNGs are also
written beside the page; runs are named by their paths relative to their common parent. A sweep's
directory (``preftune sweep``) reports its trials, labelled by the values they vary, plus the sweep's metric
against each varied key."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from preftune.errors import ConfigError
from preftune.run_dir import RunDir, SweepDir
from preftune.training.trackers import flat_config

# (file name, title, metric names): one figure each, train solid, validation dashed.
PANELS = (
    ("loss", "loss", ("loss",)),
    ("preference_loss", "preference loss", ("preference_loss",)),
    ("sft_loss", "SFT loss", ("sft_loss",)),
    ("acc", "accuracy (reward chosen > rejected)", ("acc",)),
    (
        "rewards",
        "rewards: chosen, rejected, margin",
        ("rewards_chosen_mean", "rewards_rejected_mean", "reward_margin_mean"),
    ),
    (
        "logps",
        "log-probs: policy and reference",
        ("logps_chosen_mean", "logps_rejected_mean", "ref_logps_chosen_mean", "ref_logps_rejected_mean"),
    ),
    ("grad_norm", "gradient norm", ("grad_norm",)),
    ("lr", "learning rate", ("lr",)),
    ("pairs_per_sec", "pairs / s", ("pairs_per_sec",)),
)
# The judged panels (``val/`` from judged validation, ``eval/`` from ``preftune eval --all-checkpoints``),
# with a reference line: where the policy equals the reference.
JUDGED_PANELS = (
    ("win_rate", "win rate against the reference (ties half)", ("win_rate", "lc_win_rate"), 0.5),
    ("judge_reward", "judged reward: policy and reference", ("judge_reward", "judge_reward_reference"), None),
    ("length_ratio", "length ratio: policy / reference tokens", ("length_ratio",), 1.0),
)
FINAL_METRICS = ("loss", "preference_loss", "acc", "reward_margin_mean", "logps_chosen_mean")
FINAL_JUDGED = ("win_rate", "lc_win_rate", "judge_reward", "length_ratio")
SIDE_BY_SIDE = 6  # prompts shown with both generations
MAX_SAMPLES = 16  # samples shown per run


@dataclass
class Run:
    """What a run directory holds: ``metrics.jsonl``, ``config.yaml``, ``samples.jsonl``, ``judged.jsonl``
    and ``eval_checkpoints.json``."""

    name: str
    records: list[dict[str, Any]]  # metrics.jsonl, then eval_checkpoints.json's results as eval/ records
    config: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    judged: list[dict[str, Any]] = field(default_factory=list)

    def series(self, prefix: str, metric: str) -> tuple[list[int], list[float]]:
        points = [
            (r["step"], float(r[f"{prefix}/{metric}"])) for r in self.records if f"{prefix}/{metric}" in r
        ]
        return [p[0] for p in points], [p[1] for p in points]

    def final_val(self) -> dict[str, Any]:
        val = [r for r in self.records if any(k.startswith("val/") for k in r)]
        return val[-1] if val else {}

    def steps(self) -> int:
        return max((r["step"] for r in self.records), default=0)

    def wall_time(self) -> float | None:
        stamps = [r["timestamp"] for r in self.records if "timestamp" in r]
        return stamps[-1] - stamps[0] if len(stamps) > 1 else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def load_run(run_dir: str | Path) -> Run:
    run = RunDir(run_dir)
    if not run.metrics.is_file():
        raise ConfigError(f"{run.root}: no {run.metrics.name} (not a preftune run directory)")
    config = flat_config(OmegaConf.load(run.config)) if run.config.is_file() else {}
    records = read_jsonl(run.metrics)
    if run.eval_checkpoints.is_file():  # preftune eval --all-checkpoints
        results = json.loads(run.eval_checkpoints.read_text())["results"].values()
        records += [
            {"step": r["step"], **{f"eval/{k}": v for k, v in r["metrics"].items()}}
            for r in sorted(results, key=lambda r: r["step"])
        ]
    return Run(run.root.name, records, config, read_jsonl(run.samples), read_jsonl(run.judged))


def run_labels(runs: list[Run], dirs: list[Path]) -> None:
    """Legend labels: each run's path relative to the runs' common parent (one run: its parent's name and
    its own, as ``demo/run``)."""
    paths = [d.resolve() for d in dirs]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    if common in paths:  # one run directory inside another
        common = common.parent
    for run, path in zip(runs, paths, strict=True):
        run.name = str(path.relative_to(common.parent if len(paths) == 1 else common))


def config_differences(runs: list[Run]) -> dict[str, list[Any]]:
    """The config keys whose values are not the same in every run (``output_dir`` aside)."""
    keys = sorted({k for run in runs for k in run.config} - {"output_dir"})
    table = {k: [run.config.get(k, "—") for run in runs] for k in keys}
    return {k: values for k, values in table.items() if len({json.dumps(v) for v in values}) > 1}


# How each source is drawn: train a line, validation and --all-checkpoints points on a thinner line.
SOURCES = (
    ("train", {"alpha": 0.9}),
    ("val", {"marker": "o", "markersize": 4, "alpha": 0.7}),
    ("eval", {"marker": "s", "markersize": 4, "alpha": 0.7}),
)


def draw_panels(
    runs: list[Run], out_dir: Path, panels: tuple = PANELS, level: dict[str, float | None] | None = None
) -> dict[str, Path]:
    """One PNG per panel with data, in ``out_dir``; the legend sits below the axes, never over a curve.
    ``level``: a panel's horizontal reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = {}
    for name, title, metrics, *_ in panels:
        fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
        drawn = 0
        for i, run in enumerate(runs):
            for j, metric in enumerate(metrics):
                # several metrics: a colour each, a line style per run; one metric: a colour per run
                color = colors[(j if len(metrics) > 1 else i) % len(colors)]
                style = ("-", "--", ":", "-.")[(i if len(metrics) > 1 else 0) % 4]
                label_metric = f" {metric}" if len(metrics) > 1 else ""
                for prefix, options in SOURCES:
                    steps, values = run.series(prefix, metric)
                    if steps:
                        label = f"{run.name} {prefix}{label_metric}"
                        ax.plot(steps, values, style, color=color, label=label, **options)
                        drawn += 1
        if drawn:
            if level and level.get(name) is not None:
                ax.axhline(level[name], color="0.5", linewidth=0.8, zorder=0)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2 if drawn > 3 else 1)
            path = out_dir / f"{name}.png"
            fig.savefig(path, bbox_inches="tight")
            written[name] = path
        plt.close(fig)
    return written


def _cell(value: Any) -> str:
    """A table cell: numbers to 4 significant digits, true / false / null and lists as YAML writes them."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def _text(value: str) -> str:
    """A generation's text; one decoded before it was cut at a whole character ends in U+FFFD: dropped."""
    return html.escape(value.rstrip("\ufffd"))


def _table(header: list[str], rows: list[list[Any]], generated: bool = False) -> str:
    """An HTML table; ``generated``: its text cells hold prompts and generations (pre-wrapped, monospace,
    a cut character dropped)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    cell = (lambda v: _text(v) if isinstance(v, str) else _cell(v)) if generated else _cell
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table{' class=gen' if generated else ''}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _images(images: dict[str, Path]) -> str:
    tags = "".join(
        f"<img alt='{name}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"
        for name, path in images.items()
    )
    return f"<div class='grid'>{tags}</div>"


def better(outcome: float) -> str:
    return {1.0: "policy", 0.0: "reference", 0.5: "tie"}.get(outcome, "not judged")


def side_by_side(run: Run) -> str:
    """The run's latest judged validation: its tally, then up to ``SIDE_BY_SIDE`` prompts (those one side won
    first) with the reference's and the policy's generations and their rewards."""
    last = max(r["step"] for r in run.judged)
    judged = [r for r in run.judged if r["step"] == last]
    tally = Counter(better(r["outcome"]) for r in judged)
    shown = sorted(judged, key=lambda r: better(r["outcome"]) in ("tie", "not judged"))[:SIDE_BY_SIDE]
    rows = [
        [
            r["prompt"],
            r["reference"],
            r["reference_reward"],
            r["generation"],
            r["reward"],
            better(r["outcome"]),
        ]
        for r in shown
    ]
    header = ["prompt", "reference", "reward", f"policy, step {last}", "reward", "better"]
    unjudged = f", {tally['not judged']} not judged" if tally["not judged"] else ""
    summary = (
        f"{len(judged)} prompts judged: the policy better on {tally['policy']}, the reference on "
        f"{tally['reference']}, {tally['tie']} ties{unjudged}"
    )
    return (
        f"<h3>{html.escape(run.name)}, step {last}</h3><p>{summary}; {len(rows)} shown, decided ones first</p>"
        + _table(header, rows, generated=True)
    )


def render_html(runs: list[Run], images: dict[str, Path], judged_images: dict[str, Path]) -> str:
    judged_columns = [m for m in FINAL_JUDGED if any(f"val/{m}" in run.final_val() for run in runs)]
    finals = []
    for run in runs:
        val, wall = run.final_val(), run.wall_time()
        finals.append(
            [run.name, run.steps(), "—" if wall is None else f"{wall:.0f} s", val.get("step", "—")]
            + [val.get(f"val/{m}", "—") for m in (*FINAL_METRICS, *judged_columns)]
        )
    diffs = config_differences(runs)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>preftune report</title><style>",
        "body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 24px}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px;vertical-align:top}"
        ".gen td{white-space:pre-wrap;overflow-wrap:anywhere;max-width:380px;font-family:monospace;"
        "font-size:12px}"
        "th{background:#f3f3f3}img{margin:4px;border:1px solid #eee}.grid{display:flex;flex-wrap:wrap;"
        "align-items:flex-start}",
        "</style></head><body>",
        f"<h1>preftune report: {html.escape(', '.join(r.name for r in runs))}</h1>",
        "<h2>Final validation metrics</h2>",
        _table(["run", "steps", "wall time", "val step", *FINAL_METRICS, *judged_columns], finals),
        "<h2>Config keys that differ</h2>",
        _table(["key", *(r.name for r in runs)], [[k, *v] for k, v in diffs.items()])
        if diffs
        else "<p>none: the runs share one config.</p>",
    ]
    if judged_images:
        parts += ["<h2>Judged against the reference</h2>", _images(judged_images)]
        parts += [side_by_side(run) for run in runs if run.judged]
    parts += ["<h2>Curves</h2>", _images(images), "<h2>Latest samples</h2>"]
    for run in runs:
        if not run.samples:
            parts.append(
                f"<h3>{html.escape(run.name)}</h3><p>no samples (trainer.samples.num_prompts: 0)</p>"
            )
            continue
        last = max(s["step"] for s in run.samples)
        latest = [s for s in run.samples if s["step"] == last]
        rows = [[s["prompt"], s["chosen"], s["generation"], s["num_tokens"]] for s in latest[:MAX_SAMPLES]]
        shown = f" (the first {len(rows)} of {len(latest)})" if len(rows) < len(latest) else ""
        parts.append(f"<h3>{html.escape(run.name)}, step {last}{shown}</h3>")
        parts.append(_table(["prompt", "chosen (data)", "generation", "tokens"], rows, generated=True))
    parts.append("</body></html>")
    return "\n".join(parts)


# -- a sweep's directory (``preftune sweep``): its trials as the runs, plus the metric against each key -----


def read_sweep(path: Path) -> dict[str, Any] | None:
    """``sweep.json`` when ``path`` is a sweep's directory, else None."""
    file = SweepDir(path).state
    return json.loads(file.read_text()) if file.is_file() and not RunDir(path).metrics.exists() else None


def sweep_trial_dirs(root: Path, sweep: dict[str, Any]) -> list[Path]:
    """The trials that have logged metrics, in order."""
    dirs = [root / trial["dir"] for trial in sweep["trials"]]
    found = [d for d in dirs if RunDir(d).metrics.is_file()]
    if not found:
        raise ConfigError(f"{root}: no trial has logged metrics yet")
    return found


def label_trials(runs: list[Run], sweep: dict[str, Any]) -> None:
    """Legend labels: each trial's name and the values of the varied keys (``trial_000 beta=0.1 ...``)."""
    by_dir = {trial["dir"]: trial for trial in sweep["trials"]}
    for run in runs:
        params = by_dir[run.name]["params"]
        run.name += " " + " ".join(
            f"{key.rsplit('.', 1)[-1]}={_cell(params[key])}" for key in sweep["varied"]
        )


def draw_sweep(sweep: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """One PNG: the sweep's metric against each varied key (a panel per key; pruned trials as crosses, a
    log axis for a ``log:`` range, categories in the order listed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, keys = sweep["spec"]["metric"], sweep["varied"]
    scored = [t for t in sweep["trials"] if t["metric"] is not None]
    if not scored or not keys:
        return {}
    log_keys = {
        item.split("=", 1)[0] for item in sweep["spec"]["grid"] if item.split("=", 1)[1].startswith("log:")
    }
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = [t["params"][key] for t in scored]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            x = values
        else:
            categories = list(dict.fromkeys(json.dumps(v) for v in values))
            x = [categories.index(json.dumps(v)) for v in values]
            ax.set_xticks(range(len(categories)), [c.strip('"') for c in categories])
        for state, marker in (("complete", "o"), ("pruned", "x"), ("running", ".")):
            points = [(xi, t["metric"]) for xi, t in zip(x, scored, strict=True) if t["state"] == state]
            if points:
                ax.scatter(*zip(*points, strict=True), marker=marker, label=state)
        if key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{metric} by trial (pruned: last validation)")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sweep_metric.png"
    fig.savefig(path)
    plt.close(fig)
    return {"sweep_metric": path}


def write_report(run_dirs: list[str | Path], output: str | Path | None = None) -> Path:
    """Write the page (default: ``report.html`` in the first run directory) and its PNGs beside it. A sweep's
    directory alone stands for its trials."""
    dirs = [Path(d) for d in run_dirs]
    page = Path(output) if output else RunDir(dirs[0]).report
    sweep = read_sweep(dirs[0]) if len(dirs) == 1 else None
    if sweep is not None:
        dirs = sweep_trial_dirs(dirs[0], sweep)
    runs = [load_run(d) for d in dirs]
    run_labels(runs, dirs)
    if sweep is not None:
        label_trials(runs, sweep)
    png_dir = page.parent / f"{page.stem}_png"
    images = draw_panels(runs, png_dir)
    if sweep is not None:
        images = {**draw_sweep(sweep, png_dir), **images}
    levels = {name: level for name, _, _, level in JUDGED_PANELS}
    judged_images = draw_panels(runs, png_dir, JUDGED_PANELS, levels)
    page.write_text(render_html(runs, images, judged_images))
    return page
