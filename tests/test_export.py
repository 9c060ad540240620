"""The export check: a plain-transformers reload of the student must reproduce the engine's logits."""

import pytest
import torch
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
