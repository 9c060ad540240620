"""One typed configuration tree for every command, loaded from YAML with dotted `key=value` overrides.

Unknown keys are rejected and every error names the offending field, so a typo never silently becomes a
default.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class LLMDistillError(Exception):
    """An error in the user's input: printed as one line by the CLI, never as a traceback.

    `every_rank=True` says every rank raises it at the same point, from a decision the ranks took together
    (a reduced flag): the CLI can then leave the process group on every rank, as after a success.
    """

    def __init__(self, *args, every_rank: bool = False):
        super().__init__(*args)
        self.every_rank = every_rank


class ConfigError(LLMDistillError):
    pass


AttnImplementation = Literal["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"]


class Section(BaseModel):
    # NaN and infinity are refused in every float field: `train.lr=.inf` is a typo, not a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunConfig(Section):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    # A run directory with checkpoints is resumed only under the config that wrote them (train.max_steps and
    # other settings that do not change what a step computes may differ; see checkpoint.check_run_config).
    # true: accept a different config and write it over the old config.yaml.
    overwrite_config: bool = False

    @property
    def dir(self) -> Path:
        return Path(self.output_dir) / self.name


class RolloutServerConfig(Section):
    """teacher.on_policy.server: the vLLM servers holding a copy of the student (generator vllm_server),
    started by `llmdistill serve-student` (launch/serve_student.sh) on the port of the first url."""

    urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8001"], min_length=1)
    timeout: float = Field(300.0, gt=0)  # seconds per request (one rollout, or one weight load)
    # Attempts after the first failure, over all urls, waiting backoff * 2^i seconds (capped at 30 s) between.
    retries: int = Field(4, ge=0)
    backoff: float = Field(1.0, ge=0)


class OnPolicyConfig(Section):
    """GKD / DistillSpec: a fraction of the batches are the student's own continuations, scored by the
    teacher."""

    # λ: the fraction of micro-batches replaced by student samples (chosen per batch from its content, so the
    # choice is the same after a resume).
    fraction: float = Field(0.5, ge=0, le=1)
    # Each sample keeps the first `prompt_tokens` of a dataset sequence and the student writes the rest.
    prompt_tokens: int = Field(16, gt=0)
    temperature: float = Field(1.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: no top-k filter
    # New tokens per sample, at most data.seq_len - prompt_tokens + 1 (the default: the rest of the window);
    # a sample also stops at EOS. Targets after the last written token are masked.
    max_new_tokens: int | None = Field(None, gt=0)
    # Who writes the samples: `hf`, HF `generate` on the training student (ZeRO 0-2); `vllm`, a vLLM engine
    # in each trainer process holding a copy of the student (any ZeRO stage, LoRA merged), its weights pushed
    # every `sync_every` optimizer steps; `vllm_server`, the same from separate vLLM servers (`server`), the
    # weights written under the run directory for them to load (the servers must be able to read it).
    generator: Literal["hf", "vllm", "vllm_server"] = "hf"
    sync_every: int = Field(1, gt=0)
    # The samples for step k come from the weights of step k - lag (rounded down to a sync): 1 lets the vLLM
    # engine write step k + 1's samples while step k trains.
    lag: int = Field(0, ge=0, le=1)
    # Fraction of the GPU's memory the vLLM engine (or the vllm_server's) may take (weights + KV cache); on
    # the CPU its KV cache is VLLM_CPU_KVCACHE_SPACE GiB (1 unless set).
    gpu_memory_utilization: float = Field(0.3, gt=0, lt=1)
    # generator vllm on the CPU: the engine runs the student compiled (torch.compile; ~1.2x rollout tokens/s
    # on the tiny student), compiled once per student config (~13 s) and cached in VLLM_CACHE_ROOT, loaded at
    # later starts (~6 s); false: eager. On a GPU the engine is always eager (captured CUDA graphs would not
    # see the pushed weights). Compiled and eager kernels may round differently: a resume keeps the setting.
    compile: bool = True
    # Who scores the samples (and the dataset's batches): the vLLM teacher servers (teacher.server) or the
    # teacher in-process (teacher.path, full logits).
    scorer: Literal["vllm_server", "hf"] = "vllm_server"
    server: RolloutServerConfig = RolloutServerConfig()


class ServerConfig(Section):
    """teacher.server: the vLLM servers a `vllm_server` or `on_policy` run scores its batches on."""

    # OpenAI-compatible vLLM servers, used round-robin (rank r starts at url r).
    urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000"], min_length=1)
    served_model_name: str = "teacher"
    # Top-k log-probabilities per position (at most the server's --max-logprobs).
    top_k: int = Field(20, gt=0)
    timeout: float = Field(60.0, gt=0)  # seconds per request
    # Attempts after the first failure, over all urls, waiting backoff * 2^i seconds (capped at 30 s) between.
    retries: int = Field(4, ge=0)
    backoff: float = Field(1.0, ge=0)
    # Micro-batches whose signal is fetched ahead in a thread, overlapping the network with the student.
    prefetch: int = Field(2, ge=0)


class ServeConfig(Section):
    """teacher.serve: how launch/serve_teacher.sh and launch/slurm/server.sbatch start the server (its
    --max-logprobs is teacher.server.top_k)."""

    port: int = Field(8000, gt=0, lt=65536)
    max_model_len: int | None = Field(None, gt=0)  # default: data.seq_len + 2
    args: list[str] = Field(default_factory=list)  # more `vllm serve` arguments


class CacheConfig(Section):
    """teacher.cache: the top-k signal written once by launch/cache_teacher.py and read by `vllm_cache`."""

    dir: str | None = None  # manifest.json + shards
    shard_rows: int = Field(256, gt=0)  # packed sequences per shard file
    # Top-k log-probabilities per position (a reader may ask for fewer than the cache holds).
    top_k: int = Field(20, gt=0)


# Flat teacher keys of earlier versions and where each lives now.
MOVED_TEACHER_KEYS = {
    **{key: f"server.{key}" for key in ("urls", "served_model_name", "timeout", "retries", "backoff")},
    "prefetch": "server.prefetch",
    "top_k": "server.top_k (vllm_server, on_policy) or teacher.cache.top_k (vllm_cache)",
    "cache_dir": "cache.dir",
    "cache_shard_rows": "cache.shard_rows",
    "serve_port": "serve.port",
    "serve_max_model_len": "serve.max_model_len",
    "serve_args": "serve.args",
}


class TeacherConfig(Section):
    # Where the teacher signal comes from: in-process HF, a vLLM server (top-k), a vLLM cache on disk (top-k),
    # or on-policy student samples scored by a vLLM server (llmdistill/teachers/, one file per source).
    source: Literal["hf", "none", "vllm_server", "vllm_cache", "on_policy"] = "hf"
    # An HF model directory or hub name; "embedded" is the tiny teacher shipped with the package. For the vLLM
    # sources it gives the tokenizer and config (the weights are the server's or the cache builder's).
    path: str | None = "embedded"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # The in-process teacher's attention kernel (see student.attn_implementation).
    attn_implementation: AttnImplementation = "sdpa"
    # Keep the teacher's hidden states in the signal (needed by hidden_* and curriculum losses).
    hidden_states: bool = False
    server: ServerConfig = ServerConfig()
    serve: ServeConfig = ServeConfig()
    cache: CacheConfig = CacheConfig()
    on_policy: OnPolicyConfig = OnPolicyConfig()

    @model_validator(mode="before")
    @classmethod
    def _no_flat_keys(cls, raw):
        # A ConfigError, not a ValueError: pydantic passes it through as is, so the line names the new place.
        moved = [key for key in MOVED_TEACHER_KEYS if isinstance(raw, dict) and key in raw]
        if moved:
            raise ConfigError(
                "; ".join(f"teacher.{key} moved to teacher.{MOVED_TEACHER_KEYS[key]}" for key in moved)
            )
        return raw

    @property
    def reads_teacher_server(self) -> bool:
        """Whether the run reads vLLM teacher servers (teacher.server.urls)."""
        return self.source == "vllm_server" or (
            self.source == "on_policy" and self.on_policy.scorer == "vllm_server"
        )

    @property
    def scores_in_process(self) -> bool:
        """Whether the teacher scores in the trainer's process (so the trainer must load it)."""
        return self.source == "hf" or (self.source == "on_policy" and self.on_policy.scorer == "hf")

    @property
    def reads_student_server(self) -> bool:
        """Whether the run samples from student rollout servers (teacher.on_policy.server.urls)."""
        return self.source == "on_policy" and self.on_policy.generator == "vllm_server"


