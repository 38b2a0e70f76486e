"""Tiny models whose greedy continuations do not settle into a loop, saved the way lockstep saves."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from lockstep.checkpoint import folders
from lockstep.checkpoint.checksums import ChecksumWriter
from lockstep.checkpoint.states import persistent_tensors
from lockstep.config.sections import ModelConfig
from lockstep.data.tokenizer import BytesTokenizer
from lockstep.models.registry import model_args

VOCAB = BytesTokenizer.vocab_size
FLAVORS = {"llama3": "tiny", "deepseek_v3": "debug", "qwen3": "debug", "qwen3_moe": "debug", "llama4": "debug"}
OVERRIDES = {"llama4": {"attention_chunk_size": 8, "floor_scale": 4}}
"""Llama 4 with chunks of 8 and temperature steps of 4, so that decoding crosses chunk boundaries."""
PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 7], [256, 3, 1, 4, 1, 5, 9, 2, 6]]
"""BOS and a few ids each, of three lengths (so a batch of them is padded)."""


def lively_model(name: str, seed: int = 3, max_seq_len: int = 64) -> torch.nn.Module:
    """The family's tiny flavor with every matrix drawn at std 0.2 (the training init at these
    sizes makes greedy decoding repeat one or two tokens, which would hide a wrong cache; the output at
    0.05; a tied output is the embedding, at 0.2) and, for DeepSeek-V3, a random router bias (zero at
    init, so its path would go untested)."""
    config = ModelConfig(name=name, flavor=FLAVORS[name], overrides=OVERRIDES.get(name, {}))
    spec, args = model_args(config, VOCAB, max_seq_len)
    with torch.device("meta"):
        model = spec.build(args, "sdpa")
    model.init_weights(seed, "cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if p.dim() >= 2:  # logits of a few units: 1e-5 stays a tight bound
                p.copy_(torch.randn(p.shape, generator=generator) * (0.05 if name_ == "output.weight" else 0.2))
        for name_, buffer in model.named_buffers():
            if name_.endswith("expert_bias") and name == "deepseek_v3":  # Qwen3-MoE has no routing bias
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return model.eval()


def save_checkpoint(model: torch.nn.Module, name: str, root: Path) -> Path:
    """A model-only step-0 checkpoint as the trainer writes one (manifest, checksums), recording the
    bytes tokenizer; returns the step folder."""
    partial, final = folders.partial_folder(root, 0), folders.step_folder(root, 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        state = {n: t.detach() for n, t in persistent_tensors(model).items()}  # a tied weight once, as trained
        dcp.save({"model": state}, storage_writer=ChecksumWriter(str(partial)), no_dist=True)
    manifest = {
        "format": folders.FORMAT, "step": 0, "model_only": True, "parts": ["model"],
        "model": {"name": name, "flavor": FLAVORS[name], "args": dataclasses.asdict(model.args)},
        "fingerprints": {"tokenizer": BytesTokenizer.fingerprint},
        "config": {
            "model": {"name": name, "flavor": FLAVORS[name], "tokenizer": "bytes", "overrides": OVERRIDES.get(name, {})}
        },
    }  # fmt: skip
    folders.publish(partial, final, manifest)
    return final
