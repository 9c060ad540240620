"""The exported student's model card: `student/README.md` in the Hugging Face format, from the run directory.

Everything comes from what the run wrote (config.yaml, summary.json, eval/results.json, and the derived
student's derivation.json), so `llmdistill card RUN_DIR` rebuilds the card of any finished run. The YAML
metadata is what the hub indexes: base_model (the teacher, when it is a hub model), library_name,
pipeline_tag, tags, datasets (hub datasets only) and the teacher's license when its own card states one. The
body says how the student was made and how it compares with its teacher. Missing pieces (no lm-eval, no
derivation, no teacher, a LoRA run) leave their section out or say so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache

from llmdistill.config import LLMDistillError
from llmdistill.report import Run, fmt, fmt_int, markdown, read_run, student_lm_eval

# A hub repository id, "name" or "org/name" (huggingface_hub's own rule, less its length limit).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
EMBEDDED_TEACHER_TEXT = (
    "the embedded tiny teacher shipped with llmdistill (a small Llama trained on the Python standard "
    "library's sources)"
)
SHAPE_KEYS = {
    "layers": "num_hidden_layers",
    "hidden size": "hidden_size",
    "MLP size": "intermediate_size",
    "attention heads": "num_attention_heads",
    "KV heads": "num_key_value_heads",
    "vocabulary": "vocab_size",
}
# The names llmdistill.data reads as data files; any other name that is not here is a hub dataset.
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
ROW_FORMATS = {
    "text": "",
    "messages": ", chats (only the assistant turns trained)",
    "prompt_completion": ", prompt/completion pairs (only the completions trained)",
}
# derivation.json names layers num_layers; the others as in an HF config.
DERIVATION_SHAPE_KEYS = {"num_hidden_layers": "num_layers"}


def write_model_card(
    run_dir: str | Path, student_dir: str | Path | None = None, repo_id: str | None = None
) -> Path:
    """Write `<student_dir>/README.md` (default student_dir: <run_dir>/student) and return its path.

    `repo_id` is the hub name the usage example loads (default: the student's local path).
    """
    run = read_run(run_dir)
    student_dir = run.student_dir = exported_student(run.dir, student_dir)
    card = build_model_card(run, student_dir, repo_id)
    path = student_dir / "README.md"
    card.save(path)
    return path


def exported_student(run_dir: Path, student_dir: str | Path | None = None) -> Path:
    """The run's exported student directory; a run that exported none is a one-line error."""
    student_dir = Path(student_dir) if student_dir is not None else Path(run_dir) / "student"
    if not (student_dir / "config.json").is_file():
        raise LLMDistillError(
            f"{run_dir}: no exported student in {student_dir} (train.export was off, or the run stopped "
            "before the end)"
        )
    return student_dir


def build_model_card(run: Run, student_dir: Path, repo_id: str | None = None):
    cfg = run.config
    paths = _PathResolver(run)
    teacher = cfg["teacher"]["path"] if cfg["teacher"]["source"] != "none" else None
    derivation = _derivation(cfg, student_dir, paths)
    tags = ["llmdistill", *(["distillation"] if teacher else [])]
    tags += ["pruning"] * (derivation is not None) + ["lora"] * (cfg["student"].get("peft") is not None)
    data = ModelCardData(
        model_name=run.name,
        base_model=teacher if teacher and _is_hub_id(teacher, paths) else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=_hub_datasets(cfg, paths) or None,
        **_teacher_license(teacher, paths),
    )
    sections = [
        f"# {run.name}\n\n{_summary_line(run, teacher, paths)}",
        _how_it_was_made(run, student_dir, teacher, derivation, paths),
        _results(run),
        _usage(repo_id or str(student_dir)),
    ]
    body = "\n\n".join(s for s in sections if s) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


class _PathResolver:
    """Paths in config.yaml are as given on the command line: relative to the directory training ran in,
    which is the run directory less `run.output_dir/run.name` (when output_dir was relative)."""

    def __init__(self, run: Run):
        out = Path(run.config["run"]["output_dir"])
        self.base = None
        if not out.is_absolute() and ".." not in out.parts:
            base = run.dir.resolve()
            for _ in range(len(out.parts) + 1):
                base = base.parent
            self.base = base

    def local(self, path: str) -> Path | None:
        """The local file or directory `path` names, or None when it is not here (a hub name)."""
        if path == "embedded":
            # Imported here: llmdistill.embedded loads the tokenizers library, which no other card needs.
            from llmdistill.embedded import EMBEDDED_TEACHER

            return EMBEDDED_TEACHER
        p = Path(path).expanduser()
        for candidate in (p,) if p.is_absolute() else (*((self.base / p,) if self.base else ()), p):
            if candidate.exists():
                return candidate
        return None


def _is_hub_id(path: str, paths: _PathResolver) -> bool:
    return path != "embedded" and paths.local(path) is None and bool(HUB_ID.match(path))


def _specs(sources) -> list[dict]:
    """data.train / data.validation as a list: one source, a blend of several, or none."""
    return sources if isinstance(sources, list) else [sources] if sources else []


def _hub_datasets(cfg: dict, paths: _PathResolver) -> list[str]:
    names = []
    for spec in _specs(cfg["data"]["train"]) + _specs(cfg["data"].get("validation")):
        if _dataset_is_hub(spec, paths) and spec["path"] not in names:
            names.append(spec["path"])
    return names


def _dataset_is_hub(spec: dict, paths: _PathResolver) -> bool:
    # llmdistill.data.load_rows' rule: not the embedded corpus, not here, and not the name of a data file.
    path = spec["path"]
    if path.startswith(("embedded:", ".", "/", "~")) or Path(path).suffix in DATA_FILE_SUFFIXES:
        return False
    return _is_hub_id(path, paths)


def _teacher_license(teacher: str | None, paths: _PathResolver) -> dict:
    """license (and license_name/link for "other") from the teacher's own card: its local README.md, or a
    hub teacher's README.md in the local HF cache. Nothing is downloaded."""
    if not teacher:
        return {}
    readme = None
    local = paths.local(teacher)
    if local is not None and (local / "README.md").is_file():
        readme = local / "README.md"
    elif _is_hub_id(teacher, paths):
        cached = try_to_load_from_cache(teacher, "README.md")
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None:
        return {}
    meta = ModelCard.load(readme, ignore_metadata_errors=True).data
    return {
        k: getattr(meta, k) for k in ("license", "license_name", "license_link") if getattr(meta, k, None)
    }


def _derivation(cfg: dict, student_dir: Path, paths: _PathResolver) -> dict | None:
    """derivation.json of a student that `llmdistill derive` made: beside the export, or at student.path."""
    candidates = [student_dir]
    if cfg["student"].get("path"):
        candidates.append(paths.local(cfg["student"]["path"]))
    for where in candidates:
        if where is not None and (where / "derivation.json").is_file():
            return json.loads((where / "derivation.json").read_text())
    return None


# ------------------------------------------------------------------------------------------ the body


def _teacher_text(teacher: str | None, paths: _PathResolver) -> str:
    if teacher is None:
        return "no teacher"
    if teacher == "embedded":
        return EMBEDDED_TEACHER_TEXT
    if _is_hub_id(teacher, paths):
        return f"[{teacher}](https://huggingface.co/{teacher})"
    return f"`{teacher}` (a local model directory)"


def _summary_line(run: Run, teacher: str | None, paths: _PathResolver) -> str:
    what = f"distilled from {_teacher_text(teacher, paths)}" if teacher else "trained without a teacher"
    return (
        f"A {fmt_int(run.student_parameters)}-parameter causal language model {what} "
        f"with llmdistill (run `{run.name}`)."
    )


def _dataset_text(spec: dict, paths: _PathResolver) -> str:
    path = spec["path"]
    if path.startswith("embedded:"):
        return f"the embedded corpus (Python standard library sources), split `{path.split(':', 1)[1]}`"
    where = [f"config `{spec['name']}`"] if spec.get("name") else []
    where += [f"split `{spec.get('split', 'train')}`"]
    where += [f"revision `{spec['revision']}`"] if spec.get("revision") else []
    rows = ROW_FORMATS.get(spec.get("format", "text"), "")
    if _dataset_is_hub(spec, paths):
        return f"[{path}](https://huggingface.co/datasets/{path}) ({', '.join(where)}){rows}"
    return f"local data `{path}` ({', '.join(where)}){rows}"


def _sources_text(sources, paths: _PathResolver) -> str:
    specs = _specs(sources)
    if len(specs) == 1:
        return _dataset_text(specs[0], paths)
    total = sum(spec.get("weight", 1.0) for spec in specs)
    parts = [f"{spec.get('weight', 1.0) / total:.0%} {_dataset_text(spec, paths)}" for spec in specs]
    return "a blend of " + "; ".join(parts)


def _teacher_signal(cfg: dict) -> str:
    t = cfg["teacher"]
    source = t["source"]
    if source == "hf":
        return "full logits of the teacher, run in the training processes"
    if source == "vllm_server":
        return f"the teacher's top-{t['server']['top_k']} log-probabilities from a vLLM server"
    if source == "vllm_cache":
        return f"the teacher's top-{t['cache']['top_k']} log-probabilities, precomputed with vLLM"
    if source == "on_policy":
        # A config.yaml written before on_policy.scorer existed scored on the vLLM servers.
        scorer = (
            f"top-{t['server']['top_k']} log-probabilities from a vLLM server"
            if t["on_policy"].get("scorer", "vllm_server") == "vllm_server"
            else "full logits, run in the training processes"
        )
        return (
            f"on-policy: {t['on_policy']['fraction']:.0%} of the batches are the student's own samples, "
            f"scored by the teacher ({scorer})"
        )
    return "none"


def _shape_table(teacher_shape: dict | None, student_config: dict) -> str:
    header = ["", *(["teacher"] if teacher_shape else []), "student"]
    rows = []
    for label, key in SHAPE_KEYS.items():
        student = student_config.get(key)
        if student is None:
            continue
        row = [label]
        if teacher_shape:
            row.append(
                fmt_int(teacher_shape.get(key, teacher_shape.get(DERIVATION_SHAPE_KEYS.get(key, key))))
            )
        rows.append([*row, fmt_int(student)])
    return markdown(header, rows)


def _derivation_text(d: dict) -> list[str]:
    c = d.get("config", {})
    p = d.get("parameters", {})
    lines = [
        f"- **Derived by pruning the teacher** (`llmdistill derive`): {fmt_int(p.get('student'))} of "
        f"{fmt_int(p.get('teacher'))} parameters kept ({100 * p.get('ratio', 0):.1f}%)."
    ]
    search = d.get("search")
    if search:
        lines.append(
            f"  - Shape: searched over depth x width under a budget of {search['budget']:g} "
            f"({'of the teacher' if search['budget'] <= 1 else 'parameters'}); {search['feasible_shapes']} "
            f"shapes fit, the {len(search['ranking'])} scored were ranked by held-out loss after pruning."
        )
    else:
        lines.append("  - Shape: an explicit target (`derive.target`).")
    kept_layers = d.get("kept", {}).get("layers")
    lines.append(
        f"  - Depth: layers scored by {', '.join(c.get('depth_methods', []))} "
        f"({c.get('layer_selection', 'independent')} selection); kept layers {kept_layers}."
    )
    lines.append(
        "  - Width: attention heads, MLP neurons and hidden channels ranked by activation importance on "
        f"{d.get('calibration', {}).get('sequences', '?')} calibration sequences of "
        f"{d.get('calibration', {}).get('dataset', '?')} (Minitron)"
        + ("; norms rescaled to the kept channels." if c.get("rescale_norms") else ".")
    )
    masking = d.get("masking")
    if masking:
        lines.append(
            f"  - In-block masking (MAGNET, {masking['saliency']} saliency): {masking['sparsity']:.1%} of "
            "the kept blocks' linear weights are zero."
        )
    loss = d.get("held_out_loss", {})
    if loss:
        lines.append(
            f"  - Held-out loss right after pruning: {fmt(loss.get('student'))} "
            f"(teacher {fmt(loss.get('teacher'))})."
        )
    return lines


def _origin_text(cfg: dict, derivation: dict | None, paths: _PathResolver) -> list[str]:
    s = cfg["student"]
    if derivation is not None:
        return _derivation_text(derivation)
    if s.get("path") == "embedded" or (s.get("path") and s["path"] == cfg["teacher"]["path"]):
        return ["- **Initialised as a copy of the teacher.**"]
    if s.get("path"):
        return [f"- **Initialised from** `{s['path']}`."]
    if s.get("from_teacher") is not None:
        changes = ", ".join(f"{k}={v}" for k, v in s["from_teacher"].items()) or "no changes"
        return [f"- **Randomly initialised** with the teacher's architecture ({changes})."]
    return ["- **Randomly initialised** from a model config given in full."]


def _how_it_was_made(run: Run, student_dir: Path, teacher, derivation, paths: _PathResolver) -> str:
    cfg, s = run.config, run.summary
    student_config = json.loads((student_dir / "config.json").read_text())
    teacher_shape = None
    if derivation is not None:
        teacher_shape = {
            **derivation.get("teacher_shape", {}),
            "vocab_size": student_config.get("vocab_size"),
        }
    elif teacher and paths.local(teacher) is not None and (paths.local(teacher) / "config.json").is_file():
        teacher_shape = json.loads((paths.local(teacher) / "config.json").read_text())
    lines = ["## How it was made", "", f"- **Teacher**: {_teacher_text(teacher, paths)}."]
    if teacher:
        lines.append(f"- **Teacher signal**: {_teacher_signal(cfg)}.")
    lines += _origin_text(cfg, derivation, paths)
    peft = cfg["student"].get("peft")
    if peft:
        lines.append(
            f"- **LoRA** (r={peft['r']}, alpha={peft['alpha']:g}, on {peft['target_modules']}): "
            f"{fmt_int(s.get('trainable_parameters'))} parameters trained; the adapters are merged into "
            "these weights."
        )
    if cfg["student"].get("tokenizer"):
        lines.append(
            f"- **Tokenizer**: the student's own (`{cfg['student']['tokenizer']}`), not the teacher's."
        )
    lines += ["", _shape_table(teacher_shape, student_config), "", "### Objective", ""]
    terms = [
        [
            t["name"],
            fmt(t.get("weight", 1.0), 3),
            ", ".join(f"{k}={v}" for k, v in t.items() if k not in ("name", "weight")) or "—",
        ]
        for t in cfg["loss"]
    ]
    lines.append(markdown(["loss term", "weight", "parameters"], terms))
    train, data, ranks = cfg["train"], cfg["data"], s.get("world_size", 1)
    lines += ["", "### Data and training", ""]
    lines.append(
        f"- **Training data**: {_sources_text(data['train'], paths)}, in {data['seq_len']}-token sequences "
        + ("(samples packed)." if data.get("pack", True) else "(one sample each, padded).")
    )
    if data.get("validation"):
        lines.append(f"- **Held-out data**: {_sources_text(data['validation'], paths)}.")
    lines.append(
        f"- **Tokens**: {s.get('steps', 0)} steps x {run.tokens_per_step:,} tokens per step "
        f"({train['micro_batch_size']} sequences x {train.get('grad_accum', 1)} accumulation x "
        f"{ranks} rank{'s' * (ranks != 1)}) = {run.tokens:,} tokens."
    )
    lines.append(
        f"- **Optimisation**: AdamW, peak learning rate {train['lr']:g}, {train['warmup_steps']} warm-up "
        f"steps, {train['dtype']}, DeepSpeed ZeRO-{s.get('zero_stage', cfg['deepspeed']['zero_stage'])}; "
        f"{fmt_int(s.get('tokens_per_s'))} tokens/s over {s.get('train_seconds', 0):.1f} s."
    )
    return "\n".join(lines)


def _results(run: Run) -> str:
    s = run.summary
    rows = []
    for who, key, params in (
        ("teacher", "teacher_eval", s.get("teacher_parameters")),
        ("student before training", "student_eval_start", run.student_parameters),
        ("student", "student_eval", run.student_parameters),
    ):
        figures = s.get(key)
        if figures:
            rows.append(
                [
                    who,
                    fmt_int(params),
                    fmt(figures["loss"], 4),
                    fmt(figures["ppl"], 2),
                    fmt(figures["bpb"], 4),
                ]
            )
    lines = ["## Results"]
    if rows:
        tokens = next(
            s[k]["tokens"] for k in ("student_eval", "student_eval_start", "teacher_eval") if s.get(k)
        )
        lines += [
            "",
            f"Held-out data, {tokens:,} tokens (loss in nats per token, perplexity, bits per byte):",
            "",
            markdown(["model", "parameters", "loss", "perplexity", "bits/byte"], rows),
        ]
        if "teacher_eval" not in s and run.config["teacher"]["source"] != "none":
            lines += [
                "",
                "The teacher was not scored on these tokens (another tokenizer, or no teacher model in the "
                "run).",
            ]
    else:
        lines += ["", "No held-out evaluation was run (data.validation was null)."]
    scores = student_lm_eval(run)
    if scores:
        table = [
            [
                r["task"],
                f"{r['metric']} {'↑' if r['higher_is_better'] else '↓'}",
                fmt(r["teacher"], 4),
                fmt(r["student"], 4),
                "—" if r["fraction"] is None else f"{100 * r['fraction']:.1f}%",
            ]
            for r in scores
        ]
        limit = run.lm_eval.get("limit")
        lines += [
            "",
            f"lm-eval ({run.lm_eval.get('backend', 'hf')} backend"
            + (f", first {limit} examples per task" if limit else "")
            + "; student/teacher: share of the teacher's score, teacher/student for ↓ metrics):",
            "",
            markdown(["task", "metric", "teacher", "student", "student/teacher"], table),
        ]
    return "\n".join(lines)


def _usage(where: str) -> str:
    return "\n".join(
        [
            "## Use",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{where}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
            "```",
            "",
            "A plain transformers checkpoint (safetensors): no llmdistill code is needed to load it. "
            "This card was written by `llmdistill card`.",
        ]
    )
