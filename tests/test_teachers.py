"""vLLM teacher sources without vLLM: request building, the prompt_logprobs off-by-one, retries, the cache
encoding and manifest checks, on-policy batch construction. The real vLLM runs are in
tests/integration/test_vllm_teachers.py."""

import http.server
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmdistill.config import LLMDistillError, load_config
from llmdistill.signal import IGNORE_INDEX
from llmdistill.teachers import TeacherUnavailable
from llmdistill.teachers import prompts as pr
from llmdistill.teachers import vllm_cache as vc
from llmdistill.teachers import vllm_client as vcl
from llmdistill.teachers.on_policy import batch_draw, student_batch
from llmdistill.teachers.streaming import prefetched
from llmdistill.teachers.vllm_cache_build import build_cache
from llmdistill.teachers.vllm_serve import serve_command

X = IGNORE_INDEX


def _packed_batch():
    # Row 0: a document [10, 11, 12] ending inside the row (target -100 at its end), then [20, 21, 22] whose
    # next token (23) lies past the row. Row 1: one document, its next token 35.
    return {
        "input_ids": torch.tensor([[10, 11, 12, 20, 21, 22], [30, 31, 32, 33, 34, 35 - 1]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]),
        "targets": torch.tensor([[11, 12, X, 21, 22, 23], [31, 32, 33, 34, 34, 35]]),
    }


def test_each_document_is_its_own_prompt_and_the_final_target_is_appended():
    b = _packed_batch()
    prompts = pr.build_prompts(b["input_ids"], b["position_ids"], b["targets"])
    assert [(p.row, p.start, p.token_ids) for p in prompts] == [
        (0, 0, [10, 11, 12]),  # its last target is -100: nothing to append
        (0, 3, [20, 21, 22, 23]),  # the row's last position needs the next token
        (1, 0, [30, 31, 32, 33, 34, 34, 35]),
    ]
    assert pr.segment_bounds([0, 1, 0, 0, 1]) == [(0, 2), (2, 3), (3, 5)]


def _fake_prompt_logprobs(prompts, k):
    """vLLM's shape: None first; at j >= 1 the top-k plus the actual token prompt[j] (K + 1 entries when it is
    not among them), the actual token ranked first here so the mapping is visible."""
    out = []
    for p in prompts:
        per = [None]
        for j in range(1, len(p.token_ids)):
            d = {1000 + r: -2.0 - r for r in range(k)}
            d[p.token_ids[j]] = -0.5
            per.append(d)
        out.append(per)
    return out


def test_prompt_logprobs_j_is_the_signal_at_position_start_plus_j_minus_1():
    b, k = _packed_batch(), 3
    prompts = pr.build_prompts(b["input_ids"], b["position_ids"], b["targets"])
    sig = pr.signal_from_prompt_logprobs(prompts, _fake_prompt_logprobs(prompts, k), (2, 6), k)
    assert sig.topk_ids.shape == (2, 6, k) and sig.topk_ids.dtype == torch.int32
    valid = b["targets"] != X
    # The teacher's top token at t is the token at t + 1: the signal at t predicts targets[t].
    assert torch.equal(sig.topk_ids[..., 0][valid].long(), b["targets"][valid])
    # The K + 1-th entry vLLM adds is not in the top-k; sorted by log-prob.
    assert sig.topk_ids[0, 0].tolist() == [11, 1000, 1001]
    assert sig.topk_logprobs[0, 0].tolist() == [-0.5, -2.0, -3.0]
    # The actual next token's log-prob is kept per position; NaN where no prompt scores the position.
    assert torch.equal(sig.target_logprobs[valid], torch.full((int(valid.sum()),), -0.5))
    assert sig.target_logprobs[~valid].isnan().all()
    # A document's end (target -100) gets the filler: all mass in the tail.
    assert sig.topk_logprobs[0, 2].max().item() == pr.LOGP_FILLER


def test_request_and_response_formats():
    prompts = [pr.Prompt(0, 0, [1, 2, 3]), pr.Prompt(1, 0, [4, 5])]
    body = vcl.completions_request("teacher", prompts, 5)
    assert body["prompt"] == [[1, 2, 3], [4, 5]] and body["prompt_logprobs"] == 5
    assert body["max_tokens"] == 0 and body["echo"] is True
    answer = {
        "choices": [
            {"index": 1, "prompt_logprobs": [None, {"5": {"logprob": -1.0, "rank": 1}}]},
            {"index": 0, "prompt_logprobs": [None, {"2": {"logprob": -0.1}}, {"3": {"logprob": -0.2}}]},
        ]
    }
    parsed = vcl.parse_completions(answer, 2)
    assert parsed[0][1] == {2: -0.1} and parsed[1][1] == {5: -1.0}  # request order, integer ids
    with pytest.raises(LLMDistillError, match="2 prompts"):
        vcl.parse_completions({"choices": answer["choices"][:1]}, 2)


