"""Chat distillation under 2-rank DeepSpeed on the embedded default (configs/tiny/chat_distill.yaml,
shortened): the chat teacher into a student that has never seen the chat template (the base embedded
teacher), on the embedded instruction set, answer-only. And a cross-tokenizer chat run: the chat teacher's
template on its side, another template on the SentencePiece student's, ALM on the answers."""

from __future__ import annotations

import pytest
from conftest import REPO

from .runs_in_turn import run_in_turn, summary

pytestmark = pytest.mark.slow

CHAT_DISTILL = str(REPO / "configs" / "tiny" / "chat_distill.yaml")
SHORT = [
    "train.micro_batch_size=4",
    "train.eval_batches=4",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "train.save_every=0",
    "train.export=false",
    "train.progress=false",
    "train.resume=never",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both runs in one launch (runs_in_turn.py)."""
    tmp = tmp_path_factory.mktemp("chat")
    chat = ["--config", CHAT_DISTILL, f"run.output_dir={tmp}", "run.name=chat", *SHORT]
    # The base teacher has no chat template: it reads the chats with the chat teacher's (same) tokenizer.
    chat += [
        "student.path=embedded",
        "student.tokenizer=embedded:chat",
        "train.max_steps=30",
        "train.lr=1.0e-3",
    ]
    template = tmp / "sp_template.jinja"
    template.write_text(
        "{{ bos_token }}{% for m in messages %}### {{ m.role }}:\n{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}### assistant:\n{% endif %}"
    )
    cross = [
        "--config", str(REPO / "configs" / "tiny" / "alm.yaml"), f"run.output_dir={tmp}", "run.name=x",
        "teacher.path=embedded:chat", f"data.chat_template={template}",
        "data.train={path: 'embedded:chat-validation', format: messages}",
        "data.validation={path: 'embedded:chat-test', format: messages, max_documents: 64}",
        *SHORT, "train.max_steps=20", "train.lr=3.0e-3",
    ]  # fmt: skip
    return run_in_turn(tmp, {"chat": chat, "x": cross})


def test_chat_distillation_lowers_the_students_answer_only_loss(runs):
    chat = summary(runs["chat"])
    start, end, teacher = (chat[k]["loss"] for k in ("student_eval_start", "student_eval", "teacher_eval"))
    print(f"\nanswer-only held-out loss: student {start:.4f} -> {end:.4f}, chat teacher {teacher:.4f}")
    assert chat["world_size"] == 2
    # The validation set is chat data: these figures count answer tokens only.
    assert teacher < start  # the chat teacher answers better than the student it starts from
    assert end < start - 0.1 * (start - teacher)


def test_cross_tokenizer_chat_run(runs):
    finished = summary(runs["x"])
    alm = [r["loss/alm"] for r in runs["x"]["log"].values() if "loss/alm" in r]
    assert len(alm) == 20 and all(v > 0 for v in alm)  # every step had answer chunks to match
    assert finished["student_eval"]["loss"] < finished["student_eval_start"]["loss"]
