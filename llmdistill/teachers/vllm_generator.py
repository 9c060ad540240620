"""The student's rollouts from a vLLM engine holding a copy of the student (teacher.on_policy.generator=vllm).

Placement: one offline engine in every trainer process, colocated with the training student (TRL's "colocate"
layout). vLLM's in-process engine joins the trainer's torch.distributed world (its external-launcher mode):
an engine on rank 0 alone cannot be built while the other ranks hold the same process group, because vLLM
creates its groups with collectives over that world. Each engine is sized by
`teacher.on_policy.gpu_memory_utilization` on a GPU, by VLLM_CPU_KVCACHE_SPACE (GiB, llmdistill.vllm_env) on
the CPU. On a GPU eager mode always: a weight reload allocates new tensors, which captured CUDA graphs would
not see. On the CPU (no graphs captured) the student is compiled unless `teacher.on_policy.compile` is false:
vLLM's decode step is bound by per-step overheads for a small student (its scheduler, sampler and bookkeeping
in Python, as HF `generate` is), and the compiled forward removes a part of them (~1.2x rollout tokens/s on
the tiny student, 2 CPU cores). The compiled graph is cached under VLLM_CACHE_ROOT (llmdistill.vllm_env, kept
between runs), keyed by the engine's config, so the student's config lives at a path named by its content:
the next run with the same student loads it (~6 s) instead of compiling it again (~13 s more).

The engine starts from the student's config with dummy weights (no files are written but the config), and
the trainer pushes the real weights before the first rollout and every `sync_every` optimizer steps:
`student_weights` yields them one parameter at a time, gathered under ZeRO-3 (every rank takes part) and with
LoRA adapters merged, straight into vLLM's in-place reload (the worker's `reload_weights`).

The same weights and sampling settings feed the separate rollout server (generator=vllm_server,
teachers/vllm_rollout_server.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from llmdistill.config import Config


def student_weights(student) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF checkpoint name, full weight) of every parameter of the student, one at a time.

    Under ZeRO-3 each parameter (a LoRA layer's base weight and adapters together) is gathered on every rank
    while the consumer reads it, and released before the next, so no rank ever holds the whole model twice. A
    LoRA layer yields its merged weight W + B A * scaling under the base layer's name. Collective under
    ZeRO-3: every rank must read the iterator to its end, in step.
    """
    import deepspeed  # lazy: importing deepspeed is slow, and only a running trainer calls this

    peft = hasattr(student, "get_base_model")
    model = student.get_base_model() if peft else student
    lora_types = ()
    if peft:
        from peft.tuners.lora import LoraLayer  # lazy: peft is slow to import and only LoRA runs need it

        lora_types = (LoraLayer,)
    seen: set[int] = set()  # tied weights (embedding and head) are one parameter: sent once
    inside_lora: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside_lora and any(name.startswith(prefix) for prefix in inside_lora):
            continue
        if isinstance(module, lora_types):
            inside_lora = (*inside_lora, name + ".")
            params = list(module.parameters())
            with deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
                weight = module.base_layer.weight.detach()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A and adapter not in module.merged_adapters:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
                yield f"{name}.weight", weight
            continue
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                yield f"{name}.{pname}" if name else pname, param.detach()


def reprocess_tied_layers(model) -> None:
    """vLLM's layerwise reload re-processes a tied weight (embedding = head) only through its first owner; on
    the CPU the head keeps a packed copy of the old weight unless its own post-load step runs again."""
    owners: dict[int, list] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and getattr(module, "quant_method", None) is not None:
            owners.setdefault(id(weight), []).append(module)
    for modules in owners.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)


def sampling_settings(settings, new_tokens: int, eos_id: int | None, seed: int) -> dict:
    """vLLM's sampling parameters for one rollout (SamplingParams keywords, and the same names in a
    /v1/completions request): teacher.on_policy's temperature (0: greedy), top-p and top-k, up to
    `new_tokens`, stopping at EOS, seeded unless greedy."""
    greedy = settings.temperature == 0
    return {
        "n": 1,
        "temperature": settings.temperature,
        "top_p": 1.0 if greedy else settings.top_p,
        "top_k": 0 if greedy else settings.top_k,
        "max_tokens": new_tokens,
        "stop_token_ids": [eos_id] if eos_id is not None else None,
        "seed": None if greedy else seed % 2**63,
    }


def row_budgets(prompts, new_tokens: int | list[int]) -> list[int]:
    """New tokens per row: one budget for all rows, or each row's own (chat prompts)."""
    return new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)