class PeftConfig(Section):
    type: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


class StudentConfig(Section):
    # Exactly one way to get the student: an existing HF dir, the teacher's config with overrides (random
    # init), or a full model config (random init).
    path: str | None = None
    from_teacher: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None  # default: the teacher's (or the student path's own)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # transformers' attention kernel. Packed documents stay isolated under each: eager and sdpa get a
    # block-causal mask, flex_attention a block mask, flash_attention_2/3 the documents' cumulative lengths.
    # flash_attention_* need the flash-attn package and a CUDA GPU; flex_attention compiles on first use.
    attn_implementation: AttnImplementation = "sdpa"
    peft: PeftConfig | None = None

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("path", "from_teacher", "config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of student.path, student.from_teacher, student.config "
                f"(got {given or 'none'})"
            )
        return self


class DatasetSpec(Section):
    """One data source, named the way `datasets.load_dataset` names it (llmdistill/data.py)."""

    # A local file (jsonl/json/txt/parquet), a local directory (its data files, or a dataset laid out for
    # `load_dataset` with splits and configs), a hub dataset name, or "embedded:<split>".
    path: str
    name: str | None = None  # the dataset's config name
    revision: str | None = None  # a hub branch, tag or commit
    # With slicing: "train[:5%]", "train[100:200]". A single file has one split, "train".
    split: str = "train"
    # Read rows as they are needed instead of preparing the whole set on disk (no split slicing).
    streaming: bool = False
    # Share of this source in a blend (data.train as a list): weights are normalised over the list.
    weight: float = Field(1.0, gt=0)
    # What a row holds: raw text (all tokens trained), a chat (`messages`: a list of {role, content}; only the
    # assistant turns trained), or a prompt and its completion (only the completion trained).
    format: Literal["text", "messages", "prompt_completion"] = "text"
    text_field: str = "text"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    max_documents: int | None = Field(None, gt=0)  # the first N rows only