class _Scripted(http.server.BaseHTTPRequestHandler):
    replies: list = []

    def do_POST(self):
        code, body = self.replies.pop(0)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_5xx_is_retried_4xx_explained_and_a_dead_server_is_unavailable(scripted_server):
    server, url = scripted_server
    ok = {"choices": [{"index": 0, "prompt_logprobs": [None, {"7": {"logprob": -0.3}}]}]}
    _Scripted.replies = [(503, {"error": {"message": "busy"}}), (500, {}), (200, ok)]
    client = vcl.ServerClient([url], "teacher", timeout=5, retries=2, backoff=0.0)
    assert client.score([pr.Prompt(0, 0, [6, 7])], 1) == [[None, {7: -0.3}]]
    msg = "Requested prompt logprobs of 40, which is greater than max allowed: 20"
    _Scripted.replies = [(400, {"error": {"message": msg}})]
    with pytest.raises(LLMDistillError, match="above the server's --max-logprobs"):
        client.score([pr.Prompt(0, 0, [6, 7])], 40)
    _Scripted.replies = [(404, {"error": {"message": "The model `x` does not exist."}})]
    with pytest.raises(LLMDistillError, match="served_model_name"):
        client.score([pr.Prompt(0, 0, [6, 7])], 1)
    server.shutdown()
    server.server_close()
    dead = vcl.ServerClient([url, url], "teacher", timeout=1, retries=2, backoff=0.0)
    with pytest.raises(TeacherUnavailable, match="after 3 attempts"):
        dead.score([pr.Prompt(0, 0, [6, 7])], 1)


def test_urls_are_used_round_robin_starting_at_the_rank():
    client = vcl.ServerClient(["http://a", "http://b", "http://c"], "t", 1, 0, 0, first=4)
    seen = []
    client._once = lambda url, path, payload: seen.append(url) or {}
    for _ in range(4):
        client.call("/x")
    assert seen == ["http://b", "http://c", "http://a", "http://b"]


def test_prefetch_keeps_order_and_raises_at_the_failing_batch():
    def fetch(b):
        if b == 3:
            raise TeacherUnavailable("gone")
        return b, b * 10

    for depth in (0, 2):
        got = []
        with pytest.raises(TeacherUnavailable):
            for batch, signal in prefetched(iter(range(6)), fetch, depth, threading.Event()):
                got.append((batch, signal))
        assert got == [(0, 0), (1, 10), (2, 20)], depth


def test_closing_the_prefetch_waits_for_the_batch_being_scored():
    """A thread left inside torch's kernels at interpreter exit aborts a finished run: closing the stream
    (the trainer's close) returns only once the thread is done."""
    busy = threading.Event()

    def fetch(b):
        if b == 1:
            busy.set()
            time.sleep(0.5)
        return b, None

    pairs = prefetched(iter(range(4)), fetch, 1, threading.Event())
    assert next(pairs) == (0, None)
    assert busy.wait(5)
    pairs.close()
    assert not [t for t in threading.enumerate() if t.name == "teacher-prefetch"]


def test_serve_command_cpu_and_gpu():
    cfg = load_config(None, ["teacher.serve.port=9001", "teacher.server.top_k=32", "data.seq_len=128"])
    argv, env = serve_command(cfg, "/py", gpu=False)
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"] and "--enforce-eager" in argv
    assert argv[argv.index("--max-logprobs") + 1] == "32" and argv[argv.index("--max-model-len") + 1] == "130"
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    argv, env = serve_command(cfg, "/py", gpu=True)
    assert argv[:2] == ["vllm", "serve"] and env == {}


# ---------------------------------------------------------------------------------------------- cache


def test_cache_encoding_round_trip_and_size():
    rng = np.random.default_rng(0)
    for vocab in (2048, 152064):
        ids = rng.integers(0, vocab, size=(2, 5, 32))
        stored = vc.encode_ids(ids, vc.id_bytes_for(vocab))
        assert np.array_equal(vc.decode_ids(stored), ids)
    logits = rng.normal(size=(200, 2048)) * 3
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = -np.sort(-logp, axis=-1)[:, :32]
    back = vc.decode_logprobs(vc.encode_logprobs(top))
    # Rounded down by at most one step: probabilities never grow, so the tail mass never goes negative.
    assert np.all(back <= top + 1e-6) and np.all(top - back <= 1 / vc.LOGPROB_SCALE + 1e-6)
    true_tail = 1 - np.exp(top).sum(-1)
    tail = 1 - np.exp(back.astype(np.float64)).sum(-1)
    assert np.all(tail >= true_tail - 1e-9) and np.all(tail - true_tail <= 1 / vc.LOGPROB_SCALE)
    assert vc.bytes_per_token(32, 2048) == 128  # the goal: <= 128 bytes/token at K = 32
    assert vc.bytes_per_token(32, 152064) == 160


