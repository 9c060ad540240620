import json

import pytest
from conftest import QUICK

from llmdistill.cli import main
from llmdistill.config import (
    ConfigError,
    apply_overrides,
    check_train_device,
    config_from_dict,
    deepspeed_config,
    load_config,
)
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


def test_files_and_overrides_read_exponent_floats_as_numbers(tmp_path):
    # YAML 1.1 (PyYAML) needs a dot in a float: `5e-1` was the string "5e-1", and a loss parameter (untyped)
    # reached the loss as that string.
    path = tmp_path / "config.yaml"
    path.write_text(
        "loss: [{name: fkl, temperature: 5e-1}, {name: ce, label_smoothing: 1E-1}]\ntrain: {lr: 2e-3}\n"
    )
    cfg = load_config(path)
    assert cfg.loss[0].params == {"temperature": 0.5} and cfg.loss[1].params == {"label_smoothing": 0.1}
    assert cfg.train.lr == 2e-3
    cfg = load_config(path, ["loss.0.temperature=2e0"])
    assert cfg.loss[0].params == {"temperature": 2.0}
    cfg = load_config(None, ["loss=[{name: jsd, beta: 25e-2, temperature: 1.5e+0}]"])
    assert cfg.loss[0].params == {"beta": 0.25, "temperature": 1.5}
    assert all(isinstance(v, float) for v in cfg.loss[0].params.values())
    # what YAML 1.2 does not read as a number stays a string
    assert apply_overrides({}, ["run.name=e5", "data.chat_template=1e"]) == {
        "run": {"name": "e5"},
        "data": {"chat_template": "1e"},
    }


def test_a_malformed_override_value_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["student.from_teacher={num_hidden_layers: 2"])
    assert str(err.value) == (
        "override student.from_teacher: '{num_hidden_layers: 2' is not valid YAML "
        "(expected ',' or '}', but got '<stream end>')"
    )


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"zero_optimization": {stage: 2}}', "is not valid JSON: Expecting property name"),
        ("[1, 2]", "must hold a JSON object at the top level"),
        ('{"zero_optimization": true}', ": zero_optimization: must be a mapping (got True)"),
        ('{"zero_optimization": {"overlap_comms": true}}', ": zero_optimization.overlap_comms: unknown key"),
    ],
    ids=["not_json", "a_list", "zero_not_a_mapping", "zero_typo"],
)
def test_a_deepspeed_config_file_deepspeed_would_refuse_is_named(content, words, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        deepspeed_config(config_from_dict({"deepspeed": {"config_file": str(path)}}), world_size=1)
    assert str(err.value).startswith(f"deepspeed.config_file {path}") and words in str(err.value)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    "extra, words",
    [
        (
            {"gradient_accumulation_steps": 4},
            "deepspeed.extra.gradient_accumulation_steps: use train.grad_accum",
        ),
        ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu: use train.micro_batch_size"),
        ({"train_batch_size": 64}, "deepspeed.extra.train_batch_size: use train.micro_batch_size and"),
        (
            {"zero_optimization": {"stage": 3}},
            "deepspeed.extra.zero_optimization.stage: use deepspeed.zero_stage",
        ),
        ({"bf16": {"enabled": True}}, "deepspeed.extra.bf16.enabled: use train.dtype instead"),
        ({"optimizer": {"type": "Adam"}}, "deepspeed.extra.optimizer: use train.lr, train.betas"),
        (
            {"zero_optimization": {"overlap_comms": True}},
            "deepspeed.extra.zero_optimization.overlap_comms: unknown",
        ),
        (
            {"zero_optimization": {"reduce_bucket_size": "lots"}},
            "reduce_bucket_size: Input should be a valid int",
        ),
        (
            {"bf16": {"bf16_master_weights_and_grad": True}},
            "deepspeed.extra.bf16.bf16_master_weights_and_grad: unk",
        ),
        ({"fp16": {"loss_scale_windw": 100}}, "deepspeed.extra.fp16.loss_scale_windw: unknown key"),
    ],
)
def test_deepspeed_extra_that_our_fields_own_or_deepspeed_refuses_is_named(extra, words):
    with pytest.raises(ConfigError) as err:
        deepspeed_config(config_from_dict({"deepspeed": {"extra": extra}}), world_size=1)
    assert words in str(err.value) and len(str(err.value).splitlines()) == 1


def test_deepspeed_extra_settings_deepspeed_knows_pass_through(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}}))
    extra = {
        "zero_optimization": {"reduce_bucket_size": 10**7, "offload_param": {"pin_memory": True}},
        "bf16": {"bf16_master_weights_and_grads": True},
        "fp16": {"loss_scale_window": 100},
        # DeepSpeed ignores a key it does not know, and has no list of those it knows to refuse one with
        "not_a_deepspeed_key": 1,
    }
    cfg = config_from_dict(
        {"deepspeed": {"zero_stage": 3, "offload_param": True, "config_file": str(path), "extra": extra}}
    )
    ds = deepspeed_config(cfg, world_size=1)
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["overlap_comm"] and ds["not_a_deepspeed_key"] == 1


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["deepspeed.extra={gradient_accumulation_steps: 4}"],
            "gradient_accumulation_steps: use train.grad_accum",
        ),
        (["deepspeed.extra={zero_optimization: {overlap_comms: true}}"], "overlap_comms: unknown key"),
        (
            ["student.from_teacher={num_hidden_layers: 2"],
            "override student.from_teacher: '{num_hidden_layers",
        ),
    ],
    ids=["extra_owned_key", "extra_zero_typo", "malformed_override"],
)
def test_train_refuses_them_before_anything_loads(overrides, words, tmp_path, capsys):
    args = ["train", *QUICK, "train.max_steps=1", f"run.output_dir={tmp_path}", "run.name=bad", *overrides]
    code = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and words in errors[0], err[-3000:]
    assert not (tmp_path / "bad").exists()


def test_a_device_or_dtype_this_machine_cannot_run_is_refused(monkeypatch):
    import torch
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^train\.device=cuda: this machine has 0 cuda device\(s\)"):
        check_train_device(config_from_dict({"train": {"device": "cuda"}}))
    accelerator = get_accelerator()
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: False)
    monkeypatch.setattr(accelerator, "is_bf16_supported", lambda: True)
    with pytest.raises(
        ConfigError, match=r"^train\.dtype=float16: DeepSpeed's \w+ accelerator does not support"
    ):
        check_train_device(config_from_dict({"train": {"dtype": "float16"}}))
    for train in ({"dtype": "bfloat16"}, {"dtype": "float32", "device": "cpu"}, {"device": "auto"}):
        check_train_device(config_from_dict({"train": train}))