class DataConfig(Section):
    # One source, or a weighted blend of several ([{path: a, weight: 0.7}, {path: b, weight: 0.3}]).
    train: DatasetSpec | list[DatasetSpec] = DatasetSpec(path="embedded:train")
    validation: DatasetSpec | list[DatasetSpec] | None = DatasetSpec(path="embedded:validation")
    seq_len: int = Field(256, gt=1)
    num_workers: int = Field(0, ge=0)
    # Chat data: a Jinja chat template (a file path or the template itself) instead of the student
    # tokenizer's own.
    chat_template: str | None = None
    # prompt_completion rows: true renders them as one user turn and one assistant turn with the chat
    # template; false concatenates prompt and completion as they are (then EOS).
    chat: bool = False
    # messages rows: train every assistant turn, or only the last one.
    train_on: Literal["all", "last"] = "all"
    # true: whole samples packed into each sequence (attention stays inside each); false: one sample per
    # sequence, padded at the end.
    pack: bool = True
    # A chat or prompt_completion sample longer than seq_len is dropped, or ("turns") cut after its last
    # assistant turn that fits; each is counted in the log. Text documents are cut anywhere.
    truncation: Literal["drop", "turns"] = "drop"

    @model_validator(mode="after")
    def _blends_have_sources(self):
        for field in ("train", "validation"):
            if isinstance(getattr(self, field), list) and not getattr(self, field):
                raise ValueError(f"data.{field}: an empty list of datasets")
        return self