def _fake_score(prompts, k):
    # Deterministic stand-in for the engine: log-probs depend on the prompt's tokens only.
    out = []
    for p in prompts:
        per = [None]
        for j in range(1, len(p.token_ids)):
            g = torch.Generator().manual_seed(sum(p.token_ids[: j + 1]) * 31 + j)
            lp = torch.log_softmax(torch.randn(64, generator=g) * 3, -1)
            per.append({i: float(v) for i, v in enumerate(lp.tolist())})
        out.append(per)
    return out


CACHE = [
    "data.train.path=embedded:validation",
    "data.train.max_documents=2",
    "data.seq_len=32",
    "teacher.source=vllm_cache",
    "teacher.cache.top_k=8",
    "teacher.cache.shard_rows=16",
]


def test_cache_build_resume_read_and_refusals(tmp_path, monkeypatch):
    from llmdistill import session
    from llmdistill.data import collate
    from llmdistill.models import EMBEDDED_TEACHER

    cfg = load_config(None, [*CACHE, f"teacher.cache.dir={tmp_path}/straight", f"run.output_dir={tmp_path}"])
    build_cache(cfg, score=_fake_score)
    # Interrupted after the second shard, then started again: the same files, byte for byte.
    calls = []

    def failing(prompts, k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return _fake_score(prompts, k)

    cfg2 = load_config(None, [*CACHE, f"teacher.cache.dir={tmp_path}/resumed", f"run.output_dir={tmp_path}"])
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg2, score=failing)
    assert not (tmp_path / "resumed" / vc.COMPLETE).exists()
    plan = session.preflight(cfg2)
    with pytest.raises(LLMDistillError, match="partial cache"):
        vc.VLLMCacheTeacher(cfg2, plan.teacher_tok, 2048, str(EMBEDDED_TEACHER))
    build_cache(cfg2, score=_fake_score)
    straight = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert straight == sorted(p.name for p in (tmp_path / "resumed").iterdir()) and len(straight) > 3
    for name in straight:
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name

    # Reading back: any row order, equal to the live signal within one quantisation step.
    dataset, _ = session.build_datasets(cfg, plan)
    reader = vc.VLLMCacheTeacher(cfg, plan.teacher_tok, 2048, str(EMBEDDED_TEACHER))
    batch = collate([dataset[i] for i in (7, 0, 20)])
    prompts = pr.build_prompts(batch["input_ids"], batch["position_ids"], batch["targets"])
    live = pr.signal_from_prompt_logprobs(prompts, _fake_score(prompts, 8), (3, 32), 8)
    got = reader.signal(batch)
    valid = batch["targets"] != X
    assert torch.equal(got.topk_ids[valid], live.topk_ids[valid])
    assert (got.topk_logprobs - live.topk_logprobs)[valid].abs().max() <= 1 / vc.LOGPROB_SCALE + 1e-6
    # Fewer K than cached is fine (top-k is sorted); more is refused, as is another teacher dtype or dataset.
    fewer = load_config(None, [*CACHE, "teacher.cache.top_k=4", f"teacher.cache.dir={tmp_path}/straight"])
    assert (
        vc.VLLMCacheTeacher(fewer, plan.teacher_tok, 2048, str(EMBEDDED_TEACHER))
        .signal(batch)
        .topk_ids.shape[-1]
        == 4
    )
    for bad, field in [
        ("teacher.cache.top_k=16", "k (cache has 8"),
        ("teacher.dtype=bfloat16", "teacher"),
        ("data.train.max_documents=3", "dataset"),
        ("data.seq_len=64", "seq_len"),
    ]:
        wrong = load_config(None, [*CACHE, bad, f"teacher.cache.dir={tmp_path}/straight"])
        with pytest.raises(LLMDistillError, match="built for another run") as err:
            vc.VLLMCacheTeacher(wrong, plan.teacher_tok, 2048, str(EMBEDDED_TEACHER))
        assert field in str(err.value), (bad, err.value)
    # A row that is not in the cache is an error, never a silent mismatch.
    batch["input_ids"][0, 0] += 1
    with pytest.raises(LLMDistillError, match="not in the cache"):
        reader.signal(batch)
    # Building into a directory made for another run is refused without --overwrite.
    other = load_config(None, [*CACHE, "teacher.cache.top_k=4", f"teacher.cache.dir={tmp_path}/straight"])
    with pytest.raises(LLMDistillError, match="--overwrite"):
        build_cache(other, score=_fake_score)


CHAT_CACHE = [
    "teacher.path=embedded:chat",
    "data.train.path=embedded:chat-validation",
    "data.train.format=messages",
    "data.train.max_documents=12",
    "data.validation=null",
    "data.seq_len=128",
    "teacher.source=vllm_cache",
    "teacher.cache.top_k=8",
    "teacher.cache.shard_rows=4",
]


