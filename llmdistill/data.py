"""Datasets: the embedded stdlib corpus, local files or hub names, as text, chats or prompt/completion pairs,
tokenized and packed into fixed-length sequences.

A sequence carries `position_ids` that restart at every document (or conversation), so transformers builds a
block-causal mask (no attention across them), and `targets` already shifted by one: `targets[t]` is the token
to predict at `t`, -100 where nothing is trained (the next token belongs to another document, or is a prompt,
template or padding token). transformers only derives that mask with no attention_mask and no KV cache: call
models with `position_ids=..., use_cache=False`.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import heapq
import itertools
import json
import logging
import os
import sysconfig
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from llmdistill import cache_dir
from llmdistill.config import DataConfig, DatasetSpec, LLMDistillError
from llmdistill.signal import IGNORE_INDEX

log = logging.getLogger("llmdistill.data")

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
# The code that turns rows into sequences, as part of every cached map's key: `datasets` keys a map by its
# function and what that closes over, not by the code of the module functions it calls, so an upgraded
# llmdistill would otherwise read back sequences its predecessor built.
DATA_CODE = hashlib.sha256(
    b"".join(Path(__file__).with_name(name).read_bytes() for name in ("data.py", "align.py"))
).hexdigest()[:16]


# -------------------------------------------------------------------------------------------- embedded corpus


@functools.cache
def stdlib_files() -> list[tuple[str, Path]]:
    """The standard library's own sources, as (relative path, path), sorted so every machine sees the same
    order. Walked once per process: the walk takes seconds, and every user of the corpus needs the listing."""
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


# ------------------------------------------------------------------------------------ embedded chat set
#
# Instructions made from the corpus's functions that have docstrings, two kinds per function:
#   "write":   the signature and the docstring's first paragraph -> the function's code without its docstring
#   "explain": the code without its docstring -> the docstring's first line
# Each split's instructions come from that split's files, so validation and test instructions are about code
# the train split never shows. Answers stay short enough for a 256-token sequence with the embedded tokenizer.

CHAT_SET_VERSION = 1
_CHAT_MAX_PROMPT_CHARS, _CHAT_MAX_ANSWER_CHARS = 320, 480
WRITE_PROMPT = "Write the Python function `{name}({args})` that: {doc}"
EXPLAIN_PROMPT = "What does this Python function do?\n\n{code}"


def _function_instructions(source: str) -> Iterator[tuple[str, str, str]]:
    """(kind, prompt, answer) for each function of one file that has a docstring and fits the limits."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node, clean=True)
        first = node.body[0]
        # The code is the function less its docstring: there must be a body left, and the docstring must have
        # lines of its own.
        if not doc or len(node.body) < 2 or first.lineno == node.lineno:
            continue
        kept = lines[node.lineno - 1 : first.lineno - 1] + lines[first.end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(kept)).strip("\n")
        if not code.startswith(("def ", "async def ")) or "\t" in code:
            continue
        paragraph = " ".join(doc.split("\n\n", 1)[0].split())
        summary = paragraph.split(". ", 1)[0].rstrip(".") + "."  # its first sentence
        if not 12 <= len(summary) <= 160 or len(code) > _CHAT_MAX_ANSWER_CHARS:
            continue
        write = WRITE_PROMPT.format(name=node.name, args=ast.unparse(node.args), doc=paragraph)
        if len(write) <= _CHAT_MAX_PROMPT_CHARS:
            yield "write", write, code
        explain = EXPLAIN_PROMPT.format(code=code)
        if len(explain) <= _CHAT_MAX_PROMPT_CHARS + _CHAT_MAX_ANSWER_CHARS:
            yield "explain", explain, summary


def embedded_chat_set() -> dict[str, Path]:
    """Build (once) the instruction set from the embedded corpus as `messages` jsonl, one file per split;
    returns {split: path} plus "manifest"."""
    corpus = embedded_corpus()
    content = json.loads(corpus["manifest"].read_text())["content_sha256"]
    out = cache_dir() / f"chat-{content[:12]}-v{CHAT_SET_VERSION}"
    paths = {s: out / f"{s}.jsonl" for s in SPLITS} | {"manifest": out / "manifest.json"}
    if paths["manifest"].exists():
        return paths
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        seen, rows = set(), []
        for line in corpus[split].open():
            doc = json.loads(line)
            for kind, prompt, answer in _function_instructions(doc["text"]):
                if prompt in seen:  # the same trivial method in many classes
                    continue
                seen.add(prompt)
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
                rows.append(json.dumps({"messages": messages, "kind": kind, "path": doc["path"]}) + "\n")
        tmp = out / f"{split}.jsonl.{os.getpid()}.tmp"
        tmp.write_text("".join(rows))
        tmp.replace(paths[split])
        counts[split] = len(rows)
    manifest = {"source": "embedded corpus", "corpus_sha256": content, "version": CHAT_SET_VERSION}
    # The manifest is written last: its presence marks a complete set.
    paths["manifest"].write_text(json.dumps(manifest | {"instructions": counts}, indent=2))
    return paths


