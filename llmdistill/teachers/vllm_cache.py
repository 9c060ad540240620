"""The teacher's top-k signal computed once by vLLM's offline engine and read back from disk while training.

Layout of `teacher.cache_dir`:
  manifest.json        teacher, tokenizer hash, K, encoding, dataset spec and fingerprint, shard list (written
                       first, and compared before a build resumes or a run reads the cache)
  shard_00000.safetensors ...   rows [i * shard_rows, (i + 1) * shard_rows) of the packed training set:
      ids        [n, T, K] uint16 (vocab <= 65536) or [n, T, K, 3] uint8 (24-bit little-endian ids)
      logprobs   [n, T, K] uint16 fixed point: log-prob = -q / 2048 (0 .. -32 nats)
      row_hash   [n, 16] uint8: blake2b of the row's input_ids, position_ids and targets
  COMPLETE             written last: a cache without it is a partial build, never read

Why this encoding: at K = 32 and a vocabulary <= 65536 it is 2 + 2 bytes per entry = 128 bytes per token, vs
2 * V bytes for fp16 logits. The fixed-point step (1/2048 nat, 2.4e-4 relative on each probability) is finer
than fp16 below log-prob -0.5 and uniform over the range. Log-probs are rounded DOWN (towards less probable),
so the decoded top-k never sums above the true mass: the tail mass 1 - sum(exp(top-k)) is kept, never
negative, and at most 2.4e-4 above the true tail.

Rows are found by their content hash, not their index: the reader serves whatever order the trainer's sampler
picks (any seed, any resume point), and a batch that is not in the cache is an error, never a silent mismatch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal as signals
from pathlib import Path

import numpy as np
import torch

from llmdistill.config import Config, LLMDistillError
from llmdistill.data import to_device
from llmdistill.signal import TeacherSignal

log = logging.getLogger(__name__)

FORMAT = "llmdistill-teacher-cache/1"
LOGPROB_SCALE = 2048.0  # fixed-point steps per nat
COMPLETE = "COMPLETE"


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


def bytes_per_token(k: int, vocab_size: int) -> int:
    return k * (id_bytes_for(vocab_size) + 2)


def row_hashes(input_ids, position_ids, targets) -> np.ndarray:
    """[B, 16] uint8: a row's identity, the same whether it comes from the dataset or a trainer batch."""
    rows = []
    for parts in zip(
        *(np.asarray(x, dtype=np.int32) for x in (input_ids, position_ids, targets)), strict=True
    ):
        h = hashlib.blake2b(digest_size=16)
        for p in parts:
            h.update(np.ascontiguousarray(p).tobytes())
        rows.append(np.frombuffer(h.digest(), dtype=np.uint8))
    return np.stack(rows)


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


def dataset_sha256(dataset) -> str:
    h = hashlib.sha256()
    for start in range(0, len(dataset), 1024):
        chunk = dataset[start : start + 1024]
        h.update(row_hashes(chunk["input_ids"], chunk["position_ids"], chunk["targets"]).tobytes())
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