def test_cache_of_chat_data_stores_exactly_the_answer_positions(tmp_path):
    import os

    from safetensors.numpy import load_file

    from llmdistill import session
    from llmdistill.data import collate
    from llmdistill.teachers import build_teacher_source

    overrides = [*CHAT_CACHE, f"teacher.cache.dir={tmp_path}/cache", f"run.output_dir={tmp_path}"]
    cfg = load_config(None, overrides)
    old_umask = os.umask(0o022)
    try:
        build_cache(cfg, score=_fake_score)
    finally:
        os.umask(old_umask)
    plan = session.preflight(cfg)
    dataset, _ = session.build_datasets(cfg, plan)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    shards = [load_file(str(tmp_path / "cache" / name)) for name in manifest["shards"]]
    for name in manifest["shards"]:  # the umask's mode, not safetensors' 0600
        assert (tmp_path / "cache" / name).stat().st_mode & 0o777 == 0o644
    # Each row keeps exactly its answer positions; the chat template and the user's text are dropped.
    targets = dataset[:]["targets"]
    answers = targets != X
    assert 0 < int(answers.sum()) < answers.numel() // 2
    assert sum(len(s["ids"]) for s in shards) == int(answers.sum())
    per_row = np.concatenate([np.diff(s["row_offsets"]) for s in shards])
    assert np.array_equal(per_row, answers.sum(1).numpy())
    # The bytes on disk: the top-k of the answer positions only (a /2 cache held every position).
    top_k_bytes = sum(s["ids"].nbytes + s["logprobs"].nbytes for s in shards)
    assert top_k_bytes == int(answers.sum()) * manifest["encoding"]["bytes_per_token"]
    on_disk = sum((tmp_path / "cache" / n).stat().st_size for n in manifest["shards"])
    # Beyond the top-k: row hashes, offsets and each file's header, a few hundred bytes a shard.
    every_position = answers.numel() * manifest["encoding"]["bytes_per_token"]
    assert on_disk - top_k_bytes < 1024 * len(shards) and on_disk < every_position / 2
    # Read back in another order: equal to the live signal on the answers, the filler elsewhere.
    reader = build_teacher_source(cfg, None, frozenset({"teacher"}))
    batch = collate([dataset[i] for i in (5, 0, 3)])
    live = pr.score_batch(_fake_score, batch, 8)
    got = reader.signal(batch)
    valid = batch["targets"] != X
    assert torch.equal(got.topk_ids[valid], live.topk_ids[valid])
    assert (got.topk_logprobs - live.topk_logprobs)[valid].abs().max() <= 1 / vc.LOGPROB_SCALE + 1e-6
    assert (got.topk_logprobs[~valid] == pr.LOGP_FILLER).all() and (got.topk_ids[~valid] == 0).all()
    # The live signal is not converted outside the answers either.
    assert (live.topk_logprobs[~valid] == pr.LOGP_FILLER).all()
    # A cache of the earlier format (every position stored) is refused with one line naming the formats.
    path = tmp_path / "cache" / "manifest.json"
    path.write_text(json.dumps(dict(manifest, format="llmdistill-teacher-cache/2")))
    with pytest.raises(LLMDistillError, match="format 'llmdistill-teacher-cache/2', this version reads"):
        build_teacher_source(cfg, None, frozenset({"teacher"}))


def test_prompts_end_at_the_last_answer_token():
    # One conversation: template/user tokens 1-4, answer 5-6 (+ EOS 7), template tokens 8-9 after it.
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]])
    targets = torch.tensor([[X, X, X, 5, 6, 7, X, X, X]])
    prompts = pr.build_prompts(ids, torch.arange(9)[None], targets)
    assert [(p.start, p.token_ids) for p in prompts] == [(0, [1, 2, 3, 4, 5, 6, 7])]


# ---------------------------------------------------------------------------------------------- on-policy


def test_student_batch_masks_the_prompt_and_what_follows_eos():
    eos = 0
    sampled = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, eos, 1, 1, 1]])
    b = student_batch(sampled, prompt_tokens=3, seq_len=6, eos_id=eos)
    assert b["input_ids"].tolist() == sampled[:, :6].tolist()
    # Prompt targets masked (the first generated token, at t = 2, is the first target).
    assert b["targets"][0].tolist() == [X, X, 8, 9, 10, 11]
    # Row 1 wrote EOS at index 3: it is the last target; the padding after it is its own "document".
    assert b["targets"][1].tolist() == [X, X, eos, X, X, X]
    assert b["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1]
    prompts = pr.build_prompts(b["input_ids"], b["position_ids"], b["targets"])
    assert [(p.row, p.start, p.token_ids) for p in prompts] == [
        (0, 0, [5, 6, 7, 8, 9, 10, 11]),
        (1, 0, [5, 6, 7, eos]),
    ]


def test_student_batch_masks_after_the_last_written_token_when_fewer_are_asked_for():
    eos = 0
    sampled = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, eos, 1]])  # prompt 3, 2 new tokens, window 6
    b = student_batch(sampled, prompt_tokens=3, seq_len=6, eos_id=eos)
    assert b["targets"][0].tolist() == [X, X, 8, 9, X, X]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0]
    assert b["targets"][1].tolist() == [X, X, eos, X, X, X]


