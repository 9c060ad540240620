import copy
import itertools
import json
from pathlib import Path

import pytest
import torch

from llmdistill import data
from llmdistill.config import DataConfig, DatasetSpec, LLMDistillError
from llmdistill.signal import IGNORE_INDEX


def test_corpus_splits_by_file_without_leaks():
    corpus = data.embedded_corpus()
    seen = {}
    for split in data.SPLITS:
        paths = [json.loads(line)["path"] for line in corpus[split].open()]
        assert paths, f"split {split} is empty"
        for p in paths:
            assert p not in seen, f"{p} is in {seen.get(p)} and {split}"
            seen[p] = split
            assert data.split_of(p) == split
    assert len(seen) > 100


def test_pack_documents_targets_and_positions():
    packed = data.pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4)
    # stream 1 2 3 4 5 6 7 8 9: sequences [1 2 3 4] and [5 6 7 8]; the tail 9 only serves as a target
    assert packed["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert packed["targets"] == [[2, 3, IGNORE_INDEX, 5], [IGNORE_INDEX, 7, 8, 9]]
    assert packed["position_ids"] == [[0, 1, 2, 0], [0, 0, 1, 2]]


def test_packed_sequences_do_not_attend_across_documents(tiny_llama):
    torch.manual_seed(1)
    a, b = torch.randint(2, 2048, (1, 7)), torch.randint(2, 2048, (1, 9))
    packed = data.pack_documents([a[0].tolist(), b[0].tolist(), [5]], seq_len=16)
    ids = torch.tensor(packed["input_ids"])
    pos = torch.tensor(packed["position_ids"])
    with torch.no_grad():
        together = tiny_llama(input_ids=ids, position_ids=pos, use_cache=False).logits
        alone = tiny_llama(input_ids=b).logits
    torch.testing.assert_close(together[0, 7:16], alone[0], atol=1e-5, rtol=1e-5)


def test_sampler_shards_ranks_and_resumes_exactly():
    n, mb, world = 50, 4, 2
    r0 = list(itertools.islice(data.micro_batch_indices(n, mb, world, 0, seed=3), 12))
    r1 = list(itertools.islice(data.micro_batch_indices(n, mb, world, 1, seed=3), 12))
    per_epoch = n // (mb * world)
    first_epoch = [i for b in r0[:per_epoch] + r1[:per_epoch] for i in b]
    assert len(set(first_epoch)) == len(first_epoch) == per_epoch * mb * world
    resumed = list(itertools.islice(data.micro_batch_indices(n, mb, world, 0, seed=3, start=5), 7))
    assert resumed == r0[5:12]
    assert r0[per_epoch] != r0[0]  # a new epoch reshuffles


def test_sampler_draws_one_permutation_per_epoch(monkeypatch):
    # A permutation of 10M sequences takes ~0.25 s: drawn per micro-batch, it would stall every step.
    drawn = []
    monkeypatch.setattr(data, "epoch_order", lambda n, seed, epoch: drawn.append(epoch) or torch.arange(n))
    list(itertools.islice(data.micro_batch_indices(50, 4, 2, 0, seed=3, start=4), 10))
    assert drawn == [0, 1, 2]  # micro-batches 4-13, 6 per epoch (the old code drew one for each)


def test_bytes_of_targets_counts_the_text_the_targets_spell(embedded_tokenizer):
    text = "def f(x):\n    return x  # ünïcode\n"
    ids = embedded_tokenizer(text)["input_ids"]
    targets = torch.tensor([ids[1:] + [IGNORE_INDEX]])
    first = embedded_tokenizer.decode(ids[:1])
    assert data.bytes_of_targets(embedded_tokenizer, targets) == len(text.encode()) - len(first.encode())
    # A document's end (EOS) and a chat turn's end marker are predicted, but are no text: 0 bytes, not the
    # 13 of "<|endoftext|>" (which made a chat set's bits-per-byte 13% too low).
    eos = torch.tensor([[*ids[1:], embedded_tokenizer.eos_token_id, IGNORE_INDEX]])
    assert data.bytes_of_targets(embedded_tokenizer, eos) == len(text.encode()) - len(first.encode())


def test_tokenize_and_pack_local_jsonl(tmp_path, embedded_tokenizer):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"body": "x = 1\n" * 40}) for _ in range(3)))
    texts = data.load_texts(DatasetSpec(path=str(f), text_field="body"))
    packed = data.tokenize_and_pack(texts, embedded_tokenizer, seq_len=16, name=str(f))
    assert len(packed) > 3 and packed[0]["input_ids"].shape == (16,)