class LossTerm(BaseModel):
    """One weighted term of the objective; any other key is a parameter of that loss, checked by the
    registry."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str
    weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _finite_params(self):
        for key, value in self.params.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{key}: Input should be a finite number (got {value})")
        return self

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PushToHubConfig(Section):
    """Upload the exported student with its model card at the end of training (`llmdistill push` later)."""

    repo_id: str = Field(pattern=r"^[\w.-]+(/[\w.-]+)?$")  # NAME or ORG/NAME
    private: bool = False


class TrainConfig(Section):
    max_steps: int = Field(100, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)  # 0: no clipping
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(1, gt=0)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    eval_batches: int = Field(8, gt=0)
    save_every: int = Field(0, ge=0)  # 0: only at the end
    keep_checkpoints: int = Field(2, gt=0)
    resume: str = "auto"  # auto | never | a checkpoint directory
    export: bool = True
    progress: bool = True
    # Stop (keeping the last checkpoint) after this many optimizer steps in a row were skipped: a non-finite
    # loss, or DeepSpeed's fp16 overflow check.
    max_skipped_steps: int = Field(10, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas):
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("each must be in [0, 1)")
        return betas

    # Speed options (README "Speed"). Recompute each student layer's activations in the backward instead of
    # keeping them: less memory, about a third more compute.
    gradient_checkpointing: bool = False
    # torch.compile the student's decoder layers (the first steps are slow while it compiles).
    compile: bool = False
    # Patch the student (and an in-process teacher) with liger-kernel's Triton kernels (RMSNorm, SwiGLU,
    # RoPE); needs `pip install llmdistill[gpu]` and a CUDA GPU.
    liger: bool = False
    # Where every logged scalar and the run's config go besides logs.jsonl (always written); each tracker
    # but TensorBoard is an optional extra (`pip install llmdistill[trackers]`), see llmdistill/trackers.py.
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=lambda: ["tensorboard"]
    )
    push_to_hub: PushToHubConfig | None = None

    @model_validator(mode="after")
    def _push_needs_export(self):
        if self.push_to_hub is not None and not self.export:
            raise ValueError("train.push_to_hub needs train.export (there is no student to push)")
        return self


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    # A DeepSpeed JSON to start from; the fields above and `extra` are applied on top of it.
    config_file: str | None = None
    # More DeepSpeed keys, merged last; not those the fields of this config set (OWNED_DEEPSPEED_KEYS).
    # zero_optimization, bf16 and fp16 are checked with DeepSpeed's own models; DeepSpeed ignores other keys
    # it does not know.
    extra: dict[str, Any] = Field(default_factory=dict)


class DeriveTarget(Section):
    """An explicit student shape; a field left out keeps the teacher's value."""

    num_layers: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)


class DeriveSearch(Section):
    """Minitron-style search: depth x width shapes under a parameter and/or memory budget, ranked by held-out
    loss."""

    # A fraction of the teacher's parameters (<= 1) or an absolute parameter count (> 1).
    param_budget: float | None = Field(None, gt=0)
    # Serving memory in GiB (2^30 bytes): the weights plus the KV cache of `memory_batch` sequences of
    # `memory_context` tokens, all in `memory_dtype`. A sliding-window layer holds at most its window (the
    # teacher's share of such layers stands for the student's).
    memory_budget_gb: float | None = Field(None, gt=0)
    memory_context: int = Field(4096, gt=0)
    memory_batch: int = Field(1, gt=0)
    memory_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    # Candidates stay under every budget given and use at least (1 - tolerance) of one of them.
    tolerance: float = Field(0.1, ge=0, lt=1)
    # Width grid, as fractions of the teacher's hidden size, MLP size and KV groups.
    width_fractions: list[float] = Field(default_factory=lambda: [1.0, 0.875, 0.75, 0.625, 0.5])
    min_layers: int = Field(1, gt=0)
    # Hidden and MLP sizes are rounded to a multiple of this (keeps matmuls aligned).
    size_multiple: int = Field(8, gt=0)
    # At most this many feasible shapes are pruned and scored, spread over depths.
    max_candidates: int = Field(12, gt=0)

    @model_validator(mode="after")
    def _some_budget(self):
        if self.param_budget is None and self.memory_budget_gb is None:
            raise ValueError("give param_budget, memory_budget_gb or both")
        return self


class DeriveMasking(Section):
    """MAGNET in-block masking of the kept blocks' linear weights, computed on the pruned student."""

    sparsity: float = Field(gt=0, lt=1)
    # grad: smallest mean |gradient| masked (MAGNET); grad_x_weight: smallest |gradient * weight| (Taylor).
    saliency: Literal["grad", "grad_x_weight"] = "grad"