CHAT_ON_POLICY = [
    "teacher.path=embedded:chat",
    "data.train.path=embedded:chat-validation",
    "data.train.format=messages",
    "data.train.max_documents=4",
    "data.validation=null",
    "data.seq_len=256",
    "data.pack=false",
    "teacher.source=on_policy",
    "teacher.on_policy.scorer=hf",
    "teacher.on_policy.fraction=1.0",
    "teacher.on_policy.temperature=0",
    "teacher.on_policy.max_new_tokens=6",
]


def test_on_policy_with_chat_data_writes_the_answer_after_the_chat_prompt(tmp_path):
    from llmdistill import session
    from llmdistill.data import collate
    from llmdistill.models import load_model
    from llmdistill.teachers import check_teacher_source
    from llmdistill.teachers.on_policy import OnPolicyTeacher

    packed = load_config(None, [*CHAT_ON_POLICY, "data.pack=true"])
    with pytest.raises(LLMDistillError, match="needs data.pack: false"):
        check_teacher_source(packed, frozenset({"teacher"}))
    cfg = load_config(None, [*CHAT_ON_POLICY, f"run.output_dir={tmp_path}"])
    plan = session.preflight(cfg)
    dataset, _ = session.build_datasets(cfg, plan)
    model = load_model(plan.teacher_path, "float32").eval()  # the student here: its greedy answer is known
    source = OnPolicyTeacher(cfg, plan.teacher_tok, model, teacher=model)
    batch = collate([dataset[i] for i in range(3)])
    out = source.transform(dict(batch))
    for row in range(3):
        # The answer starts after the first trained position: the chat prompt, assistant header included.
        start = int((batch["targets"][row] != X).nonzero()[0]) + 1
        assert 0 < start < 256
        assert torch.equal(out["input_ids"][row, :start], batch["input_ids"][row, :start])
        # Prompt tokens are never targets; the generated tokens are, from the answer start on.
        assert (out["targets"][row, : start - 1] == X).all()
        trained = (out["targets"][row] != X).nonzero().flatten()
        assert int(trained[0]) == start - 1 and 1 <= len(trained) <= 6
        assert torch.equal(trained, torch.arange(start - 1, start - 1 + len(trained)))
        written = out["targets"][row, trained]
        assert torch.equal(out["input_ids"][row, start : start + len(trained) - 1], written[:-1])
        # What the student writes greedily from that prompt.
        greedy = model.generate(
            input_ids=batch["input_ids"][row : row + 1, :start], max_new_tokens=6, do_sample=False
        )[0, start:]
        assert torch.equal(written, greedy[: len(written)])
    signal = source.signal(out)  # the in-process teacher's fused form: final hidden states and head
    assert signal.final_hidden.shape[:2] == out["input_ids"].shape


def test_rollout_weights_lag_and_sync_every():
    from llmdistill.teachers.on_policy import weights_step

    assert [weights_step(k, 0, 0, 1) for k in range(4)] == [0, 1, 2, 3]
    assert [weights_step(k, 0, 1, 1) for k in range(4)] == [0, 0, 1, 2]
    assert [weights_step(k, 0, 0, 2) for k in range(5)] == [0, 0, 2, 2, 4]
    assert [weights_step(k, 0, 1, 2) for k in range(5)] == [0, 0, 0, 2, 2]
    # Resumed at step 3: the checkpoint's weights are the oldest there are.
    assert [weights_step(k, 3, 1, 1) for k in range(3, 6)] == [3, 3, 4]


def test_on_policy_settings_that_cannot_run_are_refused():
    from llmdistill.teachers.on_policy import check_on_policy

    base = ["teacher.source=on_policy", "data.seq_len=64", "teacher.on_policy.prompt_tokens=16"]
    check_on_policy(load_config(None, [*base, "teacher.on_policy.max_new_tokens=49"]))
    for extra, message in [
        (["teacher.on_policy.max_new_tokens=50"], "max_new_tokens=50 is above"),
        (["teacher.on_policy.lag=1"], "lag=1 needs teacher.on_policy.generator=vllm"),
        (
            [
                "teacher.on_policy.generator=vllm",
                "teacher.on_policy.lag=1",
                "teacher.on_policy.scorer=hf",
                "deepspeed.zero_stage=3",
            ],
            "collective",
        ),
        (["teacher.on_policy.prompt_tokens=64"], "must be below data.seq_len"),
    ]:
        with pytest.raises(LLMDistillError, match=message):
            check_on_policy(load_config(None, [*base, *extra]))


def test_lora_student_weights_are_the_merged_weights_under_hf_names(tiny_llama):
    import copy

    from llmdistill.config import PeftConfig
    from llmdistill.models import wrap_peft
    from llmdistill.teachers.vllm_generator import student_weights

    student = wrap_peft(copy.deepcopy(tiny_llama), PeftConfig(r=4))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters a real update
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    got = {name: w.clone() for name, w in student_weights(student)}
    merged = copy.deepcopy(student).merge_and_unload().state_dict()
    tied = {"lm_head.weight"} if tiny_llama.config.tie_word_embeddings else set()
    assert set(got) == set(merged) - tied
    for name, weight in got.items():
        assert torch.allclose(weight, merged[name], atol=1e-6), name
    moved = [n for n in got if not torch.equal(got[n], dict(tiny_llama.named_parameters())[n])]
    assert moved and all("proj" in n for n in moved)  # the adapted projections, merged