def test_packing_in_memory_spans_every_document_as_a_stream_does(tmp_path, embedded_tokenizer):
    # 2500 short documents at a long seq_len: packed in batches of documents, each batch's tail was dropped
    # (fewer sequences than the stream's, most of them different).
    path = _write_jsonl(tmp_path / "short.jsonl", [{"text": f"x{i} = {i}\n"} for i in range(2500)])
    data_cfg = DataConfig(seq_len=300)
    in_memory = data.build_dataset(DatasetSpec(path=path), data_cfg, embedded_tokenizer, 0)
    total = sum(
        len(ids) for ids in data._document_ids(embedded_tokenizer, [f"x{i} = {i}\n" for i in range(2500)])
    )
    assert len(in_memory) == (total - 1) // 300
    streamed = data.build_dataset(DatasetSpec(path=path, streaming=True), data_cfg, embedded_tokenizer, 0)
    for a, b in zip(streamed.head(len(in_memory)), in_memory, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "position_ids", "targets"))


def test_a_txt_file_is_one_document_with_its_newlines(tmp_path, embedded_tokenizer):
    (tmp_path / "a.txt").write_text("def add(a, b):\n    return a + b\n")
    (tmp_path / "b.txt").write_text("def sub(a, b):\n    return a - b\n")
    texts = data.load_texts(DatasetSpec(path=str(tmp_path)))
    assert sorted(texts["text"]) == [
        "def add(a, b):\n    return a + b\n",
        "def sub(a, b):\n    return a - b\n",
    ]
    packed = data.tokenize_and_pack(texts, embedded_tokenizer, seq_len=8, name=str(tmp_path))
    restarts = sum(int((row["position_ids"][1:] == 0).sum()) for row in packed)
    assert restarts <= 1  # within a sequence, positions restart only where the second file starts


@pytest.mark.parametrize("streaming", [False, True])
def test_a_null_text_names_its_row(tmp_path, embedded_tokenizer, streaming):
    path = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "x = 1\n"}, {"text": None}])
    with pytest.raises(LLMDistillError, match=r"docs.jsonl row 2: text is missing"):
        ds = data.build_dataset(
            DatasetSpec(path=path, streaming=streaming), DataConfig(seq_len=16), embedded_tokenizer, 0
        )
        ds.head(10) if streaming else None


def test_a_new_version_of_the_data_code_builds_its_sequences_anew(tmp_path, embedded_tokenizer, monkeypatch):
    # datasets keys a cached map by its function and closure, not by the module code that function calls.
    path = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "x = 1\n" * 40}])
    build = lambda: data.build_dataset(DatasetSpec(path=path), DataConfig(seq_len=16), embedded_tokenizer, 0)  # noqa: E731
    before = build()[:]["targets"]
    original = data.document_sequences

    def trains_nothing(docs, seq_len):
        for sequence in original(docs, seq_len):
            yield sequence | {"targets": [IGNORE_INDEX] * seq_len}

    monkeypatch.setattr(data, "document_sequences", trains_nothing)
    monkeypatch.setattr(data, "DATA_CODE", "a later version")
    after = build()[:]["targets"]
    assert (before != IGNORE_INDEX).any() and (after == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    "content, field, message",
    [
        ("", "text", "is empty"),
        ('{"body": "x"}\n', "text", "no field 'text'"),
        ('{"text": 3}\n', "text", "field 'text' holds int64, not text"),
    ],
)
def test_bad_datasets_are_named(tmp_path, content, field, message):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(LLMDistillError, match=message):
        data.load_texts(DatasetSpec(path=str(f), text_field=field))


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(LLMDistillError, match="data file not found"):
        data.load_texts(DatasetSpec(path=str(tmp_path / "missing.jsonl")))


# ------------------------------------------------------------------------------ chat and prompt/completion

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Mistral-style: no generation prompt, no newline, the answer ends with EOS (a special token).
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
    "{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)