def expected_manifest(cfg: Config, teacher_path: str, tokenizer, vocab_size: int, dataset) -> dict:
    """What a cache for this run must say about itself; `dataset` is the packed training set."""
    k = cfg.teacher.top_k
    n, rows = len(dataset), cfg.teacher.cache_shard_rows
    return {
        **run_identity(cfg, teacher_path, tokenizer, vocab_size),
        "k": k,
        "encoding": {
            "ids": f"uint{8 * id_bytes_for(vocab_size)}",
            "logprobs": f"uint16 -q/{LOGPROB_SCALE:g}",
            "bytes_per_token": bytes_per_token(k, vocab_size),
        },
        "dataset": {
            "spec": cfg.data.train.model_dump(mode="json"),
            "sequences": n,
            "content_sha256": dataset_sha256(dataset),
        },
        "shard_rows": rows,
        "shards": [f"shard_{i:05d}.safetensors" for i in range((n + rows - 1) // rows)],
    }


def manifest_differences(found: dict, wanted: dict, reading: bool) -> list[str]:
    """Fields where a cache differs from what the run needs. A reader may use a cache with more K than it asks
    for (top-k is sorted, so its first k are the top-k); a resumed build must match exactly."""
    diffs = []
    for key in ("format", "teacher", "tokenizer_sha256", "vocab_size", "seq_len", "dataset", "shard_rows"):
        if found.get(key) != wanted.get(key):
            diffs.append(key)
    if reading and found.get("k", 0) < wanted["k"]:
        diffs.append(f"k (cache has {found.get('k')}, teacher.top_k={wanted['k']})")
    if not reading and found.get("k") != wanted["k"]:
        diffs.append("k")
    return diffs


def _dataset_key(manifest: dict) -> dict:
    # The reader checks the spec and size; row contents are checked row by row when batches are looked up.
    return {"spec": manifest["dataset"]["spec"], "sequences": manifest["dataset"]["sequences"]}


# ---------------------------------------------------------------------------------------------- reading


class VLLMCacheTeacher:
    """Reads the cached top-k signal of each batch row, found by the row's content hash."""

    can_fail = False

    def __init__(self, cfg: Config, tokenizer, vocab_size: int, teacher_path: str):
        from safetensors import safe_open

        self.root = Path(cfg.teacher.cache_dir)
        self.k = cfg.teacher.top_k
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise LLMDistillError(
                f"teacher.cache_dir={self.root}: no manifest.json (build it with launch/cache_teacher.py)"
            )
        found = json.loads(manifest_path.read_text())
        if not (self.root / COMPLETE).is_file():
            raise LLMDistillError(
                f"teacher.cache_dir={self.root}: a partial cache build (run launch/cache_teacher.py again)"
            )
        # The reader has no dataset to hash: it checks the data by spec and size here, and row by row later.
        wanted = {
            **run_identity(cfg, teacher_path, tokenizer, vocab_size),
            "k": self.k,
            "dataset": {
                "spec": cfg.data.train.model_dump(mode="json"),
                "sequences": found["dataset"]["sequences"],
            },
            "shard_rows": found.get("shard_rows"),
        }
        found_cmp = dict(found, dataset=_dataset_key(found))
        diffs = manifest_differences(found_cmp, wanted, reading=True)
        if diffs:
            raise LLMDistillError(
                f"teacher.cache_dir={self.root} was built for another run: {', '.join(diffs)} differ "
                "(rebuild it with launch/cache_teacher.py --overwrite)"
            )
        self.files = [safe_open(str(self.root / name), framework="numpy") for name in found["shards"]]
        self.where: dict[bytes, tuple[int, int]] = {}
        for s, f in enumerate(self.files):
            for r, h in enumerate(f.get_tensor("row_hash")):
                self.where.setdefault(h.tobytes(), (s, r))

    def signal(self, batch: dict) -> TeacherSignal:
        hashes = row_hashes(batch["input_ids"], batch["position_ids"], batch["targets"])
        ids, logprobs = [], []
        for h in hashes:
            loc = self.where.get(h.tobytes())
            if loc is None:
                raise LLMDistillError(
                    f"a training batch row is not in the cache {self.root}: the data differ from what was "
                    "cached "
                    "(rebuild it with launch/cache_teacher.py --overwrite)"
                )
            f, r = self.files[loc[0]], loc[1]
            ids.append(decode_ids(f.get_slice("ids")[r : r + 1])[0, :, : self.k])
            logprobs.append(decode_logprobs(f.get_slice("logprobs")[r : r + 1])[0, :, : self.k])
        return TeacherSignal(
            topk_ids=torch.from_numpy(np.stack(ids)), topk_logprobs=torch.from_numpy(np.stack(logprobs))
        )

    def stream(self, batches, device: str):
        from llmdistill.teachers.vllm_server import to_device_signal

        for batch in batches:
            yield to_device(batch, device), to_device_signal(self.signal(batch), device)

    def close(self) -> None:
        self.files = []


# ---------------------------------------------------------------------------------------------- building


def offline_engine(teacher_path: str, cfg: Config, max_len: int):
    """vLLM's offline engine for scoring: no prefix cache (a hit changes the kernels' arithmetic, so a resumed
    build would not be bit-identical), eager on CPU (torch.compile costs ~35 s there and crashes at exit)."""
    from vllm import LLM

    on_gpu = torch.cuda.is_available()
    return LLM(
        model=teacher_path,
        tokenizer=teacher_path,
        dtype=cfg.teacher.dtype,
        max_model_len=max_len,
        max_logprobs=cfg.teacher.top_k,
        enforce_eager=not on_gpu,
        enable_prefix_caching=False,
        trust_remote_code=cfg.teacher.trust_remote_code,
        seed=0,
    )


def engine_prompt_logprobs(engine, prompts, k: int) -> list[list[dict[int, float] | None]]:
    """vLLM offline scoring: the same per-token {id: log-prob} dicts the server returns."""
    from vllm import SamplingParams

    if not prompts:
        return []
    params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, temperature=0.0)
    outs = engine.generate([{"prompt_token_ids": p.token_ids} for p in prompts], params, use_tqdm=False)
    return [
        [
            None if d is None else {int(t): float(lp.logprob) for t, lp in d.items()}
            for d in out.prompt_logprobs
        ]
        for out in outs
    ]


def score_rows(score, chunk: dict, k: int) -> TeacherSignal:
    """`score(prompts, k)` -> per-prompt prompt_logprobs, turned into the [n, T, K] signal of these rows."""
    from llmdistill.teachers.vllm_server import build_prompts, signal_from_prompt_logprobs

    ids = torch.as_tensor(chunk["input_ids"])
    prompts = build_prompts(ids, torch.as_tensor(chunk["position_ids"]), torch.as_tensor(chunk["targets"]))
    return signal_from_prompt_logprobs(prompts, score(prompts, k), tuple(ids.shape), k)


def build_cache(cfg: Config, overwrite: bool = False, score=None) -> Path:
    """Score the packed training set once and write the cache; shards already on disk are kept (resume).
    `score(prompts, k)` defaults to vLLM's offline engine (tests pass a stand-in)."""
    from safetensors.numpy import save_file

    from llmdistill import session

    if not cfg.teacher.cache_dir:
        raise LLMDistillError("teacher.cache_dir: where should the cache go?")
    plan = session.preflight(cfg)
    dataset, _ = session.build_datasets(cfg, plan)
    root = Path(cfg.teacher.cache_dir)
    vocab = plan.teacher_config.vocab_size
    wanted = expected_manifest(cfg, plan.teacher_path, plan.teacher_tok, vocab, dataset)
    manifest_path = root / "manifest.json"
    if manifest_path.exists() and not overwrite:
        diffs = manifest_differences(json.loads(manifest_path.read_text()), wanted, reading=False)
        if diffs:
            raise LLMDistillError(
                f"{root} holds a cache for another run ({', '.join(diffs)} differ): "
                "pass --overwrite to replace it"
            )
    elif manifest_path.exists():
        for old in [*root.glob("shard_*.safetensors"), root / COMPLETE, manifest_path]:
            old.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    if not manifest_path.exists():
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True))
        tmp.replace(manifest_path)
    todo = [i for i, name in enumerate(wanted["shards"]) if not (root / name).exists()]
    if todo and score is None:
        # +2: the prompt is seq_len + 1 tokens and the engine insists on room for one generated token.
        engine = offline_engine(plan.teacher_path, cfg, cfg.data.seq_len + 2)

        def score(prompts, k):
            return engine_prompt_logprobs(engine, prompts, k)

    rows, k, id_bytes = wanted["shard_rows"], wanted["k"], id_bytes_for(vocab)
    for i in todo:
        chunk = dataset[i * rows : (i + 1) * rows]
        signal = score_rows(score, chunk, k)
        tensors = {
            "ids": encode_ids(signal.topk_ids.numpy(), id_bytes),
            "logprobs": encode_logprobs(signal.topk_logprobs.numpy()),
            "row_hash": row_hashes(chunk["input_ids"], chunk["position_ids"], chunk["targets"]),
        }
        final = root / wanted["shards"][i]
        tmp = final.with_name(final.name + ".tmp")
        # One metadata key: safetensors writes the metadata map in hash order, so several would vary per run.
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        tmp.replace(final)  # atomic: a shard on disk is whole, so a killed build resumes after it
        log.info(f"cache shard {i + 1}/{len(wanted['shards'])} written")
        # Fault injection for the resume test: LLMDISTILL_FAILPOINT=cache_shard@<i> kills the build here.
        if os.environ.get("LLMDISTILL_FAILPOINT") == f"cache_shard@{i}":
            os.kill(os.getpid(), signals.SIGKILL)
    (root / COMPLETE).write_text(json.dumps({"shards": len(wanted["shards"]), "sequences": len(dataset)}))
    return root
