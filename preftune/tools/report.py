"""``preftune report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page (PNG images embedded, opens
offline) of one or several runs: train and validation curves overlaid, each run's final validation
metrics, steps and wall time, the config keys that differ between the runs, and each run's latest samples.
The PNGs are also written beside the page."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from preftune.errors import ConfigError
from preftune.run_dir import RunDir
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
FINAL_METRICS = ("loss", "preference_loss", "acc", "reward_margin_mean", "logps_chosen_mean")


@dataclass
class Run:
    """What a run directory holds: ``metrics.jsonl``, ``config.yaml`` and ``samples.jsonl``."""

    name: str
    records: list[dict[str, Any]]
    config: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)

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
    return Run(run.root.name, read_jsonl(run.metrics), config, read_jsonl(run.samples))


def run_labels(runs: list[Run], dirs: list[Path]) -> None:
    """Unique legend labels: the directory names, with their parents where two names clash."""
    if len({r.name for r in runs}) < len(runs):
        for run, path in zip(runs, dirs, strict=True):
            run.name = f"{path.resolve().parent.name}/{path.name}"


def config_differences(runs: list[Run]) -> dict[str, list[Any]]:
    """The config keys whose values are not the same in every run (``output_dir`` aside)."""
    keys = sorted({k for run in runs for k in run.config} - {"output_dir"})
    table = {k: [run.config.get(k, "—") for run in runs] for k in keys}
    return {k: values for k, values in table.items() if len({json.dumps(v) for v in values}) > 1}


def draw_panels(runs: list[Run], out_dir: Path) -> dict[str, Path]:
    """One PNG per panel with data, in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = {}
    for name, title, metrics in PANELS:
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        drawn = False
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            for j, metric in enumerate(metrics):
                style = ("-", "--", ":", "-.")[j % 4] if len(metrics) > 1 else "-"
                label_metric = f" {metric}" if len(metrics) > 1 else ""
                steps, values = run.series("train", metric)
                if steps:
                    ax.plot(
                        steps, values, style, color=color, alpha=0.9, label=f"{run.name} train{label_metric}"
                    )
                    drawn = True
                steps, values = run.series("val", metric)
                if steps:
                    ax.plot(
                        steps,
                        values,
                        style,
                        marker="o",
                        markersize=4,
                        color=color,
                        alpha=0.6,
                        label=f"{run.name} val{label_metric}",
                    )
                    drawn = True
        if drawn:
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path)
            written[name] = path
        plt.close(fig)
    return written


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(runs: list[Run], images: dict[str, Path]) -> str:
    finals = []
    for run in runs:
        val, wall = run.final_val(), run.wall_time()
        finals.append(
            [run.name, run.steps(), "—" if wall is None else f"{wall:.0f} s", val.get("step", "—")]
            + [val.get(f"val/{m}", "—") for m in FINAL_METRICS]
        )
    diffs = config_differences(runs)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>preftune report</title><style>",
        "body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 24px}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px;vertical-align:top}"
        "th{background:#f3f3f3}img{margin:4px;border:1px solid #eee}.grid{display:flex;flex-wrap:wrap}",
        "</style></head><body>",
        f"<h1>preftune report: {html.escape(', '.join(r.name for r in runs))}</h1>",
        "<h2>Final validation metrics</h2>",
        _table(["run", "steps", "wall time", "val step", *FINAL_METRICS], finals),
        "<h2>Config keys that differ</h2>",
        _table(["key", *(r.name for r in runs)], [[k, *v] for k, v in diffs.items()])
        if diffs
        else "<p>none: the runs share one config.</p>",
        "<h2>Curves</h2><div class='grid'>",
    ]
    for name, path in images.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<img alt='{name}' src='data:image/png;base64,{data}'>")
    parts.append("</div><h2>Latest samples</h2>")
    for run in runs:
        if not run.samples:
            parts.append(
                f"<h3>{html.escape(run.name)}</h3><p>no samples (trainer.samples.num_prompts: 0)</p>"
            )
            continue
        last = max(s["step"] for s in run.samples)
        rows = [
            [s["prompt"], s["chosen"], s["generation"], s["num_tokens"]]
            for s in run.samples
            if s["step"] == last
        ]
        parts.append(f"<h3>{html.escape(run.name)}, step {last}</h3>")
        parts.append(_table(["prompt", "chosen (data)", "generation", "tokens"], rows))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dirs: list[str | Path], output: str | Path | None = None) -> Path:
    """Write the page (default: ``report.html`` in the first run directory) and its PNGs beside it."""
    dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d) for d in dirs]
    run_labels(runs, dirs)
    page = Path(output) if output else RunDir(dirs[0]).report
    images = draw_panels(runs, page.parent / f"{page.stem}_png")
    page.write_text(render_html(runs, images))
    return page
