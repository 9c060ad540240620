import json

import pytest

from llmdistill.config import ConfigError, apply_overrides, config_from_dict, deepspeed_config, load_config
from llmdistill.losses import Objective


def test_overrides_set_nested_values_with_yaml_types():
    raw = apply_overrides(
        {"train": {"lr": 1.0}}, ["train.lr=3e-4", "train.betas=[0.9, 0.99]", "deepspeed.zero_stage=3"]
    )
    cfg = config_from_dict(raw)
    assert cfg.train.lr == 3e-4 and cfg.train.betas == (0.9, 0.99) and cfg.deepspeed.zero_stage == 3


def test_override_into_the_loss_list():
    cfg = config_from_dict(apply_overrides({"loss": [{"name": "fkl"}]}, ["loss.0.temperature=2.0"]))
    assert cfg.loss[0].params == {"temperature": 2.0}


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.max_stepz: unknown key"):
        config_from_dict({"train": {"max_stepz": 3}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.max_steps: .*integer"):
        config_from_dict({"train": {"max_steps": "many"}})


def test_student_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of student.path"):
        config_from_dict({"student": {"path": "x", "from_teacher": {}}})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_loss_and_unknown_loss_parameter():
    cfg = config_from_dict({"loss": [{"name": "fkl", "temprature": 2.0}]})
    with pytest.raises(ConfigError, match=r"loss\.0 \(fkl\): unknown parameter\(s\) \['temprature'\]"):
        Objective(cfg.loss)
    with pytest.raises(ConfigError, match="unknown loss 'fkk'"):
        Objective(config_from_dict({"loss": [{"name": "fkk"}]}).loss)


def test_deepspeed_config_from_fields_file_and_extra(tmp_path):
    base = tmp_path / "ds.json"
    base.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 5.0}))
    cfg = config_from_dict(
        {
            "train": {"micro_batch_size": 4, "grad_accum": 2, "dtype": "bfloat16", "grad_clip": 0.5},
            "deepspeed": {
                "zero_stage": 3,
                "config_file": str(base),
                "offload_optimizer": True,
                "extra": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
            },
        }
    )
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"]
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] and zero["stage3_param_persistence_threshold"] == 0
    assert (
        zero["offload_optimizer"] == {"device": "cpu"} and zero["stage3_gather_16bit_weights_on_model_save"]
    )


def test_every_shipped_config_loads_and_starts_with_its_command():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and (".py" in first or "make " in first or "sbatch" in first), path
        if "evals/study.py" in first:
            continue  # a study plan, not a training config: tests/integration/test_study.py runs it
        load_config(path)