class DeriveConfig(Section):
    """How to derive the student from the teacher by pruning; fields are owned by llmdistill/derive."""

    # Output HF directory; default <run.dir>/derived.
    output: str | None = None
    # Exactly one of target (explicit shape) and search (parameter budget); neither: keep the teacher's shape.
    target: DeriveTarget | None = None
    search: DeriveSearch | None = None
    # Layer scores to combine (each min-max normalised, then averaged) when dropping layers.
    depth_methods: list[Literal["block_importance", "perplexity", "magnet_grad"]] = Field(
        default_factory=lambda: ["block_importance"], min_length=1
    )
    # independent: drop the lowest-scored layers wherever they are; contiguous: the lowest-scored run.
    layer_selection: Literal["independent", "contiguous"] = "independent"
    # How width scores aggregate activations over calibration tokens: mean over all tokens, or ModelOpt's
    # Minitron (mean over each sequence, then L2 over sequences); see llmdistill/derive/importance.py.
    aggregation: Literal["mean", "minitron"] = "mean"
    # Calibration set for the scores (default: data.train) and how many packed sequences of it to use.
    calibration: DatasetSpec | None = None
    calibration_samples: int = Field(32, gt=0)
    # Held-out set for the search ranking (default: data.validation, else the calibration set).
    eval_samples: int = Field(16, gt=0)
    batch_size: int = Field(4, gt=0)
    # After dropping hidden channels, rescale RMSNorm weights so kept channels' outputs match the teacher's.
    rescale_norms: bool = True
    masking: DeriveMasking | None = None
    plots: bool = True

    @model_validator(mode="after")
    def _one_shape_source(self):
        if self.target is not None and self.search is not None:
            raise ValueError("give at most one of derive.target and derive.search")
        return self


class BalanceConfig(Section):
    """MoKD-style balancing of the terms' gradients w.r.t. the student's final hidden state."""

    method: Literal["pcgrad"] = "pcgrad"
    # Rescale each term's gradient to the mean norm ("mean"), the task terms' norm ("task"), or not ("none").
    normalize: Literal["mean", "task", "none"] = "mean"
    # PCGrad: drop the component of a term's gradient that conflicts with another's.
    project: bool = True
    task_terms: list[str] = Field(default_factory=lambda: ["ce"])


class EvalConfig(Section):
    """lm-eval benchmarking (llmdistill.evaluate): the teacher vs students on a task list."""

    # lm-eval task names: the local offline ones (evals/tasks/, tag llmdistill_code), or standard ones on
    # a cluster.
    tasks: list[str] = Field(
        default_factory=lambda: [
            "llmdistill_code_bpb",
            "llmdistill_code_nextline",
            "llmdistill_code_identifier",
        ],
        min_length=1,
    )
    # true: teacher.path; a path: that model; false: students only.
    teacher: bool | str = True
    # HF model dirs or run directories (their exported student/); empty: this run's student if it exists.
    students: list[str] = Field(default_factory=list)
    backend: Literal["hf", "vllm"] = "hf"
    # Examples per task (an int, or a fraction < 1); null: all. A limit is a subset: fine for tracking,
    # not for a score.
    limit: int | float | None = Field(None, gt=0)
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, gt=0)
    # Context length for lm-eval (null: the model's own maximum).
    max_length: int | None = Field(None, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    # Extra keyword arguments for the backend: vllm, lm-eval's VLLM arguments ({tensor_parallel_size: 2});
    # hf, trust_remote_code, attn_implementation and HFLM's options for a loaded model; others are refused.
    model_args: dict[str, Any] = Field(default_factory=dict)
    # More directories of task YAMLs (evals/tasks is always included).
    include_paths: list[str] = Field(default_factory=list)
    # Index lm-eval's built-in tasks: null = only when a task is not found locally (indexing costs ~15 s).
    include_defaults: bool | None = None
    # lm-eval's stderr: mean metrics get a closed form for any value > 0, a few others (f1, bleu, ...) a
    # bootstrap of this many draws in a process pool; 0 skips all stderrs.
    bootstrap_iters: int = Field(100, ge=0)
    # Where the report goes; null: <run.output_dir>/<run.name>/eval.
    output_dir: str | None = None
    # During training (an `eval` section in a training config): every N steps the student is scored on
    # `every_limit` examples per task and logged to TensorBoard (0: never); the full report is written at
    # the end.
    every: int = Field(0, ge=0)
    every_limit: int = Field(50, gt=0)
    at_end: bool = True


class Config(Section):
    run: RunConfig = RunConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig(from_teacher={})
    data: DataConfig = DataConfig()
    loss: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="fkl")])
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    derive: DeriveConfig | None = None
    # Gradient balancing between the objective's terms (llmdistill.losses.balance); None: plain weighted sum.
    balance: BalanceConfig | None = None
    # Benchmarking with lm-eval (llmdistill eval); None: the defaults of EvalConfig when evaluating.
    eval: EvalConfig | None = None

    @model_validator(mode="after")
    def _teacher_needed(self):
        if not self.loss:
            raise ValueError("loss: the objective needs at least one term")
        if self.teacher.source == "none" and self.student.from_teacher is not None:
            raise ValueError("student.from_teacher needs a teacher (teacher.source is 'none')")
        if self.train.compile and self.deepspeed.zero_stage == 3:
            # ZeRO-3 gathers weights in module hooks, which a compiled layer would trace instead of running.
            raise ValueError("train.compile: not supported with deepspeed.zero_stage=3 (use ZeRO 0-2)")
        if self.teacher.source == "vllm_cache" and not self.teacher.cache.dir:
            raise ValueError("teacher.cache.dir: needed when teacher.source is 'vllm_cache'")
        b = self.balance
        if b is not None and b.normalize == "task" and not {t.name for t in self.loss} & set(b.task_terms):
            raise ValueError(
                f"balance.normalize=task: no loss term is one of balance.task_terms={b.task_terms}"
            )
        return self


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading floats as YAML 1.2 does: `1e-2` and `5E+3` (no dot) are numbers.

    PyYAML implements YAML 1.1, where a float needs a dot and a signed exponent, so `1e-2` is the string
    "1e-2". A typed field converts it, but a loss parameter (an untyped value) would reach the loss as a
    string and fail at the first forward."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    # The forms YAML 1.1 leaves as strings: an exponent without a dot before it, or without a sign.
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """YAML text as plain data, the way config files and override values are read."""
    return yaml.load(text, Loader=ConfigLoader)


