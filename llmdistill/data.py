"""Datasets: the embedded stdlib corpus, local files or hub names, tokenized and packed into fixed-length
sequences.

A packed sequence carries `position_ids` that restart at every document, so transformers builds a
block-causal mask (no attention across documents), and `targets` already shifted by one: `targets[t]` is the
token to predict at `t`, -100 where the next token belongs to another document. transformers only derives
that mask with no attention_mask and no KV cache: call models with `position_ids=..., use_cache=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

from llmdistill.config import DatasetSpec, LLMDistillError
from llmdistill.signal import IGNORE_INDEX

SPLITS = ("train", "validation", "test")
# Directories of the standard library that are tests, vendored packages or generated tables: not code
# worth learning.
_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",
    "pydoc_data",
}
_MAX_FILE_BYTES = 256_000


def cache_dir() -> Path:
    return Path(os.environ.get("LLMDISTILL_CACHE", Path.home() / ".cache" / "llmdistill"))


# -------------------------------------------------------------------------------------------- embedded corpus


def stdlib_files() -> list[tuple[str, Path]]:
    """The standard library's own sources, as (relative path, path), sorted so every machine sees the same
    order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or p.stat().st_size > _MAX_FILE_BYTES:
            continue
        files.append((rel.as_posix(), p))
    return sorted(files)


