"""The shipped tiny teacher: built from its recipe, and a teacher worth distilling."""

import json
import math
import random

import pytest
import torch
import yaml
from conftest import REPO

from llmdistill.embedded import recipe_fingerprint
from llmdistill.models import EMBEDDED_TEACHER, load_model

RECIPE = REPO / "configs" / "tiny" / "teacher.yaml"


@pytest.fixture(scope="module")
def build_info():
    return json.loads((EMBEDDED_TEACHER / "build_info.json").read_text())


def test_shipped_teacher_matches_its_recipe_fingerprint(build_info):
    # Changing the recipe (or the corpus it was trained on) without `make teacher` breaks this.
    assert build_info["fingerprint"] == recipe_fingerprint(RECIPE)


def test_shipped_teacher_has_the_recipes_shape(build_info):
    recipe = yaml.safe_load(RECIPE.read_text())
    config = json.loads((EMBEDDED_TEACHER / "config.json").read_text())
    for key, value in recipe["student"]["config"].items():
        assert config[key] == value, key
    assert build_info["steps"] == recipe["train"]["max_steps"]
    # vLLM's CPU backend serves head sizes of 32 and up; GQA means fewer KV heads than heads
    assert config["head_dim"] >= 32 and config["num_key_value_heads"] < config["num_attention_heads"]


def test_teacher_is_far_better_than_an_untrained_model(build_info, embedded_tokenizer):
    from llmdistill import data
    from llmdistill.config import DatasetSpec

    uniform = math.log(len(embedded_tokenizer))
    assert build_info["held_out"]["loss"] < 0.6 * uniform
    # recompute on held-out text: the stored figure is what the model really does
    texts = data.load_texts(DatasetSpec(path="embedded:test", max_documents=4))
    packed = data.tokenize_and_pack(texts, embedded_tokenizer, seq_len=256, name="test")
    batch = data.collate([packed[i] for i in range(min(8, len(packed)))])
    teacher = load_model(str(EMBEDDED_TEACHER))
    with torch.no_grad():
        logits = teacher(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100
    )
    assert loss.item() < 0.6 * uniform


# ---------------------------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def tokenizers(embedded_tokenizer):
    from llmdistill.embedded import student_tokenizer
    from llmdistill.models import load_tokenizer

    return {
        "teacher": embedded_tokenizer,
        "sp-unigram": load_tokenizer(str(student_tokenizer("sp-unigram"))),
        "bytes": load_tokenizer(str(student_tokenizer("bytes"))),
    }


def spelled_back(tokenizer, texts: list[str]) -> list[str]:
    """The texts as data encodes them (`data._document_ids`), decoded again without their closing EOS; a
    special token anywhere else fails."""
    from llmdistill import data

    out = []
    for ids in data._document_ids(tokenizer, texts):
        assert ids[-1] == tokenizer.eos_token_id
        body = ids[:-1]
        assert not set(body) & set(tokenizer.all_special_ids)
        out.append(tokenizer.decode(body))
    return out


@pytest.mark.parametrize("name", ["teacher", "sp-unigram", "bytes"])
def test_special_token_strings_in_text_are_plain_text(tokenizers, name):
    tok = tokenizers[name]
    lookalikes = sorted({t for other in tokenizers.values() for t in other.all_special_tokens})
    # "<0x41>" is how a SentencePiece byte piece is written: it must stay six characters, not become "A".
    text = " ".join(lookalikes) + " state_<s>[x] = <0x41><0xFF></s>\n<unk><|endoftext|>"
    assert spelled_back(tok, [text]) == [text]


@pytest.mark.parametrize("name", ["teacher", "sp-unigram", "bytes"])
def test_every_train_document_round_trips(tokenizers, name):
    from llmdistill import data

    texts = [json.loads(row)["text"] for row in data.embedded_corpus()["train"].open()]
    assert any("<s>" in t for t in texts)  # the corpus holds such text: this is not an idle check
    back = spelled_back(tokenizers[name], texts)
    assert [i for i, (a, b) in enumerate(zip(texts, back, strict=True)) if a != b] == []


# ------------------------------------------------------------------------------ the chat teacher

CHAT_RECIPE = REPO / "configs" / "tiny" / "chat_teacher.yaml"


@pytest.fixture(scope="module")
def chat_build_info():
    from llmdistill.embedded import EMBEDDED_CHAT_TEACHER

    return json.loads((EMBEDDED_CHAT_TEACHER / "build_info.json").read_text())


def test_shipped_chat_teacher_matches_its_recipe_fingerprint(chat_build_info):
    # Changing its recipe, the base teacher, the chat template or the instruction set without
    # `llmdistill build-teacher --chat` breaks this.
    from llmdistill.embedded import chat_teacher_inputs

    assert chat_build_info["fingerprint"] == recipe_fingerprint(CHAT_RECIPE, inputs=chat_teacher_inputs())
    assert chat_build_info["steps"] == yaml.safe_load(CHAT_RECIPE.read_text())["train"]["max_steps"]


def test_chat_teacher_answers_held_out_instructions_better_than_the_base_teacher():
    from llmdistill import data
    from llmdistill.config import DataConfig, DatasetSpec
    from llmdistill.embedded import EMBEDDED_CHAT_TEACHER, EMBEDDED_CHAT_TEMPLATE
    from llmdistill.models import load_tokenizer

    tokenizer = load_tokenizer(str(EMBEDDED_CHAT_TEACHER))
    # The template ships with the chat teacher's tokenizer: no data.chat_template needed.
    assert tokenizer.chat_template == EMBEDDED_CHAT_TEMPLATE.read_text()
    spec = DatasetSpec(path="embedded:chat-validation", format="messages", max_documents=96)
    packed = data.build_dataset(spec, DataConfig(seq_len=256), tokenizer, seed=0)
    batch = data.collate([packed[i] for i in range(len(packed))])
    answer_tokens = (batch["targets"] != -100).sum().item()
    assert 0 < answer_tokens < 0.6 * batch["targets"].numel()  # prompts and headers are not scored

    def answer_loss(path):
        model = load_model(str(path))
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100
        ).item()

    base, chat = answer_loss(EMBEDDED_TEACHER), answer_loss(EMBEDDED_CHAT_TEACHER)
    assert chat < base


def test_instruction_set_follows_the_corpus_split_and_the_chat_task_is_held_out():
    from llmdistill import data
    from llmdistill.evaluate.task_data import build_chat_docs

    chat = data.embedded_chat_set()
    for split in data.SPLITS:
        rows = [json.loads(line) for line in chat[split].read_text().splitlines()]
        assert rows and {r["kind"] for r in rows} == {"write", "explain"}
        # Held-out instructions are about held-out files only.
        assert {data.split_of(r["path"]) for r in rows} == {split}
        for r in rows:
            user, assistant = r["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            if r["kind"] == "write":
                assert assistant["content"].startswith(("def ", "async def "))
    docs = build_chat_docs(random.Random(0))
    assert docs == build_chat_docs(random.Random(0))  # deterministic
    test_paths = {json.loads(line)["path"] for line in chat["test"].read_text().splitlines()}
    assert {d["path"] for d in docs} <= test_paths
    assert all(d["context"].endswith("<|assistant|>\n") and len(set(d["choices"])) == 4 for d in docs)
    assert len({d["label"] for d in docs}) == 4  # the answer's position varies
