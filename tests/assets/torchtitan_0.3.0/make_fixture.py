"""Make the torchtitan 0.3.0 fixture: a job and its checkpoints, written by torchtitan's own trainer.

Run in an environment with torchtitan 0.3.0 and torch 2.14 (not lockstep's), one process:

    python -m venv /tmp/ttv && /tmp/ttv/bin/pip install torch==2.14.1 torchtitan==0.3.0
    /tmp/ttv/bin/torchrun --nproc_per_node 1 tests/assets/torchtitan_0.3.0/make_fixture.py \
        ../shared/data/tokenizer-2k ../shared/data/tinyshakespeare.txt tests/assets/torchtitan_0.3.0

torchtitan is started the way its users start it (``ConfigManager().parse_args`` on the command line
its ``torchtitan.train`` takes, then ``config.build()``, ``train()``, ``close()``), on its llama3 debug
model reduced to 2 layers of width 32 so the fixture stays small. Four things are adapted for a CPU,
where torchtitan 0.3.0 expects an accelerator:
- its device bookkeeping (device name, memory statistics) is answered by a CPU shim;
- its FlexAttention has no backward on the CPU, so the same block mask (``mask_mod``, torchtitan's
  packed-document causal mask) is materialised and applied by PyTorch's SDPA;
- the parameters are computed in fp32 (``--training.mixed_precision_param float32``; torchtitan 0.3
  applies FSDP's bf16 policy even on one rank), so that a next-step loss can be compared to 1e-6;
- one long document is the data set, so every window lies inside a document: torchtitan 0.3.0 restarts
  RoPE positions at each document, lockstep does not (docs/from-torchtitan.md), and with one document both
  use positions 0..seq_len-1.

It writes, into OUT:
- ``job.json``: the job as torchtitan resolved it (``--debug.save_config_file``);
- ``checkpoint/step-4``: a full checkpoint (model, optimizer, lr scheduler, data loader, train state);
- ``checkpoint/step-8``: model only (``--checkpoint.last_save_model_only``);
- ``steps.json``: each step's loss and learning rate as torchtitan logged them;
- ``batches.safetensors``: the inputs and labels torchtitan trained on at steps 5 to 8.
"""

import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import torchtitan.tools.utils as titan_utils
from safetensors.torch import save_file

SEQ_LEN, BATCH, STEPS, INTERVAL = 64, 2, 8, 4


class _CPUDevice(types.SimpleNamespace):
    def __getattr__(self, name):
        return getattr(torch.cpu, name)


titan_utils.device_type = "cpu"
titan_utils.device_module = _CPUDevice(
    get_device_name=lambda device=None: "cpu",
    get_device_properties=lambda device=None: types.SimpleNamespace(total_memory=1 << 34, name="cpu"),
    reset_peak_memory_stats=lambda device=None: None,
    empty_cache=lambda: None,
    memory_stats=lambda device=None: {
        "active_bytes.all.peak": 0,
        "reserved_bytes.all.peak": 0,
        "num_alloc_retries": 0,
        "num_ooms": 0,
    },
    set_device=lambda device: None,
    current_device=lambda: 0,
)

from torch.nn.attention.flex_attention import create_mask  # noqa: E402
from torchtitan.config import ConfigManager  # noqa: E402
from torchtitan.models import llama3  # noqa: E402
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim  # noqa: E402
from torchtitan.models.common.attention import FlexAttention  # noqa: E402
from torchtitan.trainer import Trainer  # noqa: E402


def _dense_flex(q, k, v, *, score_mod, block_mask, scale, enable_gqa, return_aux, kernel_options):
    assert score_mod is None and not return_aux.lse
    B, _, L, _ = q.shape
    mask = create_mask(block_mask.mask_mod, B, None, L, k.shape[2], device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa), None


FlexAttention.compiled_flex_attn = staticmethod(_dense_flex)


def _tiny(attn_backend: str = "flex", tp_gemm_backend: str = "default") -> llama3.Llama3Model.Config:
    dim, n_heads, n_kv_heads, n_layers, vocab = 32, 4, 2, 2, 2048
    return llama3.Llama3Model.Config(
        dim=dim,
        vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=llama3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=llama3._output_linear_init(dim)),
        layers=llama3._build_llama3_layers(
            fuse_qkv=True,
            n_layers=n_layers,
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            hidden_dim=compute_ffn_hidden_dim(dim, multiple_of=64),
            rope=ComplexRoPE.Config(dim=dim // n_heads, max_seq_len=131072, theta=500000, scaling="llama"),
            attn_backend=attn_backend,
            tp_gemm_backend=tp_gemm_backend,
        ),
    )


llama3.llama3_configs["tiny"] = _tiny


def fixture_tiny() -> Trainer.Config:
    """torchtitan's llama3_debugmodel job with the model reduced (its config_registry entry point)."""
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    config = llama3_debugmodel()
    config.model_spec = llama3.model_registry("tiny")
    return config


def main(tokenizer: Path, text: Path, out: Path) -> None:
    work = Path(tempfile.mkdtemp())
    (work / "data").mkdir()
    document = text.read_text(encoding="utf-8")[:60_000]
    (work / "data" / "train.json").write_text(json.dumps({"text": document}) + "\n")
    config = ConfigManager().parse_args([
        "--module", __name__, "--config", "fixture_tiny",
        "--hf_assets_path", str(tokenizer.resolve()),
        "--dataloader.dataset_path", str(work / "data"),
        "--training.steps", str(STEPS), "--training.local_batch_size", str(BATCH),
        "--training.seq_len", str(SEQ_LEN), "--training.mixed_precision_param", "float32", "--debug.seed", "7",
        "--checkpoint.enable", "--checkpoint.interval", str(INTERVAL), "--checkpoint.last_save_model_only",
        "--validator.freq", "1000", "--dump_folder", str(work / "run"), "--debug.save_config_file", "job.json",
    ])  # fmt: skip
    steps, batches = [], {}
    trainer = config.build()
    original = trainer.forward_backward_step

    def recording_step(*, input_dict, labels, global_valid_tokens):
        loss = original(input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens)
        step = trainer.step
        if step > INTERVAL:
            batches[f"step{step}.input"] = input_dict["input"].clone().contiguous()
            batches[f"step{step}.positions"] = input_dict["positions"].clone().contiguous()
            batches[f"step{step}.labels"] = labels.clone().contiguous()
        steps.append({"step": step, "loss": float(loss), "lr": trainer.lr_schedulers.schedulers[0].get_last_lr()[0]})
        return loss

    trainer.forward_backward_step = recording_step
    try:
        trainer.train()
    finally:
        trainer.close()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "run" / "job.json", out / "job.json")
    for step in (INTERVAL, STEPS):
        target = out / "checkpoint" / f"step-{step}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(work / "run" / "checkpoint" / f"step-{step}", target)
    (out / "steps.json").write_text(json.dumps(steps, indent=1) + "\n")
    save_file(batches, str(out / "batches.safetensors"))
    shutil.rmtree(work)


if __name__ == "__main__":
    sys.modules.setdefault("fixture_tiny_module", sys.modules[__name__])
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
