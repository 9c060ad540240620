"""Build the vllm_cache source's cache (teachers/vllm_cache.py): score the packed training set once with
vLLM's offline engine and write it shard by shard; an interrupted build resumes after its last whole shard.

    python launch/cache_teacher.py --config configs/tiny/vllm_cache.yaml
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
from safetensors.numpy import save_file

from llmdistill import models, session
from llmdistill.config import Config, LLMDistillError
from llmdistill.teachers.prompts import score_batch
from llmdistill.teachers.vllm_cache import (
    COMPLETE,
    FORMAT,
    LOGPROB_SCALE,
    bytes_per_token,
    encode_ids,
    encode_logprobs,
    id_bytes_for,
    kept_positions,
    manifest_differences,
    row_hashes,
    run_identity,
)
from llmdistill.vllm_env import set_offline_env

log = logging.getLogger(__name__)


def dataset_sha256(dataset) -> str:
    h = hashlib.sha256()
    for start in range(0, len(dataset), 1024):
        h.update(row_hashes(dataset[start : start + 1024]).tobytes())
    return h.hexdigest()


def expected_manifest(cfg: Config, teacher_path: str, tokenizer, vocab_size: int, dataset) -> dict:
    """What a cache for this run must say about itself; `dataset` is the packed training set."""
    k, rows, n = cfg.teacher.cache.top_k, cfg.teacher.cache.shard_rows, len(dataset)
    cross = "teacher_input_ids" in dataset.column_names
    encoding = {
        "ids": f"uint{8 * id_bytes_for(vocab_size)}",
        "logprobs": f"uint16 -q/{LOGPROB_SCALE:g}",
        "bytes_per_token": bytes_per_token(k, vocab_size, cross),
        # Only positions whose target is valid are stored (teachers/vllm_cache.py).
        "positions": "targets != -100, row r at [row_offsets[r], row_offsets[r + 1])",
    }
    if cross:
        encoding["target_logprobs"] = "float32"
    return {
        **run_identity(cfg, teacher_path, tokenizer, vocab_size),
        "k": k,
        "encoding": encoding,
        "cross_tokenizer": cross,
        "dataset": {
            "spec": cfg.data.train.model_dump(mode="json"),
            "sequences": n,
            "content_sha256": dataset_sha256(dataset),
        },
        "shard_rows": rows,
        "shards": [f"shard_{i:05d}.safetensors" for i in range((n + rows - 1) // rows)],
    }


def offline_engine(teacher_path: str, cfg: Config, max_len: int):
    """vLLM's offline engine for scoring: no prefix cache (a hit changes the kernels' arithmetic, so a resumed
    build would not be bit-identical), eager on CPU (torch.compile costs ~35 s there and crashes at exit)."""
    set_offline_env()
    from vllm import LLM  # optional and heavy: only the cache builder needs it

    on_gpu = torch.cuda.is_available()
    return LLM(
        model=teacher_path,
        tokenizer=teacher_path,
        dtype=cfg.teacher.dtype,
        max_model_len=max_len,
        max_logprobs=cfg.teacher.cache.top_k,
        enforce_eager=not on_gpu,
        enable_prefix_caching=False,
        trust_remote_code=cfg.teacher.trust_remote_code,
        seed=0,
    )


def engine_prompt_logprobs(engine, prompts, k: int) -> list[list[dict[int, float] | None]]:
    """vLLM offline scoring: the same per-token {id: log-prob} dicts the server returns."""
    from vllm import SamplingParams  # optional and heavy: only the cache builder needs it

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


def engine_length(cfg: Config, plan, dataset) -> int:
    """The engine's max_model_len: the longest prompt (seq_len + 1, or the teacher's padded window length for
    a cross-tokenizer dataset) + 1, since the engine insists on room for one generated token."""
    if "teacher_input_ids" not in dataset.column_names:
        return cfg.data.seq_len + 2
    needed = len(dataset[0]["teacher_input_ids"]) + 1
    limit = models.max_positions(plan.teacher_config)
    if limit is not None and needed > limit:
        raise LLMDistillError(
            f"the teacher's tokenization of a data.seq_len={cfg.data.seq_len} window needs {needed - 1} "
            f"positions, at the teacher's maximum {limit}: lower data.seq_len"
        )
    return needed


def build_cache(cfg: Config, overwrite: bool = False, score=None) -> Path:
    """Score the packed training set once and write the cache; shards already on disk are kept (resume).
    `score(prompts, k)` defaults to vLLM's offline engine (tests pass a stand-in)."""
    if not cfg.teacher.cache.dir:
        raise LLMDistillError("teacher.cache.dir: where should the cache go?")
    plan = session.preflight(cfg)
    dataset, _ = session.build_datasets(cfg, plan)
    root = Path(cfg.teacher.cache.dir)
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
        engine = offline_engine(plan.teacher_path, cfg, engine_length(cfg, plan, dataset))

        def score(prompts, k):
            return engine_prompt_logprobs(engine, prompts, k)

    rows, k, id_bytes = wanted["shard_rows"], wanted["k"], id_bytes_for(vocab)
    for i in todo:
        chunk = dataset[i * rows : (i + 1) * rows]
        signal = score_batch(score, chunk, k)
        keep = kept_positions(chunk)  # row-major: row r's kept positions follow row r - 1's
        tensors = {
            "ids": encode_ids(signal.topk_ids[keep].numpy(), id_bytes),
            "logprobs": encode_logprobs(signal.topk_logprobs[keep].numpy()),
            "row_offsets": np.concatenate([[0], np.cumsum(keep.sum(1).numpy())]).astype(np.int64),
            "row_hash": row_hashes(chunk),
        }
        if wanted["cross_tokenizer"]:
            tensors["target_logprobs"] = signal.target_logprobs[keep].numpy()
        final = root / wanted["shards"][i]
        tmp = final.with_name(final.name + ".tmp")
        # One metadata key: safetensors writes the metadata map in hash order, so several would vary per run.
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        models.honour_umask(tmp)  # safetensors writes 0600 whatever the umask
        tmp.replace(final)  # atomic: a shard on disk is whole, so a killed build resumes after it
        log.info(f"cache shard {i + 1}/{len(wanted['shards'])} written")
        # Fault injection for the resume test: LLMDISTILL_FAILPOINT=cache_shard@<i> kills the build here.
        if os.environ.get("LLMDISTILL_FAILPOINT") == f"cache_shard@{i}":
            os.kill(os.getpid(), signals.SIGKILL)
    (root / COMPLETE).write_text(json.dumps({"shards": len(wanted["shards"]), "sequences": len(dataset)}))
    return root
