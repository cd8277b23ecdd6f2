import glob
import os

import pytest
import yaml

from adarank import AdaRankCfg, AdaRankConfig, ConfigError, RunConfig, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_the_originals():
    c = AdaRankConfig()
    assert (c.r0, c.r_max, c.alpha, c.tol, c.check_every, c.warmup_steps) == (4, 64, 2, 0.10, 50, 50)
    assert c.lora_alpha_ratio == 2 and AdaRankCfg is AdaRankConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r0": 0}, "adarank.r0"),
        ({"r0": 65}, "adarank.r0"),
        ({"alpha": 0}, "adarank.alpha"),
        ({"tol": -0.1}, "adarank.tol"),
        ({"criterion": "loss-ish"}, "adarank.criterion"),
        ({"strategy": "grow"}, "adarank.strategy"),
        ({"check_every": 0}, "adarank.check_every"),
        ({"lora_dropout": 1.0}, "adarank.lora_dropout"),
        ({"r0": "4"}, "adarank.r0"),
        ({"target_modules": []}, "adarank.target_modules"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        AdaRankConfig(**kwargs)


def test_unknown_fields_and_sections_are_rejected():
    with pytest.raises(ConfigError, match=r"adarank\.rank"):
        RunConfig.from_dict({"adarank": {"rank": 4}})
    with pytest.raises(ConfigError, match="unknown section"):
        RunConfig.from_dict({"optim": {}})


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("adarank:\n  r0: 4\n")
    cfg = load_config(str(path), ["adarank.tol=0.05", "adarank.target_modules=[query, value]", "train.max_steps=7"])
    assert cfg.adarank.tol == 0.05 and cfg.adarank.target_modules == ["query", "value"] and cfg.train.max_steps == 7
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(str(path), ["tol=0.05"])
    with pytest.raises(ConfigError, match=r"adarank\.r0"):
        load_config(str(path), ["adarank.r0=100"])
    # YAML 1.1 reads 1e-3 as a string; numbers written that way are taken as numbers
    cfg = load_config(str(path), ["train.lr=1e-3", "adarank.tol=1e9"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float) and cfg.adarank.tol == 1e9
    with pytest.raises(ConfigError, match="train.lr must be a number, got 'fast'"):
        load_config(str(path), ["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        load_config(str(path), ["train.lr=nan"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/c.yaml")


SHIPPED = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", [p for p in SHIPPED if os.path.basename(p) != "_tasks.yaml"])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.task and cfg.model.name_or_path
    assert cfg.to_dict()["adarank"]["r0"] == cfg.adarank.r0


@pytest.mark.parametrize("tasks_file", [p for p in SHIPPED if os.path.basename(p) == "_tasks.yaml"])
def test_every_shipped_tasks_file_applies_to_its_suite(tasks_file):
    """A GLUE suite's `_tasks.yaml` holds per-task overrides, not a config: each task's overrides load
    with every method of its suite and set what the file says."""
    from adarank.bench import suite_methods, task_overrides
    from adarank.tasks import TASKS

    suite = os.path.dirname(tasks_file)
    with open(tasks_file, encoding="utf-8") as fh:
        per_task = yaml.safe_load(fh) or {}
    for task in TASKS:
        for config in suite_methods(suite).values():
            cfg = load_config(config, task_overrides(suite, task))
            assert cfg.data.task == task
            for section, fields in (per_task.get(task) or {}).items():
                for field, value in fields.items():
                    assert getattr(getattr(cfg, section), field) == value, (task, config, section, field)


def test_shipped_configs_exist():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))}
    assert {"mrpc_t5_base.yaml", "mrpc_minilm.yaml", "mrpc_minilm_lora_r8.yaml"} <= names


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"data": {"eval_split": "test"}}, "data.eval_split"),  # test splits are reserved
        ({"data": {"dev_fraction": 1.0}}, "data.dev_fraction"),
        ({"data": {"dev_fraction": 0}}, "data.dev_fraction"),
        ({"data": {"dev_seed": -1}}, "data.dev_seed"),
        ({"data": {"prompt_style": "t5-paper"}}, "data.prompt_style"),
        ({"select": {"lr": []}}, "select.lr"),
        ({"select": {"lr": [1e-3, "fast"]}}, "select.lr"),
        ({"select": {"lr": [1e-3, 0.0]}}, "select.lr"),
        ({"select": {"lr": [1e-3, 1e-3]}}, "select.lr"),
        ({"select": {"seeds": []}}, "select.seeds"),
        ({"select": {"metric": "loss"}}, "select.metric"),
    ],
)
def test_protocol_fields_are_checked(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        RunConfig.from_dict(raw)


def test_select_grid_reads_yaml_numbers_and_may_change_on_resume():
    from adarank.config import RESUME_MAY_CHANGE

    cfg = RunConfig.from_dict({"select": {"lr": ["1e-3", 3.0e-4]}})  # YAML 1.1 reads 1e-3 as a string
    assert cfg.select.lr == [1e-3, 3e-4] and cfg.data.eval_split == "validation"
    assert {"select.lr", "select.seeds", "select.metric"} <= set(RESUME_MAY_CHANGE)


def test_a_config_written_before_a_field_existed_compares_as_its_default():
    """Runs and results files written before a field existed resume and count as current when the field is
    at its default, and not when it is set otherwise."""
    from adarank.config import config_differences

    old = RunConfig().to_dict()
    del old["select"], old["data"]["eval_split"], old["data"]["dev_seed"]
    assert config_differences(old, RunConfig().to_dict()) == []
    assert config_differences(old, RunConfig.from_dict({"data": {"eval_split": "dev"}}).to_dict()) == ["data.eval_split"]


def test_significance_needs_a_window_of_two():
    with pytest.raises(ConfigError, match=r"adarank\.check_every must be >= 2 with criterion significance"):
        AdaRankConfig(criterion="significance", check_every=1, tol=2.0)