def test_rollout_weight_slices_of_every_rank_give_back_the_whole_weights(tiny_llama, tmp_path):
    """Each rank keeps and writes 1/world of every pushed weight; reading all ranks' files back gives the
    weights exactly, and a resume under another world size re-slices them."""
    from llmdistill.teachers.on_policy import kept_slices, read_slices, write_slices

    weights = {name: p.detach() for name, p in tiny_llama.named_parameters()}
    world = 3
    paths = []
    for rank in range(world):
        slices = {}
        passed = dict(kept_slices(iter(weights.items()), rank, world, slices))
        assert all(passed[n] is weights[n] for n in weights)  # the engine still gets every full weight
        assert sum(t.numel() for t, _ in slices.values()) <= sum(w.numel() for w in weights.values()) // 2
        paths.append(tmp_path / f"rank{rank}.safetensors")
        write_slices(slices, paths[-1])
    again = {}
    back = dict(kept_slices(read_slices(paths), 1, 2, again))
    assert set(back) == set(weights)
    for name, weight in weights.items():
        assert torch.equal(back[name], weight), name
        assert torch.equal(again[name][0], weight.reshape(-1).tensor_split(2)[1]), name
    with pytest.raises(LLMDistillError, match="rollout weights .*rank3.safetensors are missing"):
        next(read_slices([*paths, tmp_path / "rank3.safetensors"]))


def test_on_policy_choice_is_a_function_of_the_batch():
    ids = torch.arange(64).reshape(4, 16)
    assert batch_draw(ids, 0) == batch_draw(ids.clone(), 0)
    assert batch_draw(ids, 0) != batch_draw(ids, 1)
    draws = [batch_draw(torch.randint(0, 2048, (2, 8)), 0)[0] for _ in range(400)]
    assert abs(sum(d < 0.25 for d in draws) / 400 - 0.25) < 0.08


def test_on_policy_refuses_zero3_and_vllm_sources_refuse_hidden_states():
    from llmdistill.teachers import build_teacher_source, check_teacher_source
    from llmdistill.teachers.on_policy import OnPolicyTeacher

    cfg = load_config(None, ["teacher.source=on_policy", "deepspeed.zero_stage=3"])
    with pytest.raises(LLMDistillError, match="zero_stage=3.*use teacher.on_policy.generator=vllm"):
        OnPolicyTeacher(cfg, None, student=object())
    with pytest.raises(LLMDistillError, match="zero_stage=3"):  # preflight refuses it before any weights
        check_teacher_source(cfg, frozenset({"teacher"}))
    vllm = ["teacher.source=on_policy", "deepspeed.zero_stage=3", "teacher.on_policy.generator=vllm"]
    check_teacher_source(load_config(None, vllm), frozenset({"teacher"}))
    cfg = load_config(None, ["teacher.source=vllm_server"])
    with pytest.raises(LLMDistillError, match="hidden states"):
        build_teacher_source(cfg, None, frozenset({"teacher", "teacher_hidden"}))


def test_config_needs_a_cache_dir_for_the_cache_source():
    with pytest.raises(LLMDistillError, match="teacher.cache.dir"):
        load_config(None, ["teacher.source=vllm_cache"])
    assert math.isclose(load_config(None, ["teacher.on_policy.fraction=1"]).teacher.on_policy.fraction, 1.0)


# ---------------------------------------------------------------------------------------------- protocol


