"""Build the embedded tiny teacher: train its tokenizer on the embedded corpus, train the model with our own
trainer from its recipe (configs/tiny/teacher.yaml), and install it in the package with build_info.json."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

from llmdistill import data
from llmdistill.config import load_config
from llmdistill.embedded import EMBEDDED_TEACHER, recipe_fingerprint
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
    tmp = EMBEDDED_TEACHER.with_name("teacher.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cfg.run.dir / "student", tmp)
    info = {
        "fingerprint": recipe_fingerprint(config_path, overrides),
        "recipe": os.path.relpath(Path(config_path).resolve(), EMBEDDED_TEACHER.parent.parent.parent),
        "python": platform.python_version(),
        "parameters": summary["student_parameters"],
        "steps": summary["steps"],
        "build_seconds": round(time.time() - t0),
        "held_out": summary.get("student_eval"),
    }
    (tmp / "build_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(EMBEDDED_TEACHER, ignore_errors=True)
    tmp.replace(EMBEDDED_TEACHER)
    ev = info["held_out"]
    print(
        f"embedded teacher: {info['parameters']:,} parameters, held-out loss {ev['loss']:.4f} nats/token, "
        f"{ev['bpb']:.3f} bits/byte -> {EMBEDDED_TEACHER}"
    )
    return EMBEDDED_TEACHER
