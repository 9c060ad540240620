"""The export check: a plain-transformers reload of the student must reproduce the engine's logits."""

import json

import pytest
import torch
from conftest import tiny_gemma2
from safetensors.torch import load_file, save_file

from llmdistill import models
from llmdistill.config import LLMDistillError
from llmdistill.export import EXPORT_TOLERANCE, check_export, probe_logits, probe_of


@pytest.fixture
def exported(tmp_path, tiny_llama, embedded_tokenizer):
    out = models.save_student(tiny_llama, embedded_tokenizer, tmp_path / "student", "float32")
    ids = torch.randint(2, 2048, (2, 32))
    batch = {"input_ids": ids, "position_ids": torch.arange(32).expand(2, 32)}
    probe = probe_of(batch)
    return out, probe, probe_logits(tiny_llama, probe, "cpu")


def test_a_faithful_export_passes_and_reports_its_difference(exported):
    out, probe, expected = exported
    assert probe["input_ids"].shape == (1, 32)  # one sequence, whatever the batch size
    figures = check_export(out, probe, expected, EXPORT_TOLERANCE["float32"])
    assert figures["export_max_abs_diff"] < 1e-4
    assert not (out.parent / "export_probe.safetensors").exists()


def test_corrupted_weights_fail_the_check_with_one_line(exported):
    out, probe, expected = exported
    weights = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = weights[name] * 3.0
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LLMDistillError, match="export check failed: .* of the logit scale") as err:
        check_export(out, probe, expected, EXPORT_TOLERANCE["float32"])
    assert "\n" not in str(err.value)


def test_a_student_that_soft_caps_attention_is_checked_under_a_kernel_that_applies_the_cap(
    tmp_path, embedded_tokenizer
):
    """A Gemma-2 student trained under eager (sdpa is refused for it) is reloaded for the check under a kernel
    that soft-caps its attention logits too: under sdpa the faithful export would differ."""
    student = tiny_gemma2(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          attn_logit_softcapping=5.0, attn_implementation="eager")  # fmt: skip
    with torch.no_grad():  # attention logits far past the cap, as a trained model's reach Gemma-2's 50
        for layer in student.model.layers:
            layer.self_attn.q_proj.weight.mul_(32.0)
    out = models.save_student(student, embedded_tokenizer, tmp_path / "student", "float32")
    ids = torch.randint(2, 2048, (1, 32))
    probe = probe_of({"input_ids": ids, "position_ids": torch.arange(32)[None]})
    expected = probe_logits(student, probe, "cpu")
    uncapped = probe_logits(models.load_model(str(out), attn_implementation="sdpa"), probe, "cpu")
    assert (uncapped - expected).abs().max() > 2 * EXPORT_TOLERANCE["float32"] * expected.abs().max()
    figures = check_export(out, probe, expected, EXPORT_TOLERANCE["float32"])
    assert figures["export_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("student", ["from_teacher", "path"])
def test_the_export_keeps_the_students_generation_config(tmp_path, one_rank, student):
    """The exported student stops and samples as the training student was set to: a from_teacher student as
    its teacher (generation_config.json beside the teacher's weights), a student loaded from a path (a
    derived one) as that path's."""
    import shutil

    from conftest import QUICK

    from llmdistill.config import load_config
    from llmdistill.train import Trainer

    def model_dir(name, eos, temperature):
        path = tmp_path / name
        shutil.copytree(models.EMBEDDED_TEACHER, path)
        generation = json.loads((path / "generation_config.json").read_text())
        generation |= {"eos_token_id": eos, "do_sample": True, "temperature": temperature, "top_p": 0.9}
        (path / "generation_config.json").write_text(json.dumps(generation))
        return path, generation

    teacher, wanted = model_dir("teacher", [0, 5], 0.6)
    overrides = [f"teacher.path={teacher}"]
    if student == "path":
        path, wanted = model_dir("student", [0, 7], 0.8)
        overrides += ["student.from_teacher=null", f"student.path={path}"]
    cfg = load_config(
        None, [*QUICK, *overrides, "train.max_steps=1", f"run.output_dir={tmp_path}", "run.name=export"]
    )
    trainer = Trainer(cfg)
    try:
        out = trainer.export()
    finally:
        trainer.close()
    written = json.loads((out / "generation_config.json").read_text())
    assert {k: written.get(k) for k in wanted if k != "transformers_version"} == {
        k: v for k, v in wanted.items() if k != "transformers_version"
    }