def embedded_file(name: str) -> Path:
    """The file behind `embedded:<name>`: a corpus split (text) or `chat-<split>` (messages)."""
    split = name.removeprefix("chat-")
    if split not in SPLITS:
        known = ", ".join([*SPLITS, *(f"chat-{s}" for s in SPLITS)])
        raise LLMDistillError(f"data path embedded:{name}: unknown embedded set (known: {known})")
    return (embedded_chat_set() if name.startswith("chat-") else embedded_corpus())[split]


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

_FILE_TYPES = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


def _data_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _FILE_TYPES)
    if not files:
        raise LLMDistillError(f"no data files (.jsonl/.json/.txt/.parquet) under {path}")
    formats = {_FILE_TYPES.get(p.suffix) for p in files}
    if len(formats) != 1 or None in formats:
        raise LLMDistillError(f"data path {path}: mixed or unknown file types {sorted(map(str, formats))}")
    if all(p.stat().st_size == 0 for p in files):
        raise LLMDistillError(f"dataset {path} is empty")
    return formats.pop(), [str(p) for p in files]


def _check_utf8(files: list[str]) -> None:
    """pyarrow reads invalid UTF-8 into string columns and fails only when a row is read: find it first."""
    for name in files:
        with open(name, "rb") as f:
            for line_number, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise LLMDistillError(
                        f"{name} line {line_number}: not UTF-8 (byte {line[err.start]:#x} at column "
                        f"{err.start + 1})"
                    ) from None


def _where(spec: DatasetSpec, row: int) -> str:
    split = f" (split {spec.split})" if spec.split != "train" else ""
    return f"{spec.path}{split} row {row + 1}"


def load_rows(spec: DatasetSpec):
    """The rows of one dataset spec: a `datasets.Dataset`, or an `IterableDataset` when it streams."""
    import datasets

    datasets.disable_progress_bars()
    if spec.streaming and "[" in spec.split:
        raise LLMDistillError(f"dataset {spec.path}: split {spec.split!r}: slicing needs streaming: false")
    local = spec.path.startswith("embedded:") or Path(spec.path).exists()
    if not local and (spec.path.startswith((".", "/")) or Path(spec.path).suffix in _FILE_TYPES):
        raise LLMDistillError(f"data file not found: {spec.path}")
    if spec.path.startswith("embedded:"):
        builder, files = "json", [str(embedded_file(spec.path.split(":", 1)[1]))]
    elif local:
        builder, files = _data_files(Path(spec.path))
        if builder != "parquet":
            _check_utf8(files)
    if local and (Path(spec.path).is_file() or spec.path.startswith("embedded:")):
        if spec.split.split("[", 1)[0] != "train":
            raise LLMDistillError(
                f"dataset {spec.path}: split {spec.split!r}: a single file has one split, 'train' "
                "(slices such as train[:5%] work)"
            )
        args = dict(path=builder, data_files=files)
    else:  # a directory laid out for load_dataset (split files, configs in its README), or a hub name
        args = dict(path=spec.path, name=spec.name, revision=spec.revision)
    if local and builder == "text":
        # A .txt file is one document, newlines kept (datasets' default makes every line a document).
        args["sample_by"] = "document"
    try:
        ds = datasets.load_dataset(**args, split=spec.split, streaming=spec.streaming)
    except Exception as err:  # datasets raises many kinds; the user needs the name and the reason
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LLMDistillError(
            f"could not load dataset {spec.path!r} (split {spec.split}): {reason}"
        ) from None
    if spec.max_documents is not None:
        ds = (
            ds.take(spec.max_documents)
            if spec.streaming
            else ds.select(range(min(spec.max_documents, len(ds))))
        )
    fields = _row_fields(spec)
    columns = ds.column_names
    if columns is not None:  # a stream may not know its columns before it is read
        for field in fields:
            if field not in columns:
                raise LLMDistillError(f"dataset {spec.path}: no field {field!r} (fields: {columns})")
    if not spec.streaming and len(ds) == 0:
        raise LLMDistillError(f"dataset {spec.path} is empty")
    if spec.format == "text" and not spec.streaming:
        _check_text_column(ds, spec)
    return ds.select_columns(fields) if columns is not None else ds


