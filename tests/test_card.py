"""The model card of real short runs, loaded back with huggingface_hub's own ModelCard API."""

import json
import shutil

import pytest
import yaml
from conftest import markdown_tables, number, run_cli
from huggingface_hub import ModelCard

from llmdistill.card import write_model_card


@pytest.fixture(scope="module")
def derived_card(finished_runs):
    run = finished_runs["derived"]
    result = run_cli(["card", str(run)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(run / "student" / "README.md") in result.stdout
    return ModelCard.load(run / "student" / "README.md"), json.loads((run / "summary.json").read_text())


def test_card_metadata_of_a_derived_student(derived_card):
    card, _ = derived_card
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"distillation", "llmdistill", "pruning"} <= set(card.data.tags) and "lora" not in card.data.tags
    # The embedded teacher is no hub model: not a base_model the hub would reject, named in the text instead.
    assert card.data.base_model is None and "embedded tiny teacher" in card.text
    assert card.data.datasets is None  # the embedded corpus is no hub dataset
    assert card.data.license is None  # the embedded teacher has no card stating one


def test_card_held_out_figures_are_the_summary(derived_card):
    card, summary = derived_card
    held_out = markdown_tables(card.text)["model"]
    for row, key in (
        ("teacher", "teacher_eval"),
        ("student before training", "student_eval_start"),
        ("student", "student_eval"),
    ):
        parameters, loss, ppl, bpb = (number(c) for c in held_out[row])
        assert loss == pytest.approx(summary[key]["loss"], abs=5e-5)
        assert ppl == pytest.approx(summary[key]["ppl"], abs=5e-3)
        assert bpb == pytest.approx(summary[key]["bpb"], abs=5e-5)
    assert number(held_out["teacher"][0]) == summary["teacher_parameters"]
    assert number(held_out["student"][0]) == summary["student_parameters"]
    tokens_per_step = 4 * 64  # micro batch x seq_len x 1 rank (conftest's QUICK and finished_runs)
    assert f"{summary['steps']} steps x {tokens_per_step:,} tokens per step" in card.text
    assert f"= {summary['steps'] * tokens_per_step:,} tokens" in card.text


def test_card_derivation_and_shapes_come_from_derivation_json(derived_card, finished_runs):
    card, summary = derived_card
    derivation = json.loads(
        (finished_runs["derived"].parent / "derive" / "derived" / "derivation.json").read_text()
    )
    kept = derivation["parameters"]
    assert (
        f"{kept['student']:,} of {kept['teacher']:,} parameters kept ({100 * kept['ratio']:.1f}%)"
        in card.text
    )
    assert "explicit target" in card.text and str(derivation["kept"]["layers"]) in card.text
    shapes = markdown_tables(card.text)[""]
    assert number(shapes["layers"][0]) == derivation["teacher_shape"]["num_layers"]
    assert number(shapes["layers"][1]) == derivation["student_shape"]["num_layers"] == 2
    assert number(shapes["hidden size"][1]) == derivation["student_shape"]["hidden_size"] == 96
    objective = markdown_tables(card.text)["loss term"]
    assert list(objective) == ["fkl"] and number(objective["fkl"][0]) == 1.0


def test_card_lm_eval_table_is_the_eval_report(derived_card, finished_runs):
    card, _ = derived_card
    report = json.loads((finished_runs["derived"] / "eval" / "results.json").read_text())
    key = report["primary"]["llmdistill_code_nextline"]
    teacher, student = (
        report["models"][n]["metrics"]["llmdistill_code_nextline"][key] for n in report["models"]
    )
    row = markdown_tables(card.text)["task"]["llmdistill_code_nextline"]
    assert row[0] == f"{key.split(',')[0]} ↑"
    assert number(row[1]) == pytest.approx(teacher, abs=5e-5)
    assert number(row[2]) == pytest.approx(student, abs=5e-5)
    assert "first 5 examples per task" in card.text


def test_card_of_a_lora_run_without_lm_eval(finished_runs):
    run = finished_runs["lora"]
    summary = json.loads((run / "summary.json").read_text())
    card = ModelCard.load(write_model_card(run))
    assert "lora" in card.data.tags and "pruning" not in card.data.tags
    assert "lm-eval" not in card.text and "task" not in markdown_tables(card.text)
    assert f"{summary['trainable_parameters']:,} parameters trained" in card.text
    assert "copy of the teacher" in card.text
    # The merged export has the teacher's shape; the summary's count includes the adapters.
    held_out = markdown_tables(card.text)["model"]
    assert number(held_out["student"][0]) == summary["teacher_parameters"] < summary["student_parameters"]


def test_card_metadata_from_a_hub_teacher_and_a_local_teachers_license(finished_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_runs["lora"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    # A hub teacher is the base_model; hub datasets are listed; nothing is downloaded (HF_HUB_OFFLINE).
    config["teacher"]["path"] = config["student"]["path"] = "meta-llama/Llama-3.2-1B"
    # A blend of a hub dataset (a chat set) and a local file: only the hub one is metadata.
    chats = {**config["data"]["train"], "path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"}
    config["data"]["train"] = [
        {**chats, "format": "messages", "weight": 3.0},
        {**config["data"]["train"], "path": "data/extra.jsonl", "weight": 1.0},
    ]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    card = ModelCard.load(write_model_card(run))
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.datasets == ["HuggingFaceH4/ultrachat_200k"]
    assert (
        "a blend of 75% [HuggingFaceH4/ultrachat_200k](https://huggingface.co/datasets/HuggingFaceH4/ultrachat_200k)"
        " (split `train_sft`), chats (only the assistant turns trained); 25% local data `data/extra.jsonl`"
    ) in card.text

    # A local teacher whose own card states a license passes it on.
    teacher = tmp_path / "teacher"
    shutil.copytree(run / "student", teacher)
    (teacher / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a teacher\n")
    config["teacher"]["path"] = config["student"]["path"] = str(teacher)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    card = ModelCard.load(write_model_card(run))
    assert card.data.license == "apache-2.0" and card.data.base_model is None
    assert f"`{teacher}` (a local model directory)" in card.text


def test_card_of_a_run_without_a_student_is_a_one_line_error(finished_runs, tmp_path):
    run = tmp_path / "unexported"
    run.mkdir()
    for name in ("config.yaml", "summary.json"):
        shutil.copy(finished_runs["lora"] / name, run / name)
    result = run_cli(["card", str(run)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {run}: no exported student in {run / 'student'} (train.export was off, or the run stopped "
        "before the end)"
    ]


@pytest.mark.parametrize(
    "scorer, signal",
    [
        ("vllm_server", "scored by the teacher (top-20 log-probabilities from a vLLM server)"),
        ("hf", "scored by the teacher (full logits, run in the training processes)"),
    ],
)
def test_card_says_who_scored_an_on_policy_run(scorer, signal, tmp_path):
    from llmdistill.config import config_from_dict, save_config
    from llmdistill.embedded import EMBEDDED_TEACHER

    run = tmp_path / "on_policy"
    (run / "student").mkdir(parents=True)
    shutil.copy(EMBEDDED_TEACHER / "config.json", run / "student" / "config.json")
    (run / "summary.json").write_text("{}")
    cfg = config_from_dict({"teacher": {"source": "on_policy", "on_policy": {"scorer": scorer}}})
    save_config(cfg, run / "config.yaml")
    text = ModelCard.load(write_model_card(run)).text
    line = next(line for line in text.splitlines() if "**Teacher signal**" in line)
    assert line.endswith(f"50% of the batches are the student's own samples, {signal}.")
