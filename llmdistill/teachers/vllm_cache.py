"""The teacher's top-k signal computed once by vLLM's offline engine (teachers/vllm_cache_build.py) and read
back from disk while training.

Layout of `teacher.cache.dir`:
  manifest.json        teacher, tokenizer hash, K, encoding, dataset spec and fingerprint, shard list (written
                       first, and compared before a build resumes or a run reads the cache)
  shard_00000.safetensors ...   rows [i * shard_rows, (i + 1) * shard_rows) of the packed training set, and
      of each row only its kept positions: those whose (scored) target is not -100, i.e. what a loss reads
      (with chat data, the answers; never system/user text or template tokens). The m kept positions of the
      shard's n rows, row after row, left to right:
      ids        [m, K] uint16 (vocab <= 65536) or [m, K, 3] uint8 (24-bit little-endian ids)
      logprobs   [m, K] uint16 fixed point: log-prob = -q / 2048 (0 .. -32 nats)
      target_logprobs  [m] float32, cross-tokenizer caches only: the actual next token's log-prob (NaN:
                 none), which alm needs and the top-k may not hold
      row_offsets  [n + 1] int64: row r's kept positions are entries [row_offsets[r], row_offsets[r + 1])
      row_hash   [n, 16] uint8: blake2b of the row's input_ids, position_ids, targets (and teacher_input_ids)
  COMPLETE             written last: a cache without it is a partial build, never read

Which positions a row keeps is not stored: it is a function of the row (its targets), which the reader has
and checks against the row hash. The reader fills the other positions with the filler every top-k source
uses there (id 0, log-prob LOGP_FILLER, target log-prob NaN), which no loss reads.

A cross-tokenizer objective (alm, uld with another tokenizer) caches the teacher's own tokenization of each
window: T is then the teacher's padded length, as the in-process teacher's signal is shaped, and a kept
position is one that predicts the next teacher token of the same document.

Why this encoding: at K = 32 and a vocabulary <= 65536 it is 2 + 2 bytes per entry = 128 bytes per kept
token, vs 2 * V bytes for fp16 logits. The fixed-point step (1/2048 nat, 2.4e-4 relative on each probability)
is finer than fp16 below log-prob -0.5 and uniform over the range. Log-probs are rounded DOWN (towards less
probable), so the decoded top-k never sums above the true mass: the tail mass 1 - sum(exp(top-k)) is kept,
never negative, and at most 2.4e-4 above the true tail.

Rows are found by their content hash, not their index: the reader serves whatever order the trainer's sampler
picks (any seed, any resume point), and a batch that is not in the cache is an error, never a silent mismatch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig

from llmdistill import models
from llmdistill.config import Config, LLMDistillError
from llmdistill.signal import IGNORE_INDEX, TeacherSignal
from llmdistill.teachers.base import Capabilities, TeacherSource, register_source
from llmdistill.teachers.prompts import LOGP_FILLER, scored_tokens

# /3: only kept (valid-target) positions are stored, with row_offsets; /2 stored every position.
FORMAT = "llmdistill-teacher-cache/3"
LOGPROB_SCALE = 2048.0  # fixed-point steps per nat
COMPLETE = "COMPLETE"
# The columns that identify a packed row (teacher_input_ids only in cross-tokenizer datasets).
ROW_KEYS = ("input_ids", "position_ids", "targets", "teacher_input_ids")


# ---------------------------------------------------------------------------------------------- encoding


def id_bytes_for(vocab_size: int) -> int:
    return 2 if vocab_size <= 1 << 16 else 3


def encode_ids(ids: np.ndarray, id_bytes: int) -> np.ndarray:
    ids = ids.astype(np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 1 << (8 * id_bytes):
        raise LLMDistillError(f"token id out of range for a {id_bytes}-byte cache encoding")
    if id_bytes == 2:
        return ids.astype(np.uint16)
    return np.stack([(ids >> s) & 0xFF for s in (0, 8, 16)], axis=-1).astype(np.uint8)


def decode_ids(stored: np.ndarray) -> np.ndarray:
    if stored.dtype == np.uint16:
        return stored.astype(np.int32)
    b = stored.astype(np.int32)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)


def encode_logprobs(logprobs: np.ndarray) -> np.ndarray:
    # ceil(-lp * scale): rounding the log-prob down keeps the decoded top-k mass <= the true mass.
    q = np.ceil(-np.asarray(logprobs, dtype=np.float64) * LOGPROB_SCALE - 1e-9)
    return np.clip(q, 0, 65535).astype(np.uint16)


def decode_logprobs(stored: np.ndarray) -> np.ndarray:
    return -(stored.astype(np.float32) / np.float32(LOGPROB_SCALE))


def bytes_per_token(k: int, vocab_size: int, cross_tokenizer: bool = False) -> int:
    return k * (id_bytes_for(vocab_size) + 2) + (4 if cross_tokenizer else 0)


def kept_positions(batch: dict) -> torch.Tensor:
    """[B, T] bool: the positions a cache stores, those whose scored target is valid (what losses read)."""
    return scored_tokens(batch)[2] != IGNORE_INDEX


def row_hashes(rows: dict) -> np.ndarray:
    """[B, 16] uint8: a row's identity, the same whether it comes from the dataset or a trainer batch."""
    columns = [np.asarray(rows[key], dtype=np.int32) for key in ROW_KEYS if key in rows]
    out = []
    for parts in zip(*columns, strict=True):
        h = hashlib.blake2b(digest_size=16)
        for p in parts:
            h.update(np.ascontiguousarray(p).tobytes())
        out.append(np.frombuffer(h.digest(), dtype=np.uint8))
    return np.stack(out)