def _check_text_column(ds, spec: DatasetSpec) -> None:
    """Every document a string: a null or a number fails here naming its row, not inside the tokenizer."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = ds.with_format("arrow")[spec.text_field]
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise LLMDistillError(f"dataset {spec.path}: field {spec.text_field!r} holds {column.type}, not text")
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise LLMDistillError(f"{_where(spec, row)}: {spec.text_field} is missing (null)")


def load_texts(spec: DatasetSpec):
    """The documents of one text dataset spec as a `datasets.Dataset` with a `text` column."""
    if isinstance(spec, list):
        raise LLMDistillError("a blend of datasets cannot be used here: give one dataset")
    if spec.format != "text" or spec.streaming:
        raise LLMDistillError(
            f"dataset {spec.path}: only text data (format: text, streaming: false) can be used here"
        )
    ds = load_rows(spec)
    return ds.rename_column(spec.text_field, "text") if spec.text_field != "text" else ds


# ------------------------------------------------------------------------------------- chat and answers
#
# A messages row is rendered with the chat template as one text. The trained tokens of an assistant turn are
# those overlapping its content, plus the end-of-turn marker the template writes right after it (ChatML's
# <|im_end|>, Llama 3's <|eot_id|>, an EOS), so the model learns to stop. The whitespace after the marker, the
# headers, and all system, user and tool text are not trained. Where a turn lies is found by rendering the
# conversation up to it: the text up to an assistant turn (with the generation prompt) ends where its answer
# starts, and the text up to its end ends where the turn ends. Character spans become token masks through
# the tokenizer's offsets, so no `{% generation %}` markers are needed.

ROLES = ("system", "developer", "user", "assistant", "tool")
KEPT, TRUNCATED, DROPPED = 0, 1, 2


def chat_template(data_cfg: DataConfig, tokenizer) -> str:
    """The Jinja template chat rows are rendered with: data.chat_template (a file or the template), else the
    tokenizer's own."""
    given = data_cfg.chat_template
    if given is None:
        if not getattr(tokenizer, "chat_template", None):
            raise LLMDistillError(
                "chat data: the student's tokenizer has no chat template; set data.chat_template to a "
                "Jinja template or a file holding one"
            )
        return tokenizer.chat_template
    if "{{" in given or "{%" in given:
        return given
    path = Path(given)
    if not path.is_file():
        raise LLMDistillError(f"data.chat_template: {given!r} is neither a file nor a Jinja template")
    return path.read_text(encoding="utf-8")