def test_an_old_flat_teacher_key_names_its_new_place(tmp_path):
    from llmdistill.config import ConfigError

    for override, moved in [
        ("teacher.urls=[http://x:1]", "teacher.urls moved to teacher.server.urls"),
        ("teacher.top_k=8", "teacher.top_k moved to teacher.server.top_k"),
        ("teacher.serve_port=9000", "teacher.serve_port moved to teacher.serve.port"),
    ]:
        with pytest.raises(ConfigError, match=moved):
            load_config(None, [override])
    old = tmp_path / "old.yaml"
    old.write_text("teacher:\n  source: vllm_cache\n  cache_dir: /tmp/c\n  cache_shard_rows: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(old)
    assert str(err.value) == (
        "teacher.cache_dir moved to teacher.cache.dir; "
        "teacher.cache_shard_rows moved to teacher.cache.shard_rows"
    )
    new = load_config(
        None, ["teacher.source=vllm_cache", "teacher.cache.dir=/tmp/c", "teacher.server.prefetch=0"]
    )
    assert new.teacher.cache.dir == "/tmp/c" and new.teacher.server.prefetch == 0


def test_sources_declare_capabilities_and_refuse_what_they_cannot_serve():
    from llmdistill.teachers import check_teacher_source
    from llmdistill.teachers.base import source_class

    assert source_class("hf").capabilities.full_logits and source_class("hf").capabilities.hidden_states
    assert source_class("vllm_server").capabilities.can_fail
    assert not source_class("vllm_cache").capabilities.can_fail
    for name in ("hf", "vllm_server", "vllm_cache"):
        cfg = load_config(None, [f"teacher.source={name}", "teacher.cache.dir=c"])
        check_teacher_source(cfg, frozenset({"teacher"}), cross_tokenizer=True)
    on_policy = load_config(None, ["teacher.source=on_policy"])
    with pytest.raises(LLMDistillError, match="on_policy cannot serve a cross-tokenizer loss"):
        check_teacher_source(on_policy, frozenset({"teacher"}), cross_tokenizer=True)
    check_teacher_source(on_policy, frozenset({"teacher"}), cross_tokenizer=False)
    check_teacher_source(on_policy, frozenset({"student_hidden"}), cross_tokenizer=True)  # no teacher needed


def test_stream_prefetches_in_order_and_reports_only_consumed_batches():
    from llmdistill.signal import TeacherSignal
    from llmdistill.teachers import TeacherSource

    class Doubling(TeacherSource):
        prefetch = 2

        def __init__(self):
            self.scored = []

        def signal(self, batch):
            self.scored.append(int(batch["input_ids"][0, 0]))
            return TeacherSignal(logits=batch["input_ids"].float() * 2)

    source, consumed = Doubling(), []
    source.on_consumed = lambda batch: consumed.append(int(batch["input_ids"][0, 0]))
    batches = ({"input_ids": torch.full((1, 2), i)} for i in range(6))
    pairs = source.stream(batches, "cpu")
    for i in range(3):
        batch, signal = next(pairs)
        assert int(batch["input_ids"][0, 0]) == i and torch.equal(signal.logits, batch["input_ids"] * 2.0)
    # Batch 2 is still being trained on: only 0 and 1 were used, though later ones are scored ahead (by a
    # thread: give it time on a loaded machine).
    deadline = time.monotonic() + 30
    while len(source.scored) <= 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert consumed == [0, 1] and len(source.scored) > 3
    source.close()
    assert consumed == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- cross-tokens


def _cross_batch(tmp_path, n=4, seq_len=32):
    """Rows of a cross-tokenizer dataset (SentencePiece student, embedded BPE teacher), via the session."""
    from llmdistill import session
    from llmdistill.data import collate

    docs = tmp_path / "docs.jsonl"
    text = (Path(json.__file__).read_text()[:6000], Path(threading.__file__).read_text()[:6000])
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    cfg = load_config(
        "configs/tiny/alm.yaml",
        [
            f"data.train.path={docs}",
            f"data.seq_len={seq_len}",
            "data.validation=null",
            f"run.output_dir={tmp_path}",
        ],
    )
    plan = session.preflight(cfg)
    dataset, _ = session.build_datasets(cfg, plan)
    return cfg, plan, dataset, collate([dataset[i] for i in range(n)])


def _vllm_like_scorer(model, k):
    """What vLLM's prompt_logprobs give, from an HF model: per prompt, None first, then the top k plus the
    actual next token (k + 1 entries when it ranks below k)."""

    @torch.no_grad()
    def score(prompts, k_asked):
        assert k_asked == k
        out = []
        for p in prompts:
            ids = torch.tensor([p.token_ids])
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
            per = [None]
            for j in range(1, len(p.token_ids)):
                top = logp[j - 1].topk(k)
                entry = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                entry[p.token_ids[j]] = float(logp[j - 1, p.token_ids[j]])
                per.append(entry)
            out.append(per)
        return out

    return score


def test_cross_tokenizer_batches_are_scored_on_the_teachers_tokens_and_alm_agrees(tmp_path):
    from llmdistill.losses import get_loss
    from llmdistill.models import load_model, model_from_config
    from llmdistill.signal import forward_to_head
    from llmdistill.teachers.hf import HFTeacher

    cfg, plan, _, batch = _cross_batch(tmp_path)
    ids, pos, targets = pr.scored_tokens(batch)
    assert torch.equal(ids, batch["teacher_input_ids"]) and ids.shape != batch["input_ids"].shape
    # The teacher's own next tokens, never across a document start (position 0) or past the window.
    assert (targets[:, -1] == X).all()
    inside = pos[:, 1:] != 0
    assert torch.equal(targets[:, :-1][inside], ids[:, 1:][inside]) and (targets[:, :-1][~inside] == X).all()

    teacher = load_model(plan.teacher_path, "float32").eval()
    k = 2  # small: many actual tokens rank below the top 2, and alm must still see their log-probs
    sparse = pr.score_batch(_vllm_like_scorer(teacher, k), batch, k)
    full = HFTeacher(teacher).signal(batch)
    assert sparse.topk_ids.shape == (*ids.shape, k) and sparse.target_logprobs.shape == ids.shape
    used = batch["teacher_chunks"] >= 0
    in_top = (sparse.topk_ids.long() == pr.scored_tokens(batch)[2][..., None]).any(-1)
    assert (used & ~in_top).sum() > 10  # the case that made chunks "missing" before
    torch.manual_seed(0)
    student_model = model_from_config(plan.student_config, "float32")
    with torch.no_grad():
        student = forward_to_head(student_model, batch)
    got, got_metrics = get_loss("alm")(student, sparse, batch)
    want, want_metrics = get_loss("alm")(student, full, batch)
    assert got_metrics["alm/chunks_per_seq"] == want_metrics["alm/chunks_per_seq"] > 0
    assert torch.allclose(got, want, rtol=1e-4), (got.item(), want.item())
    # A signal of the student's tokens is refused, not read at misaligned rows.
    wrong = pr.signal_from_prompt_logprobs([], [], tuple(batch["input_ids"].shape), k)
    with pytest.raises(LLMDistillError, match="not the teacher's own tokens"):
        get_loss("alm")(student, wrong, batch)


def test_cross_tokenizer_cache_holds_teacher_positions_and_actual_token_logprobs(tmp_path):
    cfg, plan, dataset, batch = _cross_batch(tmp_path)
    overrides = [
        f"data.train.path={cfg.data.train.path}",
        "data.seq_len=32",
        "data.validation=null",
        "teacher.source=vllm_cache",
        f"teacher.cache.dir={tmp_path}/cache",
        "teacher.cache.top_k=4",
        f"run.output_dir={tmp_path}",
    ]
    cached_cfg = load_config("configs/tiny/alm.yaml", overrides)

    def score(prompts, k):
        # As vLLM does: the actual token is always among the entries (here mostly outside the top k).
        out = _fake_score(prompts, k)
        for p, per in zip(prompts, out, strict=True):
            for j in range(1, len(per)):
                per[j].setdefault(p.token_ids[j], -20.0 - j / 64)
        return out

    build_cache(cached_cfg, score=score)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["cross_tokenizer"] and manifest["encoding"]["bytes_per_token"] == 4 * 4 + 4
    from llmdistill.teachers import build_teacher_source

    reader = build_teacher_source(cached_cfg, None, frozenset({"teacher"}))
    got = reader.signal(batch)
    live = pr.score_batch(score, batch, 4)
    valid = pr.scored_tokens(batch)[2] != X
    assert not live.target_logprobs[valid].isnan().any()
    assert got.topk_ids.shape == (*batch["teacher_input_ids"].shape, 4)
    assert torch.equal(got.topk_ids[valid], live.topk_ids[valid])
    assert torch.equal(got.target_logprobs[valid], live.target_logprobs[valid])  # float32: exact
    assert got.target_logprobs[~valid].isnan().all()
    # The same cache for a same-tokenizer batch is an error, not a misread.
    plain = {k: batch[k] for k in ("input_ids", "position_ids", "targets")}
    with pytest.raises(LLMDistillError, match="not cross-tokenizer"):
        reader.signal(plain)


def test_the_in_process_teacher_checks_its_fused_form_on_the_first_batch_only(
    tiny_llama, softcapped_gemma2, monkeypatch
):
    """The check that logits are the head's output waits for the device: it runs once per teacher, and a
    teacher that fails it (Gemma-2's soft-capping) gives full logits from then on."""
    from llmdistill import signal as signal_module
    from llmdistill.teachers.hf import HFTeacher

    checks = []
    allclose = torch.allclose

    def counted(*args, **kwargs):
        checks.append(1)
        return allclose(*args, **kwargs)

    monkeypatch.setattr(signal_module.torch, "allclose", counted)
    batch = {"input_ids": torch.randint(0, 2048, (2, 8)), "position_ids": torch.arange(8).repeat(2, 1)}
    teacher = HFTeacher(tiny_llama)
    signals = [teacher.signal(batch) for _ in range(3)]
    assert len(checks) == 1 and all(s.final_hidden is not None and s.logits is None for s in signals)

    teacher = HFTeacher(softcapped_gemma2)
    signals = [teacher.signal(batch) for _ in range(2)]
    assert not teacher.fused and all(s.logits is not None and s.final_hidden is None for s in signals)


def test_only_the_expected_reload_warnings_are_dropped():
    import logging

    from llmdistill.teachers.vllm_generator import ExpectedReloadWarnings

    def passes(layer, tied):
        record = logging.LogRecord(
            "vllm", logging.WARNING, "layerwise.py", 1, "%s: Failed to load weights", (layer,), None
        )
        return ExpectedReloadWarnings(tied).filter(record)

    assert not passes("RotaryEmbedding", tied=False) and not passes("Llama3RotaryEmbedding", tied=False)
    assert not passes("ParallelLMHead", tied=True) and passes("ParallelLMHead", tied=False)
    assert passes("QKVParallelLinear", tied=True)