# ---------------------------------------------------------------------------------------------- manifest


def tokenizer_sha256(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def teacher_fingerprint(path: str) -> str:
    """config.json in full, and each weight file's name, size, first and last MiB: cheap for a 100 GB teacher,
    yet a different checkpoint of the same architecture changes it."""
    root = Path(path)
    h = hashlib.sha256(
        (root / "config.json").read_bytes() if (root / "config.json").exists() else path.encode()
    )
    for f in sorted(list(root.glob("*.safetensors")) + list(root.glob("*.bin"))):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def run_identity(cfg: Config, teacher_path: str, tokenizer, vocab_size: int) -> dict:
    """The manifest fields that tie a cache to a run's teacher, tokenizer and sequence length."""
    return {
        "format": FORMAT,
        "teacher": {
            "path": str(cfg.teacher.path),
            "fingerprint": teacher_fingerprint(teacher_path),
            "dtype": cfg.teacher.dtype,
        },
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_size": vocab_size,
        "seq_len": cfg.data.seq_len,
    }


def manifest_differences(found: dict, wanted: dict, reading: bool) -> list[str]:
    """Fields where a cache differs from what the run needs. A reader may use a cache with more K than it asks
    for (top-k is sorted, so its first k are the top-k); a resumed build must match exactly."""
    diffs = []
    keys = ("format", "teacher", "tokenizer_sha256", "vocab_size", "seq_len", "dataset", "shard_rows")
    for key in (*keys, "cross_tokenizer"):
        if found.get(key) != wanted.get(key):
            diffs.append(key)
    if reading and found.get("k", 0) < wanted["k"]:
        diffs.append(f"k (cache has {found.get('k')}, teacher.cache.top_k={wanted['k']})")
    if not reading and found.get("k") != wanted["k"]:
        diffs.append("k")
    return diffs


def _dataset_key(manifest: dict) -> dict:
    # The reader checks the spec and size; row contents are checked row by row when batches are looked up.
    return {"spec": manifest["dataset"]["spec"], "sequences": manifest["dataset"]["sequences"]}


# ---------------------------------------------------------------------------------------------- reading


@register_source("vllm_cache")
class VLLMCacheTeacher(TeacherSource):
    """Reads the cached top-k signal of each batch row, found by the row's content hash."""

    capabilities = Capabilities(top_k=True, cross_tokenizer=True)

    @classmethod
    def check_ready(cls, cfg, plan) -> None:
        root = Path(cfg.teacher.cache.dir)
        if not (root / "manifest.json").is_file():
            raise LLMDistillError(
                f"teacher.cache.dir={root}: no manifest.json (build it with `llmdistill cache-teacher`)"
            )

    def __init__(self, cfg: Config, tokenizer, vocab_size: int, teacher_path: str):
        self.check_ready(cfg, plan=None)
        self.root = Path(cfg.teacher.cache.dir)
        self.k = cfg.teacher.cache.top_k
        where = f"teacher.cache.dir={self.root}"
        manifest_path = self.root / "manifest.json"
        found = json.loads(manifest_path.read_text())
        if found.get("format") != FORMAT:
            raise LLMDistillError(
                f"{where} is a cache of format {found.get('format')!r}, this version reads {FORMAT!r} "
                "(rebuild it with launch/cache_teacher.py --overwrite)"
            )
        if not (self.root / COMPLETE).is_file():
            raise LLMDistillError(f"{where}: a partial cache build (run launch/cache_teacher.py again)")
        # The reader has no dataset to hash: it checks the data by spec and size here, and row by row later;
        # whether the rows are cross-tokenizer ones is checked per batch too.
        wanted = {
            **run_identity(cfg, teacher_path, tokenizer, vocab_size),
            "k": self.k,
            "dataset": {
                "spec": cfg.data.train.model_dump(mode="json"),
                "sequences": found["dataset"]["sequences"],
            },
            "shard_rows": found.get("shard_rows"),
            "cross_tokenizer": found.get("cross_tokenizer"),
        }
        found_cmp = dict(found, dataset=_dataset_key(found))
        diffs = manifest_differences(found_cmp, wanted, reading=True)
        if diffs:
            raise LLMDistillError(
                f"{where} was built for another run: {', '.join(diffs)} differ "
                "(rebuild it with launch/cache_teacher.py --overwrite)"
            )
        self.cross_tokenizer = bool(found.get("cross_tokenizer"))
        self.files = [safe_open(str(self.root / name), framework="numpy") for name in found["shards"]]
        self.where: dict[bytes, tuple[int, int]] = {}
        for s, f in enumerate(self.files):
            for r, h in enumerate(f.get_tensor("row_hash")):
                self.where.setdefault(h.tobytes(), (s, r))

    @classmethod
    def build(cls, cfg, model, needs, student):
        path = models.resolve_model_path(cfg.teacher.path, "teacher.path")
        tokenizer = models.load_tokenizer(path, cfg.teacher.trust_remote_code)
        vocab = AutoConfig.from_pretrained(path, trust_remote_code=cfg.teacher.trust_remote_code).vocab_size
        return cls(cfg, tokenizer, vocab, path)

    def signal(self, batch: dict) -> TeacherSignal:
        if ("teacher_input_ids" in batch) != self.cross_tokenizer:
            held = "the teacher's own tokenization" if self.cross_tokenizer else "the batches' tokens"
            raise LLMDistillError(
                f"teacher.cache.dir={self.root} holds {held}, but this run's objective is "
                f"{'not ' if self.cross_tokenizer else ''}cross-tokenizer "
                "(rebuild it with launch/cache_teacher.py --overwrite)"
            )
        keep = kept_positions(batch)
        b, t = keep.shape
        ids = torch.zeros(b, t, self.k, dtype=torch.int32)
        logprobs = torch.full((b, t, self.k), LOGP_FILLER, dtype=torch.float32)
        actual = torch.full((b, t), float("nan"), dtype=torch.float32)
        for row, h in enumerate(row_hashes(batch)):
            loc = self.where.get(h.tobytes())
            if loc is None:
                raise LLMDistillError(
                    f"a training batch row is not in the cache {self.root}: the data differ from what was "
                    "cached (rebuild it with launch/cache_teacher.py --overwrite)"
                )
            f, r = self.files[loc[0]], loc[1]
            first, end = (int(o) for o in f.get_slice("row_offsets")[r : r + 2])
            if end == first:
                continue  # nothing trained in this row
            ids[row, keep[row]] = torch.from_numpy(decode_ids(f.get_slice("ids")[first:end])[:, : self.k])
            logprobs[row, keep[row]] = torch.from_numpy(
                decode_logprobs(f.get_slice("logprobs")[first:end])[:, : self.k]
            )
            if self.cross_tokenizer:
                actual[row, keep[row]] = torch.from_numpy(f.get_slice("target_logprobs")[first:end])
        return TeacherSignal(
            topk_ids=ids,
            topk_logprobs=logprobs,
            target_logprobs=actual if self.cross_tokenizer else None,
            input_ids=batch["teacher_input_ids"] if self.cross_tokenizer else None,
        )

    def close(self) -> None:
        super().close()
        self.files = []