def _parse_value(key: str, text: str) -> Any:
    # YAML gives numbers, booleans, null and lists for free: `train.lr=3e-4`, `train.betas=[0.9,0.99]`.
    if text == "":
        return ""
    try:
        return read_yaml(text)
    except yaml.YAMLError as err:
        problem = str(getattr(err, "problem", None) or err).splitlines()[0]
        raise ConfigError(f"override {key}: {text!r} is not valid YAML ({problem})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[_list_index(key, part, node)]
                continue
            if node.get(part) is None:  # a null section in YAML (`masking: null`) can still take overrides
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict | list):
                raise ConfigError(f"override {key}: {part} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(key, last, node)] = _parse_value(key, value)
        else:
            node[last] = _parse_value(key, value)
    return raw


def _list_index(key: str, part: str, node: list) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "config"


def _format_error(err: ValidationError, name=_dotted) -> str:
    """Each error as `<name(its location)>: <what is wrong>`, all in one line."""
    lines = []
    for e in err.errors():
        where = name(e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key")
        else:
            lines.append(
                f"{where}: {e['msg']} (got {e.get('input')!r})" if "input" in e else f"{where}: {e['msg']}"
            )
    return "; ".join(lines)


def config_from_dict(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"config error: {_format_error(err)}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return config_from_dict(apply_overrides(raw, list(overrides)))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# DeepSpeed keys that our own fields set, and those fields: `deepspeed.extra` may not set them. The trainer
# reads the fields too (the batch size for its data, the ZeRO stage to build the models, the dtype for the
# weights, its own AdamW and schedule, which DeepSpeed would silently prefer to an `optimizer` or `scheduler`
# key), so DeepSpeed's copy would disagree with the run.
OWNED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size and train.grad_accum (times the ranks)",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "bf16.enabled": "train.dtype",
    "fp16.enabled": "train.dtype",
    "optimizer": "train.lr, train.betas and train.weight_decay",
    "scheduler": "train.lr, train.warmup_steps and train.min_lr_ratio",
}


# The sections of the DeepSpeed JSON that our fields write into and a base file or `extra` may extend, each
# checked by the function DeepSpeed itself reads it with (deepspeed.runtime: zero.config, precision_config).
DEEPSPEED_SECTIONS = ("zero_optimization", "bf16", "fp16")


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for this run: the optional base file, then our fields, then `deepspeed.extra`.

    Refused with one line: a base file that is missing or not a JSON object, `extra` keys our fields own
    (OWNED_DEEPSPEED_KEYS), and ZeRO or mixed-precision settings DeepSpeed's own config models reject (a
    misspelt key), which DeepSpeed would otherwise raise only once the models are loaded."""
    ds = cfg.deepspeed
    base: dict = {}
    if ds.config_file:
        base = _deepspeed_file(Path(ds.config_file))
    owned = [key for key in OWNED_DEEPSPEED_KEYS if _has_key(ds.extra, key)]
    if owned:
        raise ConfigError(
            "; ".join(f"deepspeed.extra.{key}: use {OWNED_DEEPSPEED_KEYS[key]} instead" for key in owned)
        )
    for source, where in (
        (base, f"deepspeed.config_file {ds.config_file}: "),
        (ds.extra, "deepspeed.extra."),
    ):
        for section in DEEPSPEED_SECTIONS:
            if section in source and not isinstance(source[section], dict):
                raise ConfigError(f"{where}{section}: must be a mapping (got {source[section]!r})")
    t = cfg.train
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param:
        if ds.zero_stage != 3:
            raise ConfigError("deepspeed.offload_param needs deepspeed.zero_stage=3")
        zero["offload_param"] = {"device": "cpu"}
    out = {
        **base,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {**base.get("zero_optimization", {}), **zero},
        "bf16": {"enabled": t.dtype == "bfloat16"},
        "fp16": {"enabled": t.dtype == "float16"},
        # We pass torch's AdamW as a client optimizer; DeepSpeed must not swap in its own CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    out = _deep_merge(out, ds.extra)
    _check_deepspeed_sections(out, ds.extra, base, ds.config_file)
    return out


def check_device(device: str, field: str) -> None:
    """Refuse, naming `field`, a device this machine does not have (before a model is moved there)."""
    import torch  # imported here: a config is read by commands that never load torch

    try:
        kind = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{field}={device!r} is not a device (cpu, cuda, cuda:N, mps, ...)") from None
    if kind.type == "cpu":
        return
    module = getattr(torch, kind.type, None)
    has_any = module is not None and hasattr(module, "device_count") and module.is_available()
    count = module.device_count() if has_any else 0
    if count == 0 or (kind.index is not None and kind.index >= count):
        raise ConfigError(f"{field}={device}: this machine has {count} {kind.type} device(s)")


def check_train_device(cfg: Config) -> None:
    """Refuse a train.device or train.dtype this machine cannot run, asking torch and DeepSpeed's accelerator
    (the one the engine will use): without the check the first fails in the process group's setup (NCCL) and
    the second once the models are loaded (DeepSpeed's engine)."""
    if cfg.train.device != "auto":
        check_device(cfg.train.device, "train.device")
    supported = {"float16": "is_fp16_supported", "bfloat16": "is_bf16_supported"}.get(cfg.train.dtype)
    if supported is not None:
        from deepspeed.accelerator import get_accelerator  # imported here: deepspeed takes seconds to import

        accelerator = get_accelerator()
        if not getattr(accelerator, supported)():
            raise ConfigError(
                f"train.dtype={cfg.train.dtype}: DeepSpeed's {accelerator.device_name()} accelerator does "
                "not support it here (use float32, or a 16-bit type this device supports)"
            )


def _deepspeed_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"deepspeed.config_file not found: {path}")
    try:
        base = json.loads(path.read_text())
    except (ValueError, OSError) as err:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise ConfigError(f"deepspeed.config_file {path} is not valid JSON: {err}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"deepspeed.config_file {path} must hold a JSON object at the top level")
    return base


def _has_key(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _check_deepspeed_sections(out: dict, extra: dict, base: dict, config_file: str | None) -> None:
    """Validate the merged ZeRO and mixed-precision sections with the functions DeepSpeed reads them with,
    where the user set any, in `extra` or the `base` file (the sections our fields write alone are valid)."""
    if not any(section in extra or section in base for section in DEEPSPEED_SECTIONS):
        return  # no deepspeed import (seconds, and log lines on stdout) for commands that never run it
    from deepspeed.runtime.precision_config import get_bfloat16_config, get_float16_config
    from deepspeed.runtime.zero.config import get_zero_config

    readers = {"zero_optimization": get_zero_config, "bf16": get_bfloat16_config, "fp16": get_float16_config}
    for section in DEEPSPEED_SECTIONS:
        try:
            readers[section](out)
        except ValidationError as err:
            # Named where the key came from: `extra` when it set that key, else the base file (the keys our
            # fields set are valid).
            def name(loc, section=section):
                from_extra = config_file is None or (loc and loc[0] in extra.get(section, {}))
                origin = "deepspeed.extra." if from_extra else f"deepspeed.config_file {config_file}: "
                return origin + _dotted((section, *loc))

            raise ConfigError(_format_error(err, name)) from None


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
