"""The embedded default: stdlib corpus → byte-level BPE tokenizer → tiny Llama teacher, trained by our own
trainer.

The built teacher ships in the package (llmdistill/embedded/teacher/) with build_info.json, whose fingerprint
ties
it to its recipe (configs/tiny/teacher.yaml) and to the corpus it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

import yaml

from llmdistill import data
from llmdistill.config import apply_overrides, load_config
from llmdistill.models import EMBEDDED_TEACHER


def recipe_fingerprint(config_path: str | Path, overrides: list[str] = ()) -> str:
    """What determines the teacher: the recipe as written (less where its files go) and the corpus content.

    Hashing the recipe's own keys, not the full resolved config, keeps the fingerprint stable when new config
    fields with defaults are added to the schema.
    """
    raw = apply_overrides(yaml.safe_load(Path(config_path).read_text()), list(overrides))
    raw.get("run", {}).pop("output_dir", None)
    raw.get("student", {}).pop("tokenizer", None)
    corpus = json.loads(data.embedded_corpus()["manifest"].read_text())["content_sha256"]
    blob = json.dumps({"recipe": raw, "corpus": corpus}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_tokenizer(vocab_size: int, out_dir: Path):
    if (out_dir / "tokenizer.json").exists():  # a resumed build must keep the tokenizer its checkpoints used
        from llmdistill.models import load_tokenizer

        return load_tokenizer(str(out_dir))
    corpus = data.embedded_corpus()
    texts = (json.loads(line)["text"] for line in corpus["train"].open())
    tok = data.train_bpe_tokenizer(texts, vocab_size)
    tok.save_pretrained(out_dir)
    return tok


def build_teacher(config_path: str, overrides: list[str] = ()) -> Path:
    from llmdistill.train import train

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


# ---------------------------------------------------------------------------------------- student tokenizers
# Tokenizers that differ from the teacher's, for cross-tokenizer distillation (configs/tiny/alm*.yaml).
# Each is built once from the embedded corpus and cached under data.cache_dir(); configs name them as
# `student.tokenizer: embedded:<name>`.

STUDENT_TOKENIZERS = {"sp-unigram": 1024, "bytes": None}  # name -> vocabulary size of the trained model


def student_tokenizer(name: str) -> Path:
    """The directory of embedded student tokenizer `name`, building it on first use (one process builds while
    the others wait on a lock)."""
    import fcntl

    if name not in STUDENT_TOKENIZERS:
        raise ValueError(f"unknown embedded tokenizer {name!r}; known: {sorted(STUDENT_TOKENIZERS)}")
    corpus = json.loads(data.embedded_corpus()["manifest"].read_text())["content_sha256"][:12]
    out = data.cache_dir() / f"tokenizer-{name}-{corpus}"
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
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

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

    import io

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
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    # SentencePiece's whitespace handling: spaces become ▁ and start pieces; no prefix space is invented.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def byte_tokenizer():
    """One token per byte (the GPT-2 byte alphabet, no merges) plus end-of-text and padding: 258 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1} | {c: i + 2 for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