def _check_messages(messages, where: str, field: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise LLMDistillError(f"{where}: {field} must be a non-empty list of {{role, content}} turns")
    turns = []
    for t, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m:
            raise LLMDistillError(f"{where}: turn {t} is not a {{role, content}} mapping")
        if m["role"] not in ROLES:
            raise LLMDistillError(
                f"{where}: turn {t} has unknown role {m['role']!r} (known: {', '.join(ROLES)})"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise LLMDistillError(f"{where}: turn {t}: content must be a string")
        if m["role"] == "assistant" and not (content or "").strip() and not m.get("tool_calls"):
            raise LLMDistillError(f"{where}: turn {t} is an empty assistant turn")
        # Arrow gives each turn every key seen in the file; absent ones are None, which templates print.
        turns.append({k: v for k, v in m.items() if v is not None})
    if not any(m["role"] == "assistant" and (m.get("content") or "").strip() for m in turns):
        raise LLMDistillError(f"{where}: no assistant turn with content: nothing to train on")
    return turns


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class AnswerSpan(NamedTuple):
    """Where an assistant turn lies in the rendered conversation, in characters: its answer text is
    [start, answer_end), its trained span [start, end) (the end-of-turn marker included), and the text the
    turn's own render shares with the conversation ends at turn_end."""

    turn: int  # index of the turn in the conversation
    start: int
    answer_end: int
    end: int
    turn_end: int


def assistant_spans(
    messages: list[dict], tokenizer, template: str, where: str, only_last: bool = False
) -> tuple[str, list[AnswerSpan]]:
    """The rendered conversation and the span of each assistant turn with content. `only_last`: an earlier
    turn the template rewrites (some drop reasoning from past turns) is left out instead of being an
    error."""
    from jinja2 import TemplateError

    def render(turns, generation_prompt):
        return tokenizer.apply_chat_template(
            turns, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    try:
        full = render(messages, False)
        spans = []
        answers = [
            k for k, m in enumerate(messages) if m["role"] == "assistant" and (m.get("content") or "").strip()
        ]
        for k, m in enumerate(messages):
            content = (m.get("content") or "").strip()
            if m["role"] != "assistant" or not content:
                continue
            # Common prefixes, not equality: a template may end a conversation differently from a turn
            # followed by more turns (a final EOS), and only the part shared with the full text counts.
            # (a conversation may open with the assistant: there is no turn before it to render)
            start = _common_prefix(render(messages[:k], True), full) if k else 0
            turn_end = _common_prefix(render(messages[: k + 1], False), full)
            answer = full.find(content, start, turn_end)
            if answer < 0 and only_last and k != answers[-1]:
                continue
            if answer < 0:
                raise LLMDistillError(
                    f"{where}: the chat template does not reproduce assistant turn {k + 1}'s text in the "
                    "conversation (it rewrites earlier turns?); try data.train_on=last"
                )
            answer_end = answer + len(content)
            end = answer_end + len(full[answer_end:turn_end].rstrip())
            spans.append(AnswerSpan(k, answer, answer_end, end, turn_end))
    except (TemplateError, ValueError) as err:  # transformers raises ValueError for a conversation it refuses
        raise LLMDistillError(f"{where}: the chat template failed: {err}") from None
    return full, spans


def _span_mask(offsets: list[tuple[int, int]], spans: list[AnswerSpan]) -> list[int]:
    mask = [0] * len(offsets)
    for span in spans:
        for i, (a, b) in enumerate(offsets):
            if a < span.end and b > span.start:
                mask[i] = 1
    return mask


def _ended_within_its_turn(span: AnswerSpan, text: str, offsets: list[tuple[int, int]]) -> AnswerSpan:
    """`span` ending before a token that reaches past its turn's shared text: where the turn's own render
    and the conversation part inside a token (Phi-3 ends a conversation with EOS, `<|endoftext|>`, where
    the next turn writes `<|user|>`), the shared characters `<|` are the start of the next turn's header."""
    for a, b in offsets:
        if a < span.end and b > span.turn_end:
            return span._replace(end=span.answer_end + len(text[span.answer_end : a].rstrip()))
    return span


def _tokens_before(offsets: list[tuple[int, int]], end: int) -> int:
    """How many leading tokens lie wholly before character `end`."""
    return next((i for i, (_, b) in enumerate(offsets) if b > end), len(offsets))


def encode_conversation(
    turns: list[dict], tokenizer, template: str, data_cfg: DataConfig, seq_len: int, where: str
):
    """(text, ids, character offsets, trained answer spans, status) of one conversation rendered with
    `template`, within seq_len by the truncation rule."""
    text, spans = assistant_spans(turns, tokenizer, template, where, data_cfg.train_on == "last")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    spans = [_ended_within_its_turn(span, text, offsets) for span in spans]
    status = KEPT
    if len(ids) > seq_len:
        # "turns": cut after the last assistant turn (its end marker included) that ends within seq_len.
        fits = [s for s in spans if _tokens_before(offsets, s.end) <= seq_len]
        if data_cfg.truncation == "drop" or not fits:
            return text, [], [], [], DROPPED
        keep = _tokens_before(offsets, fits[-1].end)
        ids, offsets, spans, status = ids[:keep], offsets[:keep], fits, TRUNCATED
    if data_cfg.train_on == "last":
        spans = spans[-1:]
    return text, ids, offsets, spans, status


def row_turns(spec: DatasetSpec, data_cfg: DataConfig):
    """`turns(row, index)`: a chat or prompt_completion row checked, as a conversation (a list of turns), or
    as (prompt, completion) where prompt_completion rows are not rendered as chats (data.chat: false)."""

    def turns(row: dict, index: int):
        where = _where(spec, index)
        if spec.format == "messages":
            return _check_messages(row[spec.messages_field], where, spec.messages_field)
        prompt, completion = row[spec.prompt_field], row[spec.completion_field]
        for field, value in ((spec.prompt_field, prompt), (spec.completion_field, completion)):
            if not isinstance(value, str):
                raise LLMDistillError(f"{where}: {field} is missing or not a string")
        if not completion.strip():
            raise LLMDistillError(f"{where}: {spec.completion_field} is empty")
        if data_cfg.chat:
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return prompt, completion

    return turns


def row_encoder(spec: DatasetSpec, data_cfg: DataConfig, tokenizer, seq_len: int):
    """`encode(row, index) -> (ids, mask, status)` for chat and prompt_completion rows: `mask[i]` is 1 where
    token i is trained; `status` says whether the row was kept whole, truncated or dropped."""
    template = None
    if spec.format == "messages" or data_cfg.chat:
        template = chat_template(data_cfg, tokenizer)
    if not tokenizer.is_fast:
        raise LLMDistillError(
            f"{spec.format} data needs a fast tokenizer (its character offsets locate the answers)"
        )
    eos = tokenizer.eos_token_id
    turns_of = row_turns(spec, data_cfg)

    def encode(row: dict, index: int):
        turns = turns_of(row, index)
        if isinstance(turns, list):
            _, ids, offsets, spans, status = encode_conversation(
                turns, tokenizer, template, data_cfg, seq_len, _where(spec, index)
            )
            return ids, _span_mask(offsets, spans), status
        prompt, completion = turns
        # Tokenized together, as the model reads them (apart, a SentencePiece tokenizer would start the
        # completion with a word-start space the text does not have); the tokens reaching into the completion
        # are trained, then EOS, which teaches the model to stop. Data text is only text, as in documents.
        enc = tokenizer(
            prompt + completion,
            add_special_tokens=True,
            split_special_tokens=True,
            return_offsets_mapping=True,
        )
        ids, mask = enc["input_ids"], [int(b > len(prompt)) for _, b in enc["offset_mapping"]]
        if eos is not None and ids[-1:] == [eos]:  # a tokenizer that ends every text with EOS
            mask[-1] = 1
        elif eos is not None:
            ids, mask = [*ids, eos], [*mask, 1]
        if len(ids) > seq_len:
            return [], [], DROPPED
        return ids, mask, KEPT

    return encode


# ---------------------------------------------------------------------------------------------- packing


def document_sequences(docs: Iterable[list[int]], seq_len: int) -> Iterator[dict[str, list[int]]]:
    """Documents concatenated and cut every `seq_len` tokens; a partial tail is dropped."""
    stream: list[int] = []
    doc_of: list[int] = []
    for i, ids in enumerate(docs):
        stream.extend(ids)
        doc_of.extend([i] * len(ids))
        while len(stream) > seq_len:
            # seq_len inputs and one more token, the last input's target
            targets = [stream[t + 1] if doc_of[t + 1] == doc_of[t] else IGNORE_INDEX for t in range(seq_len)]
            pos, p = [], 0
            for t in range(seq_len):
                p = 0 if t == 0 or doc_of[t] != doc_of[t - 1] else p + 1
                pos.append(p)
            yield {"input_ids": stream[:seq_len], "position_ids": pos, "targets": targets}
            del stream[:seq_len], doc_of[:seq_len]


def sample_sequences(
    samples: Iterable[tuple[list[int], list[int]]], seq_len: int, pad_id: int, pack: bool
) -> Iterator[dict[str, list[int]]]:
    """Whole (ids, mask) samples, each at most seq_len tokens, in sequences of seq_len: packed greedily in
    order (pack) or one per sequence, padded at the end.

    Positions restart at 0 for each sample, so attention stays inside it. Padding continues the positions of
    the sample before it: causal attention already keeps every real token from seeing the padding after it,
    and padding targets are IGNORE_INDEX, so no attention mask is needed.
    """
    ids: list[int] = []
    pos: list[int] = []
    targets: list[int] = []

    def full_sequence():
        pad = seq_len - len(ids)
        last = pos[-1] + 1 if pos else 0
        return {
            "input_ids": ids + [pad_id] * pad,
            "position_ids": pos + list(range(last, last + pad)),
            "targets": targets + [IGNORE_INDEX] * pad,
        }

    for sample_ids, mask in samples:
        if ids and (not pack or len(ids) + len(sample_ids) > seq_len):
            yield full_sequence()
            ids, pos, targets = [], [], []
        ids = ids + sample_ids
        pos = pos + list(range(len(sample_ids)))
        targets = (
            targets
            + [sample_ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(sample_ids) - 1)]
            + [IGNORE_INDEX]
        )
    if ids:
        yield full_sequence()


def _columns(sequences: Iterable[dict]) -> dict[str, list[list[int]]]:
    out = {"input_ids": [], "position_ids": [], "targets": []}
    for s in sequences:
        for k in out:
            out[k].append(s[k])
    return out


def pack_documents(docs: list[list[int]], seq_len: int) -> dict[str, list[list[int]]]:
    """Concatenate token lists and cut into sequences of `seq_len`; a partial tail is dropped."""
    return _columns(document_sequences(docs, seq_len))


def _document_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    # Data text is only text: a literal "<|endoftext|>" or "<s>" in it is spelled out, not read as a special.
    encoded = tokenizer(texts, add_special_tokens=True, split_special_tokens=True)["input_ids"]
    return [ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids for ids in encoded]


def cached_map(rows, function, **kwargs):
    """`rows.map(function, **kwargs)`, cached by `datasets` under a key that also holds DATA_CODE."""
    from datasets.fingerprint import Hasher

    key = Hasher.hash([rows._fingerprint, function, kwargs, DATA_CODE])
    return rows.map(function, new_fingerprint=key, **kwargs)


def packed_in_one_pass(sequences, rows, **params):
    """`datasets.Dataset.from_generator(sequences, rows, **params)`, cached under the key of `rows`, the
    params and DATA_CODE: sequences packed across the whole source in one pass, as a stream of it is packed
    (a batched map would start afresh every batch of rows)."""
    import datasets
    from datasets.fingerprint import Hasher

    column = datasets.List(datasets.Value("int64"))
    features = datasets.Features({k: column for k in ("input_ids", "position_ids", "targets")})
    if next(sequences(rows, **params), None) is None:  # datasets cannot generate an empty split
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    return datasets.Dataset.from_generator(
        sequences,
        features=features,
        gen_kwargs={"rows": rows, **params},
        fingerprint=Hasher.hash([rows._fingerprint, sequences, params, DATA_CODE]),
    )


def _document_sequences_of(rows, seq_len: int) -> Iterator[dict[str, list[int]]]:
    yield from document_sequences((row["ids"] for row in rows), seq_len)


def _sample_sequences_of(rows, seq_len: int, pad_id: int, pack: bool) -> Iterator[dict[str, list[int]]]:
    samples = ((row["ids"], row["mask"]) for row in rows if row["status"] != DROPPED)
    yield from sample_sequences(samples, seq_len, pad_id, pack)


def tokenize_and_pack(texts, tokenizer, seq_len: int, name: str):
    """Tokenized, packed dataset (cached by `datasets`), in torch format."""
    tokenized = cached_map(
        texts,
        lambda b: {"ids": _document_ids(tokenizer, b["text"])},
        batched=True,
        remove_columns=texts.column_names,
    )
    packed = packed_in_one_pass(_document_sequences_of, tokenized, seq_len=seq_len)
    if len(packed) == 0:
        raise LLMDistillError(f"dataset {name} has fewer than {seq_len + 1} tokens: nothing to train on")
    packed.set_format("torch")
    return packed


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad if pad is not None else 0


def _text_samples(tokenizer, texts: list[str], seq_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """Text documents as whole samples for unpacked sequences: cut into pieces of at most seq_len tokens."""
    for ids in _document_ids(tokenizer, texts):
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len]
            if len(piece) > 1:
                yield piece, [1] * len(piece)


def log_counts(name: str, statuses: list[int], data_cfg: DataConfig) -> None:
    dropped, truncated = statuses.count(DROPPED), statuses.count(TRUNCATED)
    if dropped or truncated:
        log.warning(
            f"{name}: {dropped + truncated} of {len(statuses)} samples are longer than data.seq_len="
            f"{data_cfg.seq_len}: {dropped} dropped, {truncated} cut after their last assistant turn that "
            f"fits (data.truncation={data_cfg.truncation})"
        )


def packed_dataset(spec: DatasetSpec, data_cfg: DataConfig, tokenizer, pack_text=None):
    """One source as a `datasets.Dataset` of sequences (input_ids, position_ids, targets), in torch format.

    `pack_text(texts, name)` replaces the packing of text sources (the cross-tokenizer objectives' aligned
    dataset)."""
    seq_len, name = data_cfg.seq_len, spec.path
    rows = load_rows(spec)
    if spec.format == "text":
        texts = rows.rename_column(spec.text_field, "text") if spec.text_field != "text" else rows
        if pack_text is not None:
            return pack_text(texts, name)
        if data_cfg.pack:
            return tokenize_and_pack(texts, tokenizer, seq_len, name)
        pad = _pad_id(tokenizer)
        packed = cached_map(
            texts,
            lambda b: _columns(
                sample_sequences(_text_samples(tokenizer, b["text"], seq_len), seq_len, pad, False)
            ),
            batched=True,
            remove_columns=texts.column_names,
        )
    else:
        if pack_text is not None:
            # Cross-tokenizer objectives take the conversations: each side renders them with its own template.
            if spec.format == "prompt_completion" and not data_cfg.chat:
                raise LLMDistillError(
                    f"dataset {name}: prompt_completion rows with a cross-tokenizer objective need "
                    "data.chat: true (each side renders them with its chat template)"
                )
            turns_of = row_turns(spec, data_cfg)
            conversations = cached_map(
                rows,
                lambda b, idx: {
                    "messages": [turns_of({k: v[j] for k, v in b.items()}, i) for j, i in enumerate(idx)]
                },
                batched=True,
                with_indices=True,
                remove_columns=rows.column_names,
            )
            return pack_text(conversations, name)
        encode = row_encoder(spec, data_cfg, tokenizer, seq_len)

        def encode_batch(batch, indices):
            out = {"ids": [], "mask": [], "status": []}
            for j, index in enumerate(indices):
                ids, mask, status = encode({k: v[j] for k, v in batch.items()}, index)
                out["ids"].append(ids)
                out["mask"].append(mask)
                out["status"].append(status)
            return out

        encoded = cached_map(
            rows, encode_batch, batched=True, with_indices=True, remove_columns=rows.column_names
        )
        log_counts(name, encoded["status"], data_cfg)
        pad = _pad_id(tokenizer)
        packed = packed_in_one_pass(
            _sample_sequences_of, encoded, seq_len=seq_len, pad_id=pad, pack=data_cfg.pack
        )
    if len(packed) == 0:
        raise LLMDistillError(
            f"dataset {name}: no sample fits in data.seq_len={seq_len}: nothing to train on"
        )
    packed.set_format("torch")
    return packed


# ---------------------------------------------------------------------------------------------- blends
#
# A blend interleaves its sources' sequences by weight in one fixed order: the k-th sequence of source s
# comes at "time" (k + 0.5) / w_s, and the blend takes them in order of time (ties: the earlier source). So
# every prefix of the blend holds each source in proportion to its weight, and position i is a function of
# the weights alone, for map-style sets and streams alike.


def blend_schedule(weights: list[float]) -> Iterator[tuple[int, int]]:
    """(source, k) for the blend's sequences in order, endlessly: the k-th sequence of that source."""
    total = sum(weights)
    shares = [w / total for w in weights]
    heap = [((0.5) / w, s, 0) for s, w in enumerate(shares)]
    heapq.heapify(heap)
    while True:
        _, s, k = heapq.heappop(heap)
        yield s, k
        heapq.heappush(heap, ((k + 1.5) / shares[s], s, k + 1))


def blend(sources: list, weights: list[float], seed: int):
    """Map-style sources blended into one `datasets.Dataset` as long as all of them together.

    A source with fewer sequences than its share repeats them, one with more contributes a subset; which ones,
    and in which order, is a permutation drawn from the seed.
    """
    import datasets

    length = sum(len(s) for s in sources)
    offsets = [0]
    for s in sources[:-1]:
        offsets.append(offsets[-1] + len(s))
    perms = [
        torch.randperm(len(s), generator=torch.Generator().manual_seed(seed * 1_000_003 + i)).tolist()
        for i, s in enumerate(sources)
    ]
    indices = [
        offsets[s] + perms[s][k % len(sources[s])]
        for s, k in itertools.islice(blend_schedule(weights), length)
    ]
    for s in sources:
        s.reset_format()
    out = datasets.concatenate_datasets(sources).select(indices)
    out.set_format("torch")
    return out


# ---------------------------------------------------------------------------------------------- streams


class PackedStream:
    """Packed sequences of streamed sources in one fixed order, repeated endlessly: the k-th sequence is the
    same on every run and every rank, so the position in the data stays one integer (see `micro_batches`)."""

    def __init__(self, sequences, name: str):
        self._sequences = sequences  # () -> an endless iterator of sequences as dicts of tensors
        self.name = name

    def __iter__(self):
        return self._sequences()

    def head(self, n: int) -> list[dict[str, torch.Tensor]]:
        """The first n sequences, held in memory (a streamed validation set)."""
        return list(itertools.islice(iter(self), n))


def _stream_epoch(rows, spec: DatasetSpec, data_cfg: DataConfig, tokenizer) -> Iterator[dict]:
    """One pass over a streamed source: rows encoded and packed as they arrive, exactly as `packed_dataset`
    does in memory."""
    seq_len = data_cfg.seq_len
    pad = _pad_id(tokenizer)
    counts = []

    def rows_checked():
        for i, row in enumerate(rows):
            for field in _row_fields(spec):
                if field not in row:
                    raise LLMDistillError(f"{_where(spec, i)}: no field {field!r} (fields: {list(row)})")
            if spec.format == "text" and not isinstance(row[spec.text_field], str):
                raise LLMDistillError(f"{_where(spec, i)}: {spec.text_field} is missing or not a string")
            yield i, row

    if spec.format == "text":
        docs = (_document_ids(tokenizer, [row[spec.text_field]])[0] for _, row in rows_checked())
        if data_cfg.pack:
            sequences = document_sequences(docs, seq_len)
        else:
            samples = (
                sample
                for _, row in rows_checked()
                for sample in _text_samples(tokenizer, [row[spec.text_field]], seq_len)
            )
            sequences = sample_sequences(samples, seq_len, pad, False)
    else:
        encode = row_encoder(spec, data_cfg, tokenizer, seq_len)

        def samples():
            for i, row in rows_checked():
                ids, mask, status = encode(row, i)
                counts.append(status)
                if status != DROPPED:
                    yield ids, mask

        sequences = sample_sequences(samples(), seq_len, pad, data_cfg.pack)
    for s in sequences:
        yield {k: torch.tensor(v) for k, v in s.items()}
    log_counts(f"{spec.path} (one pass of the stream)", counts, data_cfg)


def _row_fields(spec: DatasetSpec) -> list[str]:
    return {"text": [spec.text_field], "messages": [spec.messages_field]}.get(
        spec.format, [spec.prompt_field, spec.completion_field]
    )


def streamed_dataset(spec: DatasetSpec, data_cfg: DataConfig, tokenizer) -> PackedStream:
    rows = load_rows(spec)
    if spec.format != "text" or data_cfg.chat:
        row_encoder(spec, data_cfg, tokenizer, data_cfg.seq_len)  # a missing template fails now, not mid-run

    def sequences():
        while True:
            produced = 0
            for s in _stream_epoch(rows, spec, data_cfg, tokenizer):
                produced += 1
                yield s
            if produced == 0:
                raise LLMDistillError(
                    f"dataset {spec.path}: a whole pass gave no sequence of {data_cfg.seq_len} tokens"
                )

    return PackedStream(sequences, spec.path)


def _blend_streams(streams: list[PackedStream], weights: list[float]) -> PackedStream:
    def sequences():
        iterators = [iter(s) for s in streams]
        for s, _ in blend_schedule(weights):
            yield next(iterators[s])

    return PackedStream(sequences, " + ".join(s.name for s in streams))


def build_dataset(
    specs: DatasetSpec | list[DatasetSpec], data_cfg: DataConfig, tokenizer, seed: int, pack_text=None
):
    """One spec or a weighted blend of several, as packed sequences: a `datasets.Dataset`, or a `PackedStream`
    when the sources stream. Bad rows raise LLMDistillError here, before the trainer needs them."""
    specs = specs if isinstance(specs, list) else [specs]
    streaming = {s.streaming for s in specs}
    if len(streaming) > 1:
        raise LLMDistillError(
            "a blend mixes streaming and non-streaming datasets: give all the same streaming"
        )
    if streaming.pop():
        if pack_text is not None:
            raise LLMDistillError("streaming datasets with a cross-tokenizer objective are not supported")
        streams = [streamed_dataset(s, data_cfg, tokenizer) for s in specs]
        return streams[0] if len(streams) == 1 else _blend_streams(streams, [s.weight for s in specs])
    if pack_text is not None and len(specs) > 1:
        # each source pads its teacher columns to its own longest window: rows of two would not stack
        raise LLMDistillError("a blend of datasets with a cross-tokenizer objective is not supported")
    sources = [packed_dataset(s, data_cfg, tokenizer, pack_text) for s in specs]
    return sources[0] if len(sources) == 1 else blend(sources, [s.weight for s in specs], seed)


def bytes_of_targets(tokenizer, targets: torch.Tensor) -> int:
    """UTF-8 bytes of the text the valid targets spell: the denominator of bits-per-byte, whatever the
    tokenizer. A special token (EOS, `<|im_end|>`) is no text: it counts no bytes, not its spelling's."""
    total = 0
    for row in targets.tolist():
        run: list[int] = []
        for t in [*row, IGNORE_INDEX]:
            if t != IGNORE_INDEX:
                run.append(t)
            elif run:
                total += len(tokenizer.decode(run, skip_special_tokens=True).encode("utf-8"))
                run = []
    return total


# ---------------------------------------------------------------------------------------------- sampling


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g)


def micro_batches_per_epoch(num_samples: int, micro_batch: int, world_size: int) -> int:
    """Each rank's micro-batches in one pass over `num_samples` sequences (at least one, or an error)."""
    per_epoch = num_samples // (micro_batch * world_size)
    if per_epoch == 0:
        raise LLMDistillError(
            f"data.train: {num_samples} sequences, fewer than one global batch "
            f"(train.micro_batch_size={micro_batch} x {world_size} ranks)"
        )
    return per_epoch


def micro_batch_indices(
    num_samples: int, micro_batch: int, world_size: int, rank: int, seed: int, start: int = 0
) -> Iterator[list[int]]:
    """Index lists for this rank's micro-batches, endlessly, starting after `start` consumed micro-batches.

    The position in the data is one integer (micro-batches consumed per rank), so a checkpoint can store it
    and a resumed run continues with exactly the next batch, without replaying the ones before it.
    """
    per_epoch = micro_batches_per_epoch(num_samples, micro_batch, world_size)
    position, order, order_epoch = start, None, None
    while True:
        epoch, step = divmod(position, per_epoch)
        if epoch != order_epoch:  # drawn once per epoch: a permutation of 10M sequences takes ~0.25 s
            order, order_epoch = epoch_order(num_samples, seed, epoch), epoch
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
    """This rank's micro-batches, endlessly, after `start` consumed ones.

    A map-style dataset goes through a DataLoader over `micro_batch_indices` (the loader's own order is never
    shuffled). A `PackedStream` is read in its fixed order: micro-batch p of rank r is sequences
    [(p * world_size + r) * micro_batch, ... + micro_batch); resuming at `start` reads and packs the
    sequences before it again (every rank reads the whole stream).
    """
    from torch.utils.data import DataLoader

    if isinstance(dataset, PackedStream):
        return _stream_micro_batches(dataset, micro_batch, world_size, rank, start)
    sampler = micro_batch_indices(len(dataset), micro_batch, world_size, rank, seed, start)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)


def _stream_micro_batches(stream: PackedStream, micro_batch: int, world_size: int, rank: int, start: int):
    sequences = itertools.islice(iter(stream), start * world_size * micro_batch, None)
    while True:
        step = list(itertools.islice(sequences, world_size * micro_batch))
        yield collate(step[rank * micro_batch : (rank + 1) * micro_batch])
