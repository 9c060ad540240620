"""The HTTP client of vLLM's OpenAI-compatible server: prompt scoring requests, round robin over urls,
timeouts and retries with exponential backoff, waiting for a server to start, and the check every server gets
(it serves the model asked for, with room for the run's sequences); each server's own checks live with its
source (vllm_server.check_servers, vllm_rollout_server.check_servers)."""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.request

from llmdistill.config import LLMDistillError
from llmdistill.teachers.base import TeacherUnavailable
from llmdistill.teachers.prompts import Prompt

log = logging.getLogger(__name__)


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


class ServerClient:
    """Requests to one or more vLLM servers, round-robin, with timeouts and retries with exponential backoff.

    Connection failures, timeouts and 5xx are retried (on the next url); a 4xx is the user's mistake and is
    raised at once with what to change. `role` names the server in messages (the teacher's, or the student's
    rollout server)."""

    def __init__(
        self,
        urls: list[str],
        model: str,
        timeout: float,
        retries: int,
        backoff: float,
        first: int = 0,
        role: str = "teacher",
    ):
        self.urls = [u.rstrip("/") for u in urls]
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.next = first % len(self.urls)
        self.role = role

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
                    f"{self.role} request failed ({failures[-1]}); "
                    f"retry {attempt + 1}/{self.retries} in {wait:.1f} s"
                )
                time.sleep(wait)
        message = (
            f"{self.role} server did not answer after {self.retries + 1} attempts in "
            f"{time.time() - t0:.0f} s (last: {failures[-1]})"
        )
        # Logged here too: when another rank stops first, the trainer only says "another rank" failed.
        log.error(message)
        raise TeacherUnavailable(message)

    def wait_healthy(self, field: str, start: str) -> None:
        """Every url answers /health, with the client's retries: a server still starting (one Slurm job with
        the trainer) is waited for, one never started is named in one line (`field`: the config field of the
        urls, `start`: the command that starts the server) before any weights load."""
        for url in self.urls:
            try:
                self.call("/health", url=url)
            except TeacherUnavailable as err:
                raise LLMDistillError(
                    f"{field}: no {self.role} server answers at {url} ({err}); start it with {start}"
                ) from None

    def score(self, prompts: list[Prompt], k: int) -> list[list[dict[int, float] | None]]:
        if not prompts:
            return []
        body = self.call("/v1/completions", completions_request(self.model, prompts, k))
        return parse_completions(body, len(prompts))

    def served_model(self, url: str, seq_len: int, field: str, fix: str) -> int | None:
        """`url` serves this client's model with room for `seq_len` tokens and the two a scored prompt
        adds; returns its max_model_len (None: not reported). `field` and `fix`: the setting and the remedy
        an error names."""
        served = {m["id"]: m for m in self.call("/v1/models", url=url).get("data", [])}
        if self.model not in served:
            raise LLMDistillError(f"{field}: {url} serves {sorted(served)}, not {self.model!r}; {fix}")
        max_len = served[self.model].get("max_model_len")
        if max_len is not None and max_len < seq_len + 2:
            raise LLMDistillError(
                f"{field}: {url} has max_model_len {max_len}, below data.seq_len + 2 = {seq_len + 2}; {fix}"
            )
        return max_len


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read() or b"{}")
        return body.get("error", {}).get("message") or body.get("message") or str(body)
    except (ValueError, OSError, AttributeError):
        return err.reason or ""


def explain_http_error(url: str, code: int, message: str, client: ServerClient) -> str:
    hint = ""
    if "prompt logprobs" in message.lower() or "max allowed" in message.lower():
        hint = " (teacher.server.top_k is above the server's --max-logprobs: lower it or restart the server)"
    elif "context length" in message.lower() or "maximum model length" in message.lower():
        hint = " (a prompt is above the server's --max-model-len: raise teacher.serve.max_model_len)"
    elif code == 404 and "does not exist" in message:
        hint = f" (teacher.server.served_model_name={client.model!r} is not what the server serves)"
    return f"{client.role} server {url} refused the request (HTTP {code}): {message}{hint}"
