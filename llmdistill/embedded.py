"""The embedded default: where the shipped tiny teacher lies, its recipe fingerprint, and the student
tokenizers built on demand from the embedded corpus.

The teacher (stdlib corpus → byte-level BPE tokenizer → tiny Llama, trained by our own trainer) ships in the
package (llmdistill/embedded/teacher/) with build_info.json, whose fingerprint ties it to its recipe
(configs/tiny/teacher.yaml) and to the corpus it was trained on. The chat teacher
(llmdistill/embedded/chat_teacher/, `embedded:chat`) is that teacher fine-tuned on the embedded chat set with
the embedded chat template (configs/tiny/chat_teacher.yaml), fingerprinted the same way. Building them runs
the trainer, so that lives in the tools layer: llmdistill/tools/build_teacher.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import yaml
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from llmdistill import cache_dir, data
from llmdistill.config import apply_overrides

EMBEDDED_TEACHER = Path(__file__).parent / "embedded" / "teacher"
# The instruction-tuned teacher (configs/tiny/chat_teacher.yaml: the teacher above after SFT on the embedded
# chat set) and the chat template it was trained with, which its tokenizer carries.
EMBEDDED_CHAT_TEACHER = Path(__file__).parent / "embedded" / "chat_teacher"
EMBEDDED_CHAT_TEMPLATE = Path(__file__).parent / "embedded" / "chat_template.jinja"
# Model paths that configs may give as teacher.path / student.path.
EMBEDDED_MODELS = {"embedded": EMBEDDED_TEACHER, "embedded:chat": EMBEDDED_CHAT_TEACHER}


def recipe_fingerprint(config_path: str | Path, overrides: list[str] = (), inputs: dict | None = None) -> str:
    """What determines the teacher: the recipe as written (less where its files go), the corpus content, and
    any other `inputs` it was made from (the chat teacher: the base teacher's fingerprint, the template).

    Hashing the recipe's own keys, not the full resolved config, keeps the fingerprint stable when new config
    fields with defaults are added to the schema.
    """
    raw = apply_overrides(yaml.safe_load(Path(config_path).read_text()), list(overrides))
    raw.get("run", {}).pop("output_dir", None)
    raw.get("student", {}).pop("tokenizer", None)
    corpus = json.loads(data.embedded_corpus()["manifest"].read_text())["content_sha256"]
    blob = {"recipe": raw, "corpus": corpus} | ({"inputs": inputs} if inputs else {})
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def chat_teacher_inputs() -> dict:
    """What the chat teacher is made from besides its recipe: the base teacher it starts from, the chat
    template, and the instruction set's builder version."""
    base = json.loads((EMBEDDED_TEACHER / "build_info.json").read_text())["fingerprint"]
    template = hashlib.sha256(EMBEDDED_CHAT_TEMPLATE.read_bytes()).hexdigest()
    return {"base_teacher": base, "chat_template": template, "chat_set_version": data.CHAT_SET_VERSION}


# ---------------------------------------------------------------------------------------- student tokenizers
# Tokenizers that differ from the teacher's, for cross-tokenizer distillation (configs/tiny/alm*.yaml).
# Each is built once from the embedded corpus and cached under cache_dir(); configs name them as
# `student.tokenizer: embedded:<name>`.

STUDENT_TOKENIZERS = {"sp-unigram": 1024, "bytes": None}  # name -> vocabulary size of the trained model
STUDENT_TOKENIZER_BUILD = 2  # 2: SentencePiece control and byte pieces no longer match text


def student_tokenizer(name: str) -> Path:
    """The directory of embedded student tokenizer `name`, building it on first use (one process builds while
    the others wait on a lock)."""
    if name not in STUDENT_TOKENIZERS:
        raise ValueError(f"unknown embedded tokenizer {name!r}; known: {sorted(STUDENT_TOKENIZERS)}")
    corpus = json.loads(data.embedded_corpus()["manifest"].read_text())["content_sha256"][:12]
    # The build's version is in the name, so a changed build is not read from an older cache.
    out = cache_dir() / f"tokenizer-{name}-v{STUDENT_TOKENIZER_BUILD}-{corpus}"
    if (out / "tokenizer.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".tokenizer-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "tokenizer.json").exists():
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            if name == "sp-unigram":
                tok = train_unigram_tokenizer(STUDENT_TOKENIZERS[name])
            else:
                tok = byte_tokenizer()
            tok.save_pretrained(tmp)
            tmp.replace(out)
    return out


def train_unigram_tokenizer(vocab_size: int, max_lines: int = 300_000):
    """A SentencePiece unigram model trained with the `sentencepiece` package on the embedded train split,
    wrapped as an HF tokenizer that tokenizes as SentencePiece does: `▁` for spaces, no dummy prefix, no text
    normalisation, byte fallback (`<0xNN>`) for anything outside its pieces, e.g. newlines and rare UTF-8."""
    import sentencepiece as spm  # lazy: only this tokenizer needs sentencepiece

    corpus = data.embedded_corpus()

    def lines():
        n = 0
        for row in corpus["train"].open():
            for line in json.loads(row)["text"].splitlines():
                if line.strip():
                    yield line
                    n += 1
                    if n >= max_lines:
                        return

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        byte_fallback=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tok = Tokenizer(tokenizer_models.Unigram(unigram_pieces(sp), unk_id=0, byte_fallback=True))
    # SentencePiece's whitespace handling: spaces become ▁ and start pieces; no prefix space is invented.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def unigram_pieces(sp) -> list[tuple[str, float]]:
    """(piece, score) of every id of SentencePiece model `sp`, scored so that text never matches a piece that
    stands for no text of its own.

    SentencePiece keeps its control pieces (`<s>`, `</s>`, `<pad>`), `<unk>` and byte pieces (`<0x41>`) out
    of its matcher, and scores them 0. The `tokenizers` Unigram model matches every piece of its vocabulary
    against the text, where 0 is the best score there is: a literal `<s>` in the text became the BOS id and
    `<0x41>` became "A", whatever `split_special_tokens` said (that flag only stops the added-token pass,
    which runs before the model). Here those pieces score so low that any spelling of the same text from
    ordinary pieces wins; that needs each of their characters to be an ordinary piece, which is checked.

    Unknown characters still become `<unk>` and then bytes, as in SentencePiece. Their score (the lowest
    score minus 10) moves with this one, but every segmentation pays it equally (no piece holds an unknown
    character), so the same pieces are picked.
    """
    size = sp.get_piece_size()
    special = (sp.is_control, sp.is_unknown, sp.is_byte, sp.is_unused)
    ordinary = {i for i in range(size) if not any(is_kind(i) for is_kind in special)}
    lowest = min(sp.get_score(i) for i in ordinary)
    longest = max(len(sp.id_to_piece(i)) for i in range(size))
    never = (longest + 1) * min(lowest, -1.0) - 1000.0  # below any spelling from ordinary pieces
    chars = {sp.id_to_piece(i) for i in ordinary if len(sp.id_to_piece(i)) == 1}
    pieces = []
    for i in range(size):
        piece = sp.id_to_piece(i)
        if i in ordinary:
            pieces.append((piece, sp.get_score(i)))
            continue
        if missing := set(piece) - chars:
            raise RuntimeError(f"SentencePiece piece {piece!r}: characters {sorted(missing)} are not pieces")
        pieces.append((piece, never))
    return pieces


def byte_tokenizer():
    """One token per byte (the GPT-2 byte alphabet, no merges) plus end-of-text and padding: 258 tokens."""

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1} | {c: i + 2 for i, c in enumerate(alphabet)}
    tok = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
