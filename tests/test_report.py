"""`llmdistill report`: one table of real finished runs with their numbers from summary.json, and a PNG."""

import json
import shutil

import pytest
from conftest import markdown_tables, number, run_cli

from llmdistill.report import learning_curves, read_run


@pytest.fixture(scope="module")
def report(finished_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = run_cli(["report", str(finished_runs["derived"]), str(finished_runs["lora"]), "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, out


def test_table_names_each_run_with_its_summary(report, finished_runs):
    stdout, out = report
    rows = markdown_tables(stdout)["run"]
    assert list(rows) == ["derived", "lora"]
    header = next(line for line in stdout.splitlines() if line.startswith("| run |"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    for name in rows:
        summary = json.loads((finished_runs[name] / "summary.json").read_text())
        cells = dict(zip(columns, rows[name], strict=True))
        assert int(cells["steps"]) == summary["steps"]
        assert number(cells["tokens"]) == summary["steps"] * 4 * 64  # micro batch x seq_len x 1 rank
        start, end = (float(x) for x in cells["bpb"].split(" → "))
        assert start == pytest.approx(summary["student_eval_start"]["bpb"], abs=5e-4)
        assert end == pytest.approx(summary["student_eval"]["bpb"], abs=5e-4)
        start, end = (float(x) for x in cells["held-out loss"].split(" → "))
        assert end == pytest.approx(summary["student_eval"]["loss"], abs=5e-4)
        assert number(cells["teacher bpb"]) == pytest.approx(summary["teacher_eval"]["bpb"], abs=5e-4)
        assert number(cells["tokens/s"]) == pytest.approx(summary["tokens_per_s"], abs=0.5)
    # The derived student's parameters are the summary's; the LoRA export is merged (the teacher's size).
    assert (
        number(dict(zip(columns, rows["derived"], strict=True))["parameters"])
        == json.loads((finished_runs["derived"] / "summary.json").read_text())["student_parameters"]
    )
    lora_summary = json.loads((finished_runs["lora"] / "summary.json").read_text())
    assert (
        number(dict(zip(columns, rows["lora"], strict=True))["parameters"])
        == lora_summary["teacher_parameters"]
    )
    # lm-eval ran for one run only: its score is there, the other's cell says it is missing.
    lm_eval = json.loads((finished_runs["derived"] / "eval" / "results.json").read_text())
    task_column = next(c for c in columns if c.startswith("llmdistill_code_nextline"))
    key = lm_eval["primary"]["llmdistill_code_nextline"]
    student_score = lm_eval["models"]["derived"]["metrics"]["llmdistill_code_nextline"][key]
    assert dict(zip(columns, rows["derived"], strict=True))[task_column].startswith(f"{student_score:.4f}")
    assert dict(zip(columns, rows["lora"], strict=True))[task_column] == "—"
    assert (out / "runs.md").read_text().strip() in stdout


def test_curves_png_is_written(report):
    from matplotlib.image import imread

    _, out = report
    png = out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(png).shape  # decodes the whole image
    assert width > 1000 and height > 400


def test_learning_curves_are_the_logged_steps(finished_runs):
    run = read_run(finished_runs["derived"])
    curves = learning_curves(run.dir / "logs.jsonl", run.tokens_per_step)
    assert [p["step"] for p in curves["train"]] == [1, 2, 3]
    assert [p["tokens"] for p in curves["train"]] == [256, 512, 768]
    assert [p["step"] for p in curves["eval"]] == [0, 3]
    assert curves["eval"][0]["bpb"] == run.summary["student_eval_start"]["bpb"]
    assert curves["eval"][-1]["loss"] == run.summary["student_eval"]["loss"]


def test_runs_of_the_same_name_are_told_apart_and_a_non_run_is_one_line(finished_runs, tmp_path):
    other = shutil.copytree(
        finished_runs["lora"],
        tmp_path / "elsewhere" / "lora",
        ignore=shutil.ignore_patterns("student", "checkpoints", "tb"),
    )
    result = run_cli(["report", str(finished_runs["lora"]), str(other), "--out", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(markdown_tables(result.stdout)["run"]) == {
        f"{finished_runs['lora'].parent.name}/lora",
        "elsewhere/lora",
    }
    result = run_cli(["report", str(tmp_path / "out"), "--out", str(tmp_path / "out2")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip() == f"error: {tmp_path / 'out'} is not a finished run directory: no config.yaml"
    )


def test_a_run_without_logs_is_one_line_and_nothing_is_written(tmp_path, capsys):
    from llmdistill.cli import main
    from llmdistill.config import Config, save_config

    run = tmp_path / "nologs"
    run.mkdir()
    save_config(Config(), run / "config.yaml")
    (run / "summary.json").write_text(json.dumps({"steps": 1, "world_size": 1}))
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {run} is not a finished run directory: no logs.jsonl"
    assert not (tmp_path / "out").exists()
    assert read_run(run).summary["steps"] == 1  # a model card needs no logs