A1, A2, A3 = "def add(a, b):\n    return a + b", "def add3(a, b, c):\n    return a + b + c", "return 0"
CHAT = [
    {"role": "system", "content": "Answer with code."},
    {"role": "user", "content": "Add two numbers."},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": "Now three."},
    {"role": "assistant", "content": A2},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _n_tokens(tokenizer, turns) -> int:
    text = tokenizer.apply_chat_template(turns, chat_template=CHATML, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _trained_runs(tokenizer, sample) -> list[str]:
    """The text of each run of consecutive trained targets."""
    runs, run = [], []
    for t in [*sample["targets"].tolist(), IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            run.append(t)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def _build(tmp_path, tokenizer, rows, seed=0, **cfg):
    spec = {k: cfg.pop(k) for k in list(cfg) if k in DatasetSpec.model_fields}
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    data_cfg = DataConfig(**{"seq_len": 256, **cfg})
    return data.build_dataset(DatasetSpec(path=path, **spec), data_cfg, tokenizer, seed)


@pytest.fixture(scope="module")
def mistral_tokenizer(embedded_tokenizer):
    """The embedded tokenizer with its own chat template (no data.chat_template needed)."""
    tok = copy.deepcopy(embedded_tokenizer)
    tok.chat_template = MISTRAL
    return tok


def test_messages_train_every_assistant_answer_and_its_end_marker(tmp_path, embedded_tokenizer):
    ds = _build(tmp_path, embedded_tokenizer, [{"messages": CHAT}], format="messages", chat_template=CHATML)
    sample = ds[0]
    assert _trained_runs(embedded_tokenizer, sample) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]
    # each answer is predicted from the last token of its header, and nothing before it is trained
    first = next(t for t, y in enumerate(sample["targets"].tolist()) if y != IGNORE_INDEX)
    assert embedded_tokenizer.decode(sample["input_ids"][: first + 1]).endswith(
        "Add two numbers.<|im_end|>\n<|im_start|>assistant\n"
    )


# Phi-3-style: an end-of-turn marker, and EOS after the last turn, which shares "<|" with the next header.
PHI3 = (
    "{% for m in messages %}{{ '<|' + m.role + '|>\n' + m.content + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def test_a_turn_ends_at_its_marker_where_the_last_turn_differs_inside_a_token(tmp_path, embedded_tokenizer):
    tokenizer = copy.deepcopy(embedded_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    ds = _build(tmp_path, tokenizer, [{"messages": CHAT[1:]}], format="messages", chat_template=PHI3)
    # The first answer trained up to its marker, not into the next turn's "<|user|>".
    assert _trained_runs(tokenizer, ds[0])[0] == A1 + "<|end|>"
    trained = {tokenizer.convert_ids_to_tokens(int(t)) for t in ds[0]["targets"] if t != IGNORE_INDEX}
    assert "<|user|>" not in trained


def test_conversations_are_packed_in_memory_as_in_a_stream(tmp_path, embedded_tokenizer):
    # 2100 conversations: packed in batches of 2000 rows, the sequence at the batch's end was cut short.
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(2100)
    ]
    path = _write_jsonl(tmp_path / "chats.jsonl", rows)
    data_cfg = DataConfig(seq_len=320, chat_template=CHATML)  # (row 2000 then falls inside a sequence)
    spec = {"path": path, "format": "messages"}
    in_memory = data.build_dataset(DatasetSpec(**spec), data_cfg, embedded_tokenizer, 0)
    streamed = data.build_dataset(DatasetSpec(**spec, streaming=True), data_cfg, embedded_tokenizer, 0)
    for a, b in zip(streamed.head(len(in_memory)), in_memory, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "position_ids", "targets"))
    # and no more of them: the stream's next sequence starts its second pass
    assert torch.equal(streamed.head(len(in_memory) + 1)[-1]["input_ids"], in_memory[0]["input_ids"])


def test_a_conversation_may_open_with_the_assistant(tmp_path, embedded_tokenizer):
    greeting = [{"role": "assistant", "content": "Hello, what shall we write?"}, *CHAT[1:]]
    ds = _build(
        tmp_path, embedded_tokenizer, [{"messages": greeting}], format="messages", chat_template=CHATML
    )
    runs = _trained_runs(embedded_tokenizer, ds[0])
    assert runs == ["Hello, what shall we write?<|im_end|>", A1 + "<|im_end|>", A2 + "<|im_end|>"]


def test_messages_train_on_last(tmp_path, embedded_tokenizer):
    ds = _build(
        tmp_path,
        embedded_tokenizer,
        [{"messages": CHAT}],
        format="messages",
        chat_template=CHATML,
        train_on="last",
    )
    assert _trained_runs(embedded_tokenizer, ds[0]) == [A2 + "<|im_end|>"]


def test_messages_with_the_tokenizers_own_template(tmp_path, mistral_tokenizer):
    ds = _build(tmp_path, mistral_tokenizer, [{"messages": CHAT[1:]}], format="messages")
    eos = mistral_tokenizer.eos_token
    assert _trained_runs(mistral_tokenizer, ds[0]) == [A1 + eos, A2 + eos]
    # the template's text is all there: the conversation rendered, then padding
    ids = [i for i in ds[0]["input_ids"].tolist() if i != mistral_tokenizer.pad_token_id]
    assert mistral_tokenizer.decode(ids) == mistral_tokenizer.apply_chat_template(CHAT[1:], tokenize=False)


def test_template_from_a_file(tmp_path, embedded_tokenizer):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    ds = _build(
        tmp_path, embedded_tokenizer, [{"messages": CHAT}], format="messages", chat_template=str(template)
    )
    assert _trained_runs(embedded_tokenizer, ds[0]) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]


def test_prompt_completion_plain_and_as_chat(tmp_path, embedded_tokenizer):
    rows = [{"question": "# add two numbers\n", "answer": A1}]
    fields = {"format": "prompt_completion", "prompt_field": "question", "completion_field": "answer"}
    plain = _build(tmp_path, embedded_tokenizer, rows, **fields)[0]
    assert _trained_runs(embedded_tokenizer, plain) == [A1 + embedded_tokenizer.eos_token]
    prompt_len = len(embedded_tokenizer(rows[0]["question"])["input_ids"])
    first = next(t for t, y in enumerate(plain["targets"].tolist()) if y != IGNORE_INDEX)
    assert first == prompt_len - 1  # the completion's first token is predicted from the prompt's last
    chat = _build(tmp_path, embedded_tokenizer, rows, **fields, chat=True, chat_template=CHATML)[0]
    assert _trained_runs(embedded_tokenizer, chat) == [A1 + "<|im_end|>"]


def test_prompt_and_completion_are_tokenized_as_the_model_reads_them(tmp_path):
    from tokenizers import decoders, pre_tokenizers

    from llmdistill.embedded import student_tokenizer
    from llmdistill.models import load_tokenizer

    # Llama-2/Mistral's SentencePiece setting: apart, the completion would start with a space it lacks.
    tokenizer = load_tokenizer(str(student_tokenizer("sp-unigram")))
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.backend_tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    prompt, completion = "# is this the end?\n", 'def is_end(tok):\n    return tok == "<|endoftext|>"'
    rows = [{"prompt": prompt, "completion": completion}]
    sample = _build(tmp_path, tokenizer, rows, format="prompt_completion")[0]
    ids = [i for i in sample["input_ids"].tolist() if i != tokenizer.pad_token_id]
    joint = tokenizer(prompt + completion, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == joint
    # the literal "<|endoftext|>" in the answer is text: the only EOS trained is the one that ends it
    (trained,) = _trained_runs(tokenizer, sample)
    assert trained.startswith("def is_end") and trained.endswith(tokenizer.eos_token)
    assert int((sample["targets"] == tokenizer.eos_token_id).sum()) == 1


def test_packed_conversations_do_not_attend_to_each_other(tmp_path, embedded_tokenizer, tiny_llama):
    rows = [
        {"messages": CHAT[1:3]},
        {"messages": [{"role": "user", "content": "Zero."}, {"role": "assistant", "content": A3}]},
    ]
    packed = _build(tmp_path, embedded_tokenizer, rows, format="messages", chat_template=CHATML)
    assert len(packed) == 1  # both in one sequence
    first_len = _n_tokens(embedded_tokenizer, CHAT[1:3])
    pos = packed[0]["position_ids"]
    assert pos[first_len] == 0 and pos[first_len - 1] == first_len - 1
    single = _build(tmp_path, embedded_tokenizer, rows[1:], format="messages", chat_template=CHATML)[0]
    second_len = int((single["targets"] != IGNORE_INDEX).nonzero().max()) + 2
    with torch.no_grad():
        together = tiny_llama(
            input_ids=packed[0]["input_ids"][None], position_ids=pos[None], use_cache=False
        ).logits
        alone = tiny_llama(input_ids=single["input_ids"][None, :second_len]).logits
    torch.testing.assert_close(
        together[0, first_len : first_len + second_len], alone[0], atol=1e-5, rtol=1e-5
    )
    # the second conversation's targets are the same packed or alone
    assert (
        packed[0]["targets"][first_len : first_len + second_len].tolist()
        == single["targets"][:second_len].tolist()
    )


def test_unpacked_samples_are_padded_and_padding_changes_nothing(tmp_path, embedded_tokenizer, tiny_llama):
    rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    ds = _build(
        tmp_path, embedded_tokenizer, rows, format="messages", chat_template=CHATML, pack=False, seq_len=200
    )
    assert len(ds) == 2
    sample = ds[1]
    n = _n_tokens(embedded_tokenizer, CHAT[1:3])
    pad = embedded_tokenizer.pad_token_id
    assert sample["input_ids"][n:].eq(pad).all() and sample["targets"][n - 1 :].eq(IGNORE_INDEX).all()
    assert sample["position_ids"].tolist() == list(range(200))
    # Padding comes after the sample and attention is causal: the sample's logits are those of it alone, so
    # no attention mask is needed.
    with torch.no_grad():
        padded = tiny_llama(
            input_ids=sample["input_ids"][None], position_ids=sample["position_ids"][None], use_cache=False
        ).logits
        alone = tiny_llama(input_ids=sample["input_ids"][None, :n]).logits
    torch.testing.assert_close(padded[0, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_long_conversations_are_dropped_or_cut_at_a_turn(tmp_path, embedded_tokenizer, caplog):
    short = [{"role": "user", "content": "Zero."}, {"role": "assistant", "content": A3}]
    rows = [{"messages": CHAT}, {"messages": short}]
    full_len = _n_tokens(embedded_tokenizer, CHAT)
    first_turns = _n_tokens(embedded_tokenizer, CHAT[:3])
    seq_len = (first_turns + full_len) // 2
    common = dict(format="messages", chat_template=CHATML, pack=False, seq_len=seq_len)
    with caplog.at_level("WARNING", logger="llmdistill.data"):
        dropped = _build(tmp_path, embedded_tokenizer, rows, **common)
    assert [_trained_runs(embedded_tokenizer, s) for s in dropped] == [[A3 + "<|im_end|>"]]
    assert "1 of 2 samples are longer than data.seq_len" in caplog.text and "1 dropped, 0 cut" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="llmdistill.data"):
        cut = _build(tmp_path, embedded_tokenizer, rows, **common, truncation="turns")
    assert [_trained_runs(embedded_tokenizer, s) for s in cut] == [[A1 + "<|im_end|>"], [A3 + "<|im_end|>"]]
    assert "0 dropped, 1 cut" in caplog.text
    # the cut conversation ends at its first answer's end marker: the rest of the sequence is padding
    ids = cut[0]["input_ids"].tolist()
    text = embedded_tokenizer.decode([i for i in ids if i != embedded_tokenizer.pad_token_id])
    assert text.endswith(A1 + "<|im_end|>")
    # a conversation whose first answer does not fit is dropped under both rules (the cut one ends at the
    # end marker, one token before first_turns, which renders the newline after it)
    tiny = _build(
        tmp_path, embedded_tokenizer, rows, **{**common, "seq_len": first_turns - 2}, truncation="turns"
    )
    assert len(tiny) == 1


# ---------------------------------------------------------------------------------------------- naming


FIXTURE = Path(__file__).parent / "data" / "chat_dataset"


def test_splits_slices_and_configs_of_a_local_dataset():
    assert len(data.load_rows(DatasetSpec(path=str(FIXTURE), name="chat", format="messages"))) == 10
    assert (
        len(
            data.load_rows(
                DatasetSpec(path=str(FIXTURE), name="chat", split="train[:30%]", format="messages")
            )
        )
        == 3
    )
    assert (
        len(
            data.load_rows(DatasetSpec(path=str(FIXTURE), name="chat", split="validation", format="messages"))
        )
        == 2
    )
    assert data.load_rows(DatasetSpec(path=str(FIXTURE), name="docs"))[0]["text"].startswith("x0 = 0")
    one_file = str(FIXTURE / "chat" / "train.jsonl")
    rows = data.load_rows(DatasetSpec(path=one_file, split="train[2:5]", format="messages"))
    assert [r["messages"][0]["content"] for r in rows] == ["Write f2.", "Write f3.", "Write f4."]
    with pytest.raises(LLMDistillError, match="'nope' not found"):
        data.load_rows(DatasetSpec(path=str(FIXTURE), name="nope"))
    with pytest.raises(LLMDistillError, match="a single file has one split"):
        data.load_rows(DatasetSpec(path=one_file, split="validation", format="messages"))


def _stream_spec(**kw):
    return DatasetSpec(path=str(FIXTURE), name="chat", format="messages", **kw)


def test_streaming_gives_the_in_memory_sequences_and_resumes_exactly(embedded_tokenizer):
    cfg = DataConfig(seq_len=96, chat_template=CHATML)
    in_memory = data.build_dataset(_stream_spec(), cfg, embedded_tokenizer, seed=0)
    stream = data.build_dataset(_stream_spec(streaming=True), cfg, embedded_tokenizer, seed=0)
    assert isinstance(stream, data.PackedStream)
    streamed = stream.head(len(in_memory) + 2)
    for i in range(len(in_memory)):
        for k in ("input_ids", "position_ids", "targets"):
            assert streamed[i][k].tolist() == in_memory[i][k].tolist(), (i, k)
    # endless: a second pass starts again from the first sequence
    assert streamed[len(in_memory)]["input_ids"].tolist() == in_memory[0]["input_ids"].tolist()
    _assert_resumes(stream, world=2)


def _assert_resumes(dataset, world, mb=2, steps=9, start=4):
    for rank in range(world):
        straight = list(itertools.islice(data.micro_batches(dataset, mb, world, rank, seed=1), steps))
        resumed = list(
            itertools.islice(data.micro_batches(dataset, mb, world, rank, seed=1, start=start), steps - start)
        )
        for a, b in zip(straight[start:], resumed, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ranks = [next(iter(data.micro_batches(dataset, mb, world, r, seed=1)))["input_ids"] for r in range(world)]
    assert not torch.equal(ranks[0], ranks[1])


def test_blend_follows_the_weights_and_resumes_exactly(tmp_path, embedded_tokenizer):
    docs = tmp_path / "docs.jsonl"
    _write_jsonl(docs, [{"text": f"value_{i} = {i}\n" * 30} for i in range(40)])
    specs = [
        DatasetSpec(path=str(docs), weight=0.7),
        DatasetSpec(path=str(FIXTURE), name="chat", format="messages", weight=0.3),
    ]
    cfg = DataConfig(seq_len=64, chat_template=CHATML)
    parts = [data.build_dataset(s, cfg, embedded_tokenizer, seed=0) for s in specs]
    blended = data.build_dataset(specs, cfg, embedded_tokenizer, seed=0)
    assert len(blended) == len(parts[0]) + len(parts[1])
    chat_sequences = {tuple(s["input_ids"].tolist()) for s in parts[1]}
    from_chat = [tuple(s["input_ids"].tolist()) in chat_sequences for s in blended]
    for n in (10, 20, len(blended)):
        assert abs(sum(from_chat[:n]) - 0.3 * n) <= 1, n
    again = data.build_dataset(specs, cfg, embedded_tokenizer, seed=0)
    assert torch.equal(blended[:]["input_ids"], again[:]["input_ids"])
    _assert_resumes(blended, world=2)
    # the same blend, streamed: the same order of sources, and an exact resume
    streamed = data.build_dataset(
        [s.model_copy(update={"streaming": True}) for s in specs], cfg, embedded_tokenizer, seed=0
    )
    assert [tuple(s["input_ids"].tolist()) in chat_sequences for s in streamed.head(20)] == from_chat[:20]
    _assert_resumes(streamed, world=2)


# ---------------------------------------------------------------------------------------------- bad input


def _row(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = _row(("user", "q"), ("assistant", "a"))
BAD_ROWS = [
    ([GOOD, _row(("user", "q"), ("robot", "a"))], {}, r"rows.jsonl row 2: turn 2 has unknown role 'robot'"),
    (
        [GOOD, GOOD, _row(("user", "q"), ("assistant", " "))],
        {},
        r"rows.jsonl row 3: turn 2 is an empty assistant turn",
    ),
    ([_row(("system", "s"), ("user", "q"))], {}, r"rows.jsonl row 1: no assistant turn"),
    ([{"messages": "hello"}], {}, r"rows.jsonl row 1: messages must be a non-empty list"),
    ([GOOD], {"chat_template": None}, r"tokenizer has no chat template; set data.chat_template"),
    (
        [GOOD],
        {"chat_template": "missing.jinja"},
        r"data.chat_template: 'missing.jinja' is neither a file nor",
    ),
    (
        [GOOD],
        {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}{{ raise_exception('no') }}"},
        r"row 1: the chat template failed: no",
    ),
    (
        [{"prompt": "p", "completion": "c"}, {"prompt": "p"}],
        {"format": "prompt_completion"},
        r"row 2: completion is missing",
    ),
    ([{"prompt": "p", "answer": "c"}], {"format": "prompt_completion"}, r"no field 'completion'"),
    ([{"prompt": "p", "completion": "  "}], {"format": "prompt_completion"}, r"row 1: completion is empty"),
    ([{"body": "x"}], {"format": "text"}, r"rows.jsonl: no field 'text'"),
]


@pytest.mark.parametrize("rows, cfg, message", BAD_ROWS)
def test_bad_rows_are_named_with_file_and_row(tmp_path, embedded_tokenizer, rows, cfg, message):
    cfg = {"format": "messages", "chat_template": CHATML, **cfg}
    with pytest.raises(LLMDistillError, match=message):
        _build(tmp_path, embedded_tokenizer, rows, **cfg)


def test_bad_files_are_named(tmp_path, embedded_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(LLMDistillError, match=r"bad.jsonl line 2: not UTF-8 \(byte 0xe9 at column 14\)"):
        data.build_dataset(DatasetSpec(path=str(bad)), DataConfig(), embedded_tokenizer, seed=0)
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.md").write_text("no data here")
    with pytest.raises(
        LLMDistillError, match=r"no data files \(.jsonl/.json/.txt/.parquet\) under .*nothing"
    ):
        data.load_rows(DatasetSpec(path=str(tmp_path / "nothing")))
    with pytest.raises(LLMDistillError, match="slicing needs streaming: false"):
        data.load_rows(DatasetSpec(path=str(FIXTURE), name="chat", split="train[:2]", streaming=True))


# ---------------------------------------------------------------------------------------------- training


def test_training_on_chat_data_scores_only_the_answers(tmp_path, embedded_tokenizer):
    from conftest import QUICK, read_log, run_cli

    rows = []
    for i in range(48):
        answer = f"def scale_{i}(values):\n    return [v * {i} for v in values]"
        rows.append(
            _row(("system", "Answer with code."), ("user", f"Scale a list by {i}."), ("assistant", answer))
        )
    chat = _write_jsonl(tmp_path / "chat.jsonl", rows)
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    spec = f"{{path: {chat}, format: messages}}"
    result = run_cli(
        [
            "train",
            *QUICK,
            f"data.train={spec}",
            f"data.validation={spec}",
            f"data.chat_template={template}",
            "data.seq_len=128",
            "train.max_steps=3",
            f"run.output_dir={tmp_path}",
            "run.name=chat",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "chat" / "summary.json").read_text())
    assert sorted(read_log(tmp_path / "chat")) == [1, 2, 3]
    # The held-out batches the trainer scored: the first eval_batches x micro_batch_size sequences.
    cfg = DataConfig(seq_len=128, chat_template=str(template))
    held_out = data.build_dataset(DatasetSpec(path=chat, format="messages"), cfg, embedded_tokenizer, seed=0)
    held_out = [held_out[i] for i in range(2 * 4)]
    answers = {r["messages"][2]["content"] + "<|im_end|>" for r in rows}
    runs = [run for s in held_out for run in _trained_runs(embedded_tokenizer, s)]
    assert runs and set(runs) <= answers
    trained = sum(int((s["targets"] != IGNORE_INDEX).sum()) for s in held_out)
    real = sum(int((s["input_ids"] != embedded_tokenizer.pad_token_id).sum()) for s in held_out)
    assert summary["student_eval"]["tokens"] == trained < real / 2
    assert summary["teacher_eval"]["tokens"] == trained


def test_unpacked_text_documents_are_cut_and_padded(tmp_path, embedded_tokenizer):
    docs = ["x = 1\n" * 30, "y = 2\n"]
    ds = _build(tmp_path, embedded_tokenizer, [{"text": d} for d in docs], seq_len=32, pack=False)
    lengths = [len(_document_ids_of(embedded_tokenizer, d)) for d in docs]
    assert len(ds) == -(-lengths[0] // 32) + 1
    last = ds[len(ds) - 1]
    # the short document alone, then padding that is never trained
    assert last["position_ids"].tolist() == list(range(32))
    assert _trained_runs(embedded_tokenizer, last) == [
        embedded_tokenizer.decode(_document_ids_of(embedded_tokenizer, docs[1])[1:])
    ]


def _document_ids_of(tokenizer, text):
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


def test_a_template_that_rewrites_past_answers_trains_the_last_one(tmp_path, embedded_tokenizer):
    # like templates that drop the reasoning of past turns: an earlier answer is not in the full rendering
    rewrites = CHATML.replace(
        "{{ m.content }}",
        "{% if m.role == 'assistant' and not loop.last %}(earlier answer)"
        "{% else %}{{ m.content }}{% endif %}",
    )
    rows = [{"messages": CHAT}]
    with pytest.raises(
        LLMDistillError, match=r"row 1: the chat template does not reproduce assistant turn 3"
    ):
        _build(tmp_path, embedded_tokenizer, rows, format="messages", chat_template=rewrites)
    ds = _build(
        tmp_path, embedded_tokenizer, rows, format="messages", chat_template=rewrites, train_on="last"
    )
    assert _trained_runs(embedded_tokenizer, ds[0]) == [A2 + "<|im_end|>"]


_BUILD_SCRIPT = """
import json, sys
from llmdistill import data
from llmdistill.config import DataConfig, DatasetSpec
from llmdistill.models import load_tokenizer
spec = DatasetSpec(path=sys.argv[1])
ds = data.packed_dataset(spec, DataConfig(train=spec, seq_len=int(sys.argv[2])), load_tokenizer(sys.argv[3]))
print(json.dumps({"cache": ds.cache_files[-1]["filename"], "ids": ds[:]["input_ids"].tolist()}))
"""


def test_tokenized_data_is_cached_across_runs_keyed_by_tokenizer_and_length(tmp_path, embedded_tokenizer):
    """`datasets` keys each map by a fingerprint of its input file and function (tokenizer and seq_len
    included): a second run reads the packed sequences back instead of tokenizing again."""
    import subprocess
    import sys

    from llmdistill.models import EMBEDDED_TEACHER

    path = tmp_path / "docs.jsonl"
    docs = [{"text": f"def f{i}(x):\n    return x * {i}\n" * 8} for i in range(40)]
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    spec = DatasetSpec(path=str(path))

    def build(seq_len, tokenizer):
        return data.packed_dataset(spec, DataConfig(train=spec, seq_len=seq_len), tokenizer)

    first = build(32, embedded_tokenizer)
    cache = Path(first.cache_files[-1]["filename"])
    written = cache.stat().st_mtime_ns
    again = subprocess.run(
        [sys.executable, "-c", _BUILD_SCRIPT, str(path), "32", str(EMBEDDED_TEACHER)],
        capture_output=True,
        text=True,
        check=True,
    )
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert second["cache"] == str(cache) and cache.stat().st_mtime_ns == written  # read, not rewritten
    assert second["ids"] == first[:]["input_ids"].tolist()

    assert build(48, embedded_tokenizer).cache_files[-1]["filename"] != str(cache)
    other = data.train_bpe_tokenizer(iter(["some other text to learn from " * 40]), vocab_size=300)
    other.eos_token = other.pad_token = other.convert_ids_to_tokens(0)
    assert build(32, other).cache_files[-1]["filename"] != str(cache)
