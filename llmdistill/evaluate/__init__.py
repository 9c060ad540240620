"""Benchmarking with lm-eval: offline code tasks built from the embedded corpus, teacher vs students, report.

- task_data.py: the local tasks (YAMLs in tasks/, shipped with the package) and their data, built once from
  the embedded corpus's test split into a cache directory (`python -m llmdistill.cli build-tasks`;
  `llmdistill eval` builds it on first use), so the plain `lm_eval --include_path <tasks dir>` runs them too.
- runner.py: lm-eval itself: models and settings from a config (checked before any model loads), the HF or
  vLLM backend, one `simple_evaluate` per model.
- report.py: what a run writes into its output dir: raw/<model>.json (lm-eval's results), results.json,
  results.md (task x model table), scores.png and fraction_of_teacher.png; and TensorBoard scalars.
"""

from llmdistill.evaluate.report import (
    fractions_of_reference,
    markdown_table,
    plot_fractions,
    plot_report,
    primary_metrics,
    tensorboard_scalars,
    write_report,
)
from llmdistill.evaluate.runner import (
    check_eval_settings,
    eval_settings,
    evaluate_models,
    hf_model_args,
    make_lm,
    models_from_config,
    parameters_of_dir,
    resolve_model_dir,
    run_eval,
    set_up_training_eval,
    task_manager,
    teacher_model_dir,
)
from llmdistill.evaluate.task_data import (
    BUILD_COMMAND,
    LOCAL_TAG,
    LOCAL_TASKS,
    TASKS_DIR,
    build_task_data,
    check_task_data,
    task_data_dir,
)

__all__ = [
    "BUILD_COMMAND",
    "LOCAL_TAG",
    "LOCAL_TASKS",
    "TASKS_DIR",
    "build_task_data",
    "check_eval_settings",
    "check_task_data",
    "eval_settings",
    "evaluate_models",
    "fractions_of_reference",
    "hf_model_args",
    "make_lm",
    "markdown_table",
    "models_from_config",
    "parameters_of_dir",
    "plot_fractions",
    "plot_report",
    "primary_metrics",
    "resolve_model_dir",
    "run_eval",
    "set_up_training_eval",
    "task_data_dir",
    "task_manager",
    "teacher_model_dir",
    "tensorboard_scalars",
    "write_report",
]
