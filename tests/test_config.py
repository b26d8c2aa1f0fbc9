"""Config loading: defaults, YAML, dotted overrides, unknown keys, required keys and value checks."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest
from omegaconf import ListConfig, OmegaConf
from omegaconf.errors import ValidationError

from preftune.config import DataConfig, default_config, known_keys, parse_max_time, parse_yaml
from preftune.config_checks import load_config
from preftune.errors import ConfigError

REQUIRED = ("model.path=/models/tiny", "data.train=/data/train.jsonl")


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(*overrides: str, path: Path | None = None):
    return load_config(path, [*REQUIRED, *overrides])


# ---------------------------------------------------------------- layering


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    yaml_path = write_yaml(
        tmp_path,
        "model:\n"
        "  path: /from/yaml\n"
        "data:\n"
        "  train: /yaml/train.jsonl\n"
        "  micro_batch_size: 2\n"
        "optim:\n"
        "  lr: 1.0e-5\n"
        "dpo:\n"
        "  preference_loss: ipo\n",
    )
    cfg = load_config(
        yaml_path,
        [
            "optim.lr=3.0e-5",
            "optim.betas=[0.9,0.95]",
            "trainer.max_steps=10",
            "model.path=/first",
            "model.path=/second",
        ],
    )
    # defaults that nobody touched
    assert cfg.model.dtype == "float32"
    assert cfg.data.global_batch_size == 8
    assert cfg.optim.sched.name == "cosine_with_warmup"
    # YAML over defaults
    assert cfg.data.micro_batch_size == 2
    assert cfg.dpo.preference_loss == "ipo"
    assert cfg.data.train == "/yaml/train.jsonl"
    # overrides over YAML, the later override wins
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.model.path == "/second"
    # types preserved
    assert isinstance(cfg.trainer.max_steps, int) and cfg.trainer.max_steps == 10
    assert isinstance(cfg.optim.lr, float)
    assert isinstance(cfg.optim.betas, ListConfig)
    assert list(cfg.optim.betas) == [0.9, 0.95]
    assert all(isinstance(b, float) for b in cfg.optim.betas)


def test_yaml_alone_sets_required_keys(tmp_path):
    yaml_path = write_yaml(tmp_path, "model: {path: /m}\ndata: {train: /t.jsonl, seed: 7}\n")
    cfg = load_config(yaml_path)
    assert cfg.model.path == "/m"
    assert cfg.data.seed == 7
    assert cfg.data.max_seq_length == default_config().data.max_seq_length


def test_overrides_alone_set_required_keys():
    cfg = load("dpo.ref_policy_kl_penalty=0.25")
    assert cfg.model.path == "/models/tiny"
    assert cfg.dpo.ref_policy_kl_penalty == pytest.approx(0.25)


def test_default_betas_are_two_floats():
    cfg = load()
    assert list(cfg.optim.betas) == [0.9, 0.98]


def test_missing_file_and_non_mapping_yaml_rejected(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", REQUIRED)
    yaml_path = write_yaml(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(yaml_path, REQUIRED)


# ---------------------------------------------------------------- unknown keys


def test_unknown_key_in_yaml_names_key_file_and_nearest(tmp_path):
    yaml_path = write_yaml(tmp_path, "dpo:\n  ref_policy_kl_penalt: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(yaml_path, REQUIRED)
    msg = str(info.value)
    assert str(yaml_path) in msg
    assert re.search(r"dpo\.ref_policy_kl_penalt(?!y)", msg)
    assert "dpo.ref_policy_kl_penalty" in msg


def test_unknown_key_in_override_names_key_and_nearest():
    with pytest.raises(ConfigError) as info:
        load("trainer.max_step=5")
    msg = str(info.value)
    assert re.search(r"trainer\.max_step(?!s)", msg)
    assert "trainer.max_steps" in msg
    # the nearest key is the trainer's, not the scheduler's max_steps
    assert "optim.sched.max_steps" not in msg


def test_unknown_top_level_key_in_override():
    with pytest.raises(ConfigError, match=r"output_dri"):
        load("output_dri=/tmp/x")


def test_unknown_nested_section_in_yaml(tmp_path):
    yaml_path = write_yaml(tmp_path, "optim:\n  schedule:\n    warmup_steps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(yaml_path, REQUIRED)
    msg = str(info.value)
    assert "optim.schedule" in msg
    assert "optim.sched" in msg.replace("optim.schedule", "")


def test_unknown_top_level_section_in_yaml(tmp_path):
    yaml_path = write_yaml(tmp_path, "logging:\n  level: debug\n")
    with pytest.raises(ConfigError, match="logging"):
        load_config(yaml_path, REQUIRED)


def test_unknown_key_inside_unknown_section_override():
    with pytest.raises(ConfigError, match=r"wandb"):
        load("wandb.project=x")


# ---------------------------------------------------------------- required keys


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError) as info:
        load_config(None, [])
    msg = str(info.value)
    assert "model.path" in msg
    assert "data.train" in msg


def test_only_the_missing_required_key_is_named():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.path=/m"])
    msg = str(info.value)
    assert "data.train" in msg
    assert "model.path" not in msg


# ---------------------------------------------------------------- value checks


@pytest.mark.parametrize(
    "value, expected", [("1", 1), ("50", 50), ("0.5", 0.5), ("1.0", 1.0), ("0.01", 0.01)]
)
def test_val_check_interval_accepted(value, expected):
    cfg = load(f"trainer.val_check_interval={value}")
    assert cfg.trainer.val_check_interval == pytest.approx(expected)
    assert type(cfg.trainer.val_check_interval) is type(expected)


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "0.0", "-0.5", "2.0"])
def test_val_check_interval_rejected(value):
    with pytest.raises(ConfigError, match="val_check_interval"):
        load(f"trainer.val_check_interval={value}")


def test_global_batch_must_be_multiple_of_micro_batch():
    with pytest.raises(ConfigError, match="global_batch_size"):
        load("data.micro_batch_size=4", "data.global_batch_size=6")
    cfg = load("data.micro_batch_size=4", "data.global_batch_size=12")
    assert cfg.data.global_batch_size == 12
    packed = load(
        "data.packing=true", "data.micro_batch_size=4", "data.global_batch_size=6"
    )  # rows, not pairs
    assert packed.data.micro_batch_size == 4


@pytest.mark.parametrize("beta", ["0", "0.0", "-0.1"])
def test_non_positive_beta_rejected(beta):
    with pytest.raises(ConfigError, match="ref_policy_kl_penalty"):
        load(f"dpo.ref_policy_kl_penalty={beta}")


@pytest.mark.parametrize("dtype", ["float8", "int8", "fp32", "bf16"])
def test_bad_dtype_rejected(dtype):
    with pytest.raises(ConfigError, match="dtype"):
        load(f"model.dtype={dtype}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_good_dtype_accepted(dtype):
    assert load(f"model.dtype={dtype}").model.dtype == dtype


@pytest.mark.parametrize("off", ["-1", "null"])
def test_minus_one_and_null_mean_no_limit_for_max_epochs_and_max_steps(off):
    """README: ``-1`` / ``null``: no limit, for either key; the run then ends at the other one."""
    assert load(f"trainer.max_epochs={off}", "trainer.max_steps=40").trainer.max_steps == 40
    assert load("trainer.max_epochs=2", f"trainer.max_steps={off}").trainer.max_epochs == 2
    with pytest.raises(ConfigError, match=r"^trainer.max_epochs and trainer.max_steps are both off"):
        load(f"trainer.max_epochs={off}", f"trainer.max_steps={off}")


@pytest.mark.parametrize("setting", ["trainer.max_epochs=0", "trainer.max_steps=0", "trainer.max_epochs=-2"])
def test_max_epochs_and_max_steps_below_one_rejected(setting):
    key, value = setting.split("=")
    with pytest.raises(ConfigError, match=rf"^{key}={value}: use a number >= 1, or -1 / null for no limit$"):
        load(setting, "trainer.max_steps=5" if "epochs" in key else "trainer.max_epochs=1")


def test_betas_must_be_a_pair():
    with pytest.raises(ConfigError, match="betas"):
        load("optim.betas=[0.9,0.95,0.99]")


# ---------------------------------------------------------------- max_time


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("00:01:30:00", 1 * 3600 + 30 * 60),
        ("01:00:00:00", 24 * 3600),
        ("02:03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
        ("90", 90),
        ("1:30", 60 + 30),
        ("1:00:00", 3600),
        ("0", 0),
    ],
)
def test_parse_max_time(text, seconds):
    assert parse_max_time(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["garbage", "", "1:2:3:4:5", "1::2", "-5", "00:-1:00:00", "1h30m", "a:b"])
def test_parse_max_time_rejects_garbage(text):
    with pytest.raises(ConfigError):
        parse_max_time(text)


def test_max_time_validated_by_load_config():
    with pytest.raises(ConfigError, match="max_time"):
        load("trainer.max_time=soon")
    cfg = load("trainer.max_time=00:01:30:00")
    assert parse_max_time(cfg.trainer.max_time) == pytest.approx(5400)


def test_max_time_days_field_from_override_means_days():
    # DD:HH:MM:SS with a non-zero first digit, written without quotes on the command line
    cfg = load("trainer.max_time=1:00:00:00")
    assert parse_max_time(cfg.trainer.max_time) == pytest.approx(86400)


def test_max_time_days_field_from_yaml_means_days(tmp_path):
    yaml_path = write_yaml(tmp_path, "trainer:\n  max_time: 2:12:00:00\n")
    cfg = load_config(yaml_path, REQUIRED)
    assert parse_max_time(cfg.trainer.max_time) == pytest.approx(2 * 86400 + 12 * 3600)


# ---------------------------------------------------------------- override syntax


@pytest.mark.parametrize("item", ["trainer.max_steps", "model.path", "justtext"])
def test_override_without_equals_rejected(item):
    with pytest.raises(ConfigError, match=re.escape(item)):
        load(item)


# ---------------------------------------------------------------- the schema


def test_default_yaml_equals_the_dataclasses():
    """``default.yaml`` (the commented file users read) holds every key of the dataclasses with the same
    default, and no other key."""
    text = resources.files("preftune").joinpath("configs/default.yaml").read_text()
    from_yaml = parse_yaml(text, "default.yaml")
    from_dataclasses = OmegaConf.to_container(default_config())
    assert from_yaml == from_dataclasses
    assert set(flat_keys(from_yaml)) == set(known_keys()), "a key missing on one side"


def flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict) and prefix + key not in ("data.train", "data.validation"):
            keys.extend(flat_keys(value, f"{prefix}{key}."))
    return keys


def test_sections_are_typed():
    cfg = load("data.micro_batch_size=2", "trainer.max_time=1:00:00")
    assert OmegaConf.get_type(cfg.data) is DataConfig
    assert isinstance(cfg.data.micro_batch_size, int) and cfg.data.micro_batch_size == 2
    assert cfg.trainer.max_time == "1:00:00"
    with pytest.raises(ValidationError):  # OmegaConf keeps checking after loading
        cfg.data.micro_batch_size = "two"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.betas=[a,b]", "optim.betas=['a', 'b']: expected a list of numbers"),
        ("data.columns.prompt=5", "data.columns.prompt=5: expected a string"),
        ("trainer.max_time=true", "trainer.max_time=True: expected a string or a number"),
        ("optim.lr={a: 1}", "optim.lr={'a': 1}: expected a number"),
        ("optim.betas=null", "optim.betas cannot be null: set it to a list of numbers"),
    ],
)
def test_values_are_checked_against_the_dataclass_types(override, message):
    with pytest.raises(ConfigError) as info:
        load(override)
    assert str(info.value) == f"override '{override}': {message}"


def test_free_form_keys_replace_earlier_values_whole():
    cfg = load(
        "data.train=[a, b]",
        "data.train={hub: x}",
        "dpo.preference_loss=[dpo, ipo]",
        "dpo.preference_loss=dpo",
    )
    assert dict(cfg.data.train) == {"hub": "x"} and cfg.dpo.preference_loss == "dpo"
