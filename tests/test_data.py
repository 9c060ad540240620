import itertools
import json

import pytest
import torch

from llmdistill import data
from llmdistill.config import DatasetSpec, LLMDistillError
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


def test_bytes_of_targets_counts_the_predicted_text(embedded_tokenizer):
    text = "def f(x):\n    return x  # ünïcode\n"
    ids = embedded_tokenizer(text)["input_ids"]
    targets = torch.tensor([ids[1:] + [IGNORE_INDEX]])
    first = embedded_tokenizer.decode(ids[:1])
    assert data.bytes_of_targets(embedded_tokenizer, targets) == len(text.encode()) - len(first.encode())


def test_tokenize_and_pack_local_jsonl(tmp_path, embedded_tokenizer):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"body": "x = 1\n" * 40}) for _ in range(3)))
    texts = data.load_texts(DatasetSpec(path=str(f), text_field="body"))
    packed = data.tokenize_and_pack(texts, embedded_tokenizer, seq_len=16, name=str(f))
    assert len(packed) > 3 and packed[0]["input_ids"].shape == (16,)


@pytest.mark.parametrize(
    "content, field, message",
    [
        ("", "text", "is empty"),
        ('{"body": "x"}\n', "text", "no field 'text'"),
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