def rollout_rows(prompts, written: list[list[int]], new_tokens: int | list[int], pad_id: int | None):
    """Each prompt followed by its written tokens (at most its budget), padded to prompt + budget: [B, P + n]
    for prompts [B, P], one 1-D row per prompt for a list of 1-D prompts (chat: lengths, budgets per row)."""
    out = []
    for prompt, budget, tokens in zip(prompts, row_budgets(prompts, new_tokens), written, strict=True):
        row = torch.full((len(prompt) + budget,), pad_id or 0, dtype=torch.long)
        row[: len(prompt)] = prompt
        tokens = tokens[:budget]
        row[len(prompt) : len(prompt) + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        out.append(row)
    return torch.stack(out) if isinstance(prompts, torch.Tensor) else out


class ExpectedReloadWarnings(logging.Filter):
    """Drops the two warnings vLLM's in-place reload logs at every push that say nothing is wrong: a rotary
    embedding has no weights to load (its tables are computed), and a tied LM head is the embedding, loaded
    under the embedding's name (reprocess_tied_layers then refreshes it). Other layers still warn."""

    def __init__(self, tied_head: bool):
        super().__init__()
        self.expected = ("RotaryEmbedding", "ParallelLMHead") if tied_head else ("RotaryEmbedding",)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "%s: Failed to load weights" or not record.args:
            return True
        return not str(record.args[0]).endswith(self.expected)


def quiet_expected_reload_warnings(tied_head: bool) -> None:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, ExpectedReloadWarnings) for f in logger.filters):
        logger.addFilter(ExpectedReloadWarnings(tied_head))


def config_dir(student_config, root: str) -> str:
    """A directory holding only the student's config.json, named by its content under `root`: the same
    student gets the same path in every run (vLLM's compile cache is keyed by the model's path)."""
    text = student_config.to_json_string(use_diff=False)
    path = Path(root) / "llmdistill-students" / hashlib.sha256(text.encode()).hexdigest()[:16]
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed into place: the ranks of a run may write it at the same time.
        tmp = tempfile.mkdtemp(dir=path.parent)
        student_config.save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process put it there first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


class VLLMGenerator:
    """An offline vLLM engine holding a copy of the student; `load` pushes weights, `generate` samples."""

    def __init__(self, cfg: Config, student_config, eos_id: int | None):
        from llmdistill.vllm_env import set_offline_env

        set_offline_env()
        from vllm import LLM  # lazy: vllm is optional and slow to import

        self.eos_id = eos_id
        p = cfg.teacher.on_policy
        kwargs = {}
        if torch.distributed.is_initialized():
            kwargs["distributed_executor_backend"] = "external_launcher"
            # vLLM reads the rank from a launcher's variables; a group made in-process (a notebook, a test)
            # may have none.
            os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
            os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = p.gpu_memory_utilization
        quiet_expected_reload_warnings(bool(getattr(student_config, "tie_word_embeddings", False)))
        self.llm = LLM(
            model=config_dir(student_config, os.environ["VLLM_CACHE_ROOT"]),
            load_format="dummy",  # the trainer's weights are pushed before the first rollout
            skip_tokenizer_init=True,  # prompts and rollouts are token ids
            dtype=cfg.train.dtype,
            max_model_len=cfg.data.seq_len + 2,
            enforce_eager=torch.cuda.is_available() or not p.compile,
            enable_prefix_caching=False,  # cached prefixes would hold keys and values of older weights
            seed=cfg.run.seed,
            **kwargs,
        )

    def load(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights by `weights` (HF checkpoint names), in place."""
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        self.llm.apply_model(reprocess_tied_layers)

    def generate(
        self,
        prompts: torch.Tensor | list[torch.Tensor],
        new_tokens: int | list[int],
        settings,
        seed: int,
        pad_id: int | None,
    ):
        """prompts [B, P] continued by up to `new_tokens` (stopping at EOS), padded to P + new_tokens; or a
        list of 1-D prompts of any lengths (chat), each with its own `new_tokens` when that is a list, giving
        one 1-D row per prompt (prompt + its new tokens, padded). All rows go to vLLM in one call.

        Row i is sampled with seed + i (vLLM seeds each request), so a batch's samples are a function of the
        batch's seed and the weights, and a row's are the same in a batch as alone."""
        from vllm import SamplingParams  # lazy: vllm is optional and slow to import

        params = [
            SamplingParams(**sampling_settings(settings, budget, self.eos_id, seed + row), detokenize=False)
            for row, budget in enumerate(row_budgets(prompts, new_tokens))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": row.tolist()} for row in prompts], params, use_tqdm=False
        )
        written = [list(result.outputs[0].token_ids) for result in outputs]
        return rollout_rows(prompts, written, new_tokens, pad_id)

    def close(self) -> None:
        self.llm = None
