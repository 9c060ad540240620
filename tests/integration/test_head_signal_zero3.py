"""The fused teacher form under ZeRO-3 on 2 ranks: head_signal on a partitioned teacher engine gathers its
head and gives the same loss as the plain model's logits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port

pytestmark = pytest.mark.slow

SCRIPT = """
import torch, deepspeed
from transformers import LlamaConfig, LlamaForCausalLM
from llmdistill.distributed import leave_process_group
from llmdistill.losses import get_loss
from llmdistill.signal import StudentOutput, TeacherSignal, head_signal

deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
positions = torch.arange(10).repeat(2, 1)
with torch.no_grad():
    reference = model(input_ids=ids, position_ids=positions).logits
ds_config = {"train_micro_batch_size_per_gpu": 1,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
engine, *_ = deepspeed.initialize(model=model, config=ds_config)
assert engine.module.lm_head.weight.shape != (256, 64), "the head is not partitioned"
student = StudentOutput(hidden=torch.randn(2, 10, 16), head=torch.nn.Linear(16, 256, bias=False))
batch = {"targets": ids.roll(-1, 1)}
for _ in range(2):  # twice: the second call runs on DeepSpeed's recorded trace
    signal = head_signal(engine, ids, positions)
    assert signal.head_weight.shape == (256, 64)
    fused, _ = get_loss("fkl")(student, signal, batch)
    plain, _ = get_loss("fkl")(student, TeacherSignal(logits=reference), batch)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
print("head_signal ok")
leave_process_group()  # as llmdistill's commands do: left to exit, gloo's threads may abort the process
"""


def test_head_signal_gathers_a_zero3_partitioned_head(tmp_path):
    script = tmp_path / "head_signal_zero3.py"
    script.write_text(SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("head_signal ok") == 2