def split_of(relpath: str) -> str:
    """Split by file (a hash of its path), so no file leaks across splits: 90% train, 5% validation, 5%
    test."""
    bucket = int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def embedded_corpus() -> dict[str, Path]:
    """Build (once) the stdlib corpus as one jsonl file per split; returns {split: path} plus "manifest"."""
    files = stdlib_files()
    listing = hashlib.sha256("\n".join(rel for rel, _ in files).encode()).hexdigest()[:12]
    out = cache_dir() / f"corpus-{listing}"
    paths = {s: out / f"{s}.jsonl" for s in SPLITS} | {"manifest": out / "manifest.json"}
    if paths["manifest"].exists():
        return paths
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    counts = dict.fromkeys(SPLITS, 0)
    tmp = {s: out / f"{s}.jsonl.tmp" for s in SPLITS}
    handles = {s: tmp[s].open("w") for s in SPLITS}
    for rel, path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        split = split_of(rel)
        handles[split].write(json.dumps({"text": text, "path": rel}) + "\n")
        counts[split] += 1
        digest.update(rel.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
    for s in SPLITS:
        handles[s].close()
        tmp[s].replace(paths[s])
    manifest = {
        "source": "python stdlib",
        "stdlib": sysconfig.get_paths()["stdlib"],
        "documents": counts,
        "content_sha256": digest.hexdigest(),
    }
    # The manifest is written last: its presence marks a complete corpus.
    paths["manifest"].write_text(json.dumps(manifest, indent=2))
    return paths


def train_bpe_tokenizer(texts: Iterator[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style, so every byte string is encodable) wrapped as an HF
    tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


# ---------------------------------------------------------------------------------------------- loading


def _data_files(path: Path) -> tuple[str, list[str]]:
    kinds = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in kinds)
    if not files:
        raise LLMDistillError(f"no data files (.jsonl/.json/.txt/.parquet) under {path}")
    formats = {kinds.get(p.suffix) for p in files}
    if len(formats) != 1 or None in formats:
        raise LLMDistillError(f"data path {path}: mixed or unknown file types {sorted(map(str, formats))}")
    return formats.pop(), [str(p) for p in files]


def load_texts(spec: DatasetSpec):
    """The documents of one dataset spec as an HF `datasets.Dataset` with a `text` column."""
    import datasets

    datasets.disable_progress_bars()
    if spec.path.startswith("embedded:"):
        split = spec.path.split(":", 1)[1]
        if split not in SPLITS:
            raise LLMDistillError(f"data path {spec.path}: the embedded corpus has splits {SPLITS}")
        ds = datasets.load_dataset("json", data_files=str(embedded_corpus()[split]), split="train")
    elif spec.format == "hub" or (spec.format == "auto" and not Path(spec.path).exists()):
        if spec.format == "auto" and (spec.path.startswith((".", "/")) or Path(spec.path).suffix):
            raise LLMDistillError(f"data file not found: {spec.path}")
        try:
            ds = datasets.load_dataset(spec.path, split=spec.split)
        except Exception as err:  # the hub raises many kinds; the user needs the name and the reason
            raise LLMDistillError(
                f"could not load dataset {spec.path!r} (split {spec.split}): {err}"
            ) from None
    else:
        fmt, files = _data_files(Path(spec.path))
        fmt = fmt if spec.format == "auto" else spec.format
        if all(Path(f).stat().st_size == 0 for f in files):
            raise LLMDistillError(f"dataset {spec.path} is empty")
        try:
            ds = datasets.load_dataset(fmt, data_files=files, split="train")
        except Exception as err:  # malformed files surface as many exception types inside datasets
            raise LLMDistillError(f"could not read dataset {spec.path} as {fmt}: {err}") from None
    if spec.text_field not in ds.column_names:
        raise LLMDistillError(
            f"dataset {spec.path}: no field {spec.text_field!r} (fields: {ds.column_names})"
        )
    if spec.max_documents is not None:
        ds = ds.select(range(min(spec.max_documents, len(ds))))
    ds = ds.select_columns([spec.text_field])
    if spec.text_field != "text":
        ds = ds.rename_column(spec.text_field, "text")
    if len(ds) == 0:
        raise LLMDistillError(f"dataset {spec.path} is empty")
    return ds


def pack_documents(docs: list[list[int]], seq_len: int) -> dict[str, list[list[int]]]:
    """Concatenate token lists and cut into sequences of `seq_len`; a partial tail is dropped."""
    stream, doc_of = [], []
    for i, ids in enumerate(docs):
        stream.extend(ids)
        doc_of.extend([i] * len(ids))
    out = {"input_ids": [], "position_ids": [], "targets": []}
    for start in range(0, len(stream) - seq_len, seq_len):
        end = start + seq_len
        ids = stream[start:end]
        doc = doc_of[start : end + 1]
        targets = [
            stream[t + 1] if doc[t - start + 1] == doc[t - start] else IGNORE_INDEX for t in range(start, end)
        ]
        pos, p = [], 0
        for t in range(seq_len):
            p = 0 if t == 0 or doc[t] != doc[t - 1] else p + 1
            pos.append(p)
        out["input_ids"].append(ids)
        out["position_ids"].append(pos)
        out["targets"].append(targets)
    return out


def tokenize_and_pack(texts, tokenizer, seq_len: int, name: str):
    """Tokenized, packed dataset (cached by `datasets`), in torch format."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        encoded = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
        return {
            "ids": [
                ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids for ids in encoded
            ]
        }

    tokenized = texts.map(tokenize, batched=True, remove_columns=texts.column_names)
    packed = tokenized.map(
        lambda b: pack_documents(b["ids"], seq_len), batched=True, batch_size=2000, remove_columns=["ids"]
    )
    if len(packed) == 0:
        raise LLMDistillError(f"dataset {name} has fewer than {seq_len + 1} tokens: nothing to train on")
    packed.set_format("torch")
    return packed


def bytes_of_targets(tokenizer, targets: torch.Tensor) -> int:
    """UTF-8 bytes covered by the valid targets: the denominator of bits-per-byte, whatever the tokenizer."""
    total = 0
    for row in targets.tolist():
        run: list[int] = []
        for t in [*row, IGNORE_INDEX]:
            if t != IGNORE_INDEX:
                run.append(t)
            elif run:
                total += len(tokenizer.decode(run).encode("utf-8"))
                run = []
    return total


# ---------------------------------------------------------------------------------------------- sampling


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g)


def micro_batch_indices(
    num_samples: int, micro_batch: int, world_size: int, rank: int, seed: int, start: int = 0
) -> Iterator[list[int]]:
    """Index lists for this rank's micro-batches, endlessly, starting after `start` consumed micro-batches.

    The position in the data is one integer (micro-batches consumed per rank), so a checkpoint can store it
    and a resumed run continues with exactly the next batch, without replaying the ones before it.
    """
    per_epoch = num_samples // (micro_batch * world_size)
    if per_epoch == 0:
        raise LLMDistillError(
            f"dataset has {num_samples} sequences, fewer than one global batch "
            f"({micro_batch} x {world_size} ranks)"
        )
    position = start
    while True:
        epoch, step = divmod(position, per_epoch)
        order = epoch_order(num_samples, seed, epoch)
        first = (step * world_size + rank) * micro_batch
        yield order[first : first + micro_batch].tolist()
        position += 1


def to_device(batch: dict, device: str) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]).long() for k in samples[0]}


def micro_batches(
    dataset, micro_batch: int, world_size: int, rank: int, seed: int, start: int = 0, workers: int = 0
):
    """A DataLoader over `micro_batch_indices`; the loader's own order is never shuffled."""
    from torch.utils.data import DataLoader

    sampler = micro_batch_indices(len(dataset), micro_batch, world_size, rank, seed, start)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
