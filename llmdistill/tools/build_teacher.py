"""Build the embedded tiny teachers with our own trainer and install them in the package with build_info.json.

The base teacher (configs/tiny/teacher.yaml): train its tokenizer on the embedded corpus, pretrain the model.
The chat teacher (configs/tiny/chat_teacher.yaml, `--chat`): fine-tune the base teacher on the embedded chat
set in the embedded chat template, and ship the template with its tokenizer.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

from llmdistill import data
from llmdistill.config import load_config
from llmdistill.embedded import (
    EMBEDDED_CHAT_TEACHER,
    EMBEDDED_CHAT_TEMPLATE,
    EMBEDDED_TEACHER,
    chat_teacher_inputs,
    recipe_fingerprint,
)
from llmdistill.models import load_tokenizer
from llmdistill.train import train


def build_tokenizer(vocab_size: int, out_dir: Path):
    if (out_dir / "tokenizer.json").exists():  # a resumed build must keep the tokenizer its checkpoints used
        return load_tokenizer(str(out_dir))
    corpus = data.embedded_corpus()
    texts = (json.loads(line)["text"] for line in corpus["train"].open())
    tok = data.train_bpe_tokenizer(texts, vocab_size)
    tok.save_pretrained(out_dir)
    return tok


def build_teacher(config_path: str, overrides: list[str] = ()) -> Path:
    cfg = load_config(config_path, overrides)
    tok_dir = cfg.run.dir / "tokenizer"
    tok = build_tokenizer(cfg.student.config["vocab_size"], tok_dir)
    if len(tok) != cfg.student.config["vocab_size"]:
        raise RuntimeError(
            f"tokenizer has {len(tok)} tokens, the recipe's vocab_size is {cfg.student.config['vocab_size']}"
        )
    cfg.student.tokenizer = str(tok_dir)
    t0 = time.time()
    summary = train(cfg)
    info = {"fingerprint": recipe_fingerprint(config_path, overrides)}
    _install(cfg.run.dir / "student", EMBEDDED_TEACHER, config_path, summary, info, t0)
    ev = summary["student_eval"]
    print(
        f"embedded teacher: {summary['student_parameters']:,} parameters, held-out loss {ev['loss']:.4f} "
        f"nats/token, {ev['bpb']:.3f} bits/byte -> {EMBEDDED_TEACHER}"
    )
    return EMBEDDED_TEACHER


def build_chat_teacher(config_path: str, overrides: list[str] = ()) -> Path:
    cfg = load_config(config_path, overrides)
    # The package's template, whatever the directory this runs from (the recipe names it from the checkout).
    cfg.data.chat_template = str(EMBEDDED_CHAT_TEMPLATE)
    t0 = time.time()
    summary = train(cfg)
    info = {
        "fingerprint": recipe_fingerprint(config_path, overrides, chat_teacher_inputs()),
        # The base teacher on the same held-out answers, before the fine-tuning: what the SFT gained.
        "held_out_start": summary.get("student_eval_start"),
    }
    student = cfg.run.dir / "student"
    tok = load_tokenizer(str(student))
    tok.chat_template = EMBEDDED_CHAT_TEMPLATE.read_text()
    tok.save_pretrained(student)  # writes chat_template.jinja, where transformers reads it
    _install(student, EMBEDDED_CHAT_TEACHER, config_path, summary, info, t0)
    start, end = summary["student_eval_start"], summary["student_eval"]
    print(
        f"embedded chat teacher: answer-only held-out loss {start['loss']:.4f} -> {end['loss']:.4f} "
        f"nats/token -> {EMBEDDED_CHAT_TEACHER}"
    )
    return EMBEDDED_CHAT_TEACHER


def _install(student: Path, target: Path, config_path: str, summary: dict, info: dict, t0: float) -> None:
    """Copy an exported student into the package as `target`, with its build_info.json."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(student, tmp)
    info = {
        "fingerprint": info.pop("fingerprint"),
        "recipe": os.path.relpath(Path(config_path).resolve(), target.parent.parent.parent),
        "python": platform.python_version(),
        "parameters": summary["student_parameters"],
        "steps": summary["steps"],
        "build_seconds": round(time.time() - t0),
        "held_out": summary.get("student_eval"),
        **info,
    }
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
