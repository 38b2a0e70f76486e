"""What ``lockstep generate`` runs: a model with its weights and the tokenizer it was trained with,
from a run folder (its newest intact checkpoint), a checkpoint step folder, or a Hugging Face folder.

Nothing pickled is read: a lockstep checkpoint goes through the verifying, allow-listed reader
(lockstep.checkpoint.safe_reader), a Hugging Face folder through safetensors only (a folder of
``.bin`` weights is refused). The tokenizer comes from the run's config (``model.tokenizer``) or the
Hugging Face folder's tokenizer.json, unless ``--tokenizer-path`` names one; a checkpoint records its
tokenizer's fingerprint, and a tokenizer from the run's config that does not match it is refused.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lockstep.checkpoint import folders
from lockstep.checkpoint.hf import is_hf_folder, load_hf_weights, read_model_weights, resolve_checkpoint_folder
from lockstep.checkpoint.hf_tokenizer import recorded_tokenizer
from lockstep.checkpoint.manifest import recorded_config, recorded_model
from lockstep.checkpoint.states import persistent_tensors, tied_aliases
from lockstep.data.tokenizer import HFTokenizer, Tokenizer
from lockstep.errors import InputError, LockstepError
from lockstep.models.registry import ModelSpec, family_of_hf_config, hf_config_args, model_spec
from lockstep.untrusted import load_toml, read_hf_config

FIX_PATH = "give a run folder, a checkpoint step folder (step-N) or a Hugging Face folder (config.json + safetensors)"


@dataclass(frozen=True)
class Source:
    """Where the weights are and what they are, before anything large is read."""

    path: Path
    """The Hugging Face folder or the checkpoint step folder."""
    kind: str
    """hf or lockstep."""
    spec: ModelSpec
    args: Any
    """The model's *Args, as recorded (lockstep) or from config.json (Hugging Face)."""
    config: dict | None
    """The run's resolved config (model and data sections for the tokenizer), when known."""
    tokenizer_fingerprint: str | None
    """The fingerprint of the tokenizer the checkpoint was trained with, when recorded."""


def resolve_source(path: Path) -> Source:
    """Identify `path` (see the module docstring) and read its model description."""
    if not path.exists():
        raise InputError(path, "does not exist", FIX_PATH)
    if not path.is_dir():
        raise InputError(path, "is a file, not a folder", FIX_PATH)
    if is_hf_folder(path):  # refuses a folder of pickled weights
        return _hf_source(path)
    run_config = path / "config.toml"
    if (path / folders.MANIFEST).is_file():
        folder = resolve_checkpoint_folder(path)
    elif run_config.is_file():
        checkpoint = _read_toml(run_config).get("checkpoint")
        folder_name = checkpoint.get("folder", "checkpoint") if isinstance(checkpoint, dict) else "checkpoint"
        root = path / str(folder_name)
        folder = folders.find_checkpoint(root, -1, _note) if root.is_dir() else None
        if folder is None:
            raise InputError(path, "is a run folder without a loadable checkpoint", "train with --checkpoint.enable")
    elif (path / "config.json").is_file():
        raise InputError(path, "has a config.json but no *.safetensors weights", FIX_PATH)
    else:
        folder = resolve_checkpoint_folder(path)  # a checkpoint root; raises when it holds none
    manifest = folders.read_manifest(folder)
    spec, args = recorded_model(folder, manifest)
    config = _read_toml(run_config) if run_config.is_file() else recorded_config(folder, manifest)
    fingerprint = (manifest.get("fingerprints") or {}).get("tokenizer")
    return Source(folder, "lockstep", spec, args, config, fingerprint)


def _hf_source(path: Path) -> Source:
    config = read_hf_config(path)
    try:
        spec = model_spec(family_of_hf_config(config))
    except ValueError as e:
        raise InputError(path / "config.json", str(e).removeprefix("config.json: ")) from e
    args = hf_config_args(spec, config, path / "config.json")
    return Source(path, "hf", spec, args, None, None)


def _read_toml(path: Path) -> dict:
    try:
        return load_toml(path.read_bytes())
    except (OSError, ValueError) as e:
        raise InputError(path, f"is not valid TOML ({e})") from None


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_tokenizer(source: Source, tokenizer_path: Path | None = None) -> Tokenizer:
    """`tokenizer_path` if given, else the Hugging Face folder's tokenizer.json, else the run's
    ``model.tokenizer`` (checked against the checkpoint's recorded fingerprint)."""
    if tokenizer_path is not None:
        tokenizer = HFTokenizer(tokenizer_path)
        if source.tokenizer_fingerprint not in (None, tokenizer.fingerprint):
            _note(f"note: {tokenizer_path} is not the tokenizer {source.path} was trained with")
    elif source.kind == "hf":
        if not (source.path / "tokenizer.json").is_file():
            raise InputError(source.path, "has no tokenizer.json", "pass --tokenizer-path")
        tokenizer = HFTokenizer(source.path)
    else:
        tokenizer = recorded_tokenizer(source.path, source.config, source.tokenizer_fingerprint)
    if tokenizer.vocab_size > source.args.vocab_size:
        raise LockstepError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model in {source.path} only "
            f"{source.args.vocab_size}; pass the model's own tokenizer with --tokenizer-path"
        )
    return tokenizer


def resolve_device(setting: str) -> torch.device:
    """cpu, cuda, or auto (cuda when there is one)."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise LockstepError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(setting)


def load_model(source: Source, device: torch.device, min_seq_len: int = 0) -> nn.Module:
    """The model in eval mode, fp32, on `device`, with the source's weights. Its RoPE table covers
    at least `min_seq_len` positions (generation may run past the trained length; the weights are
    unaffected: only the table grows)."""
    args = source.args
    if min_seq_len > args.max_seq_len:
        args = dataclasses.replace(args, max_seq_len=min_seq_len)
    with torch.device("meta"):
        model = source.spec.build(args, "sdpa")
    model.materialize("cpu")
    if source.kind == "hf":
        load_hf_weights(source.path, source.spec, args, persistent_tensors(model))  # parameters and expert biases
    else:
        with warnings.catch_warnings():  # DCP warns that no_dist means one process: it does here
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            weights = read_model_weights(source.path)  # verified as it is read
        missing = sorted(set(persistent_tensors(model)) - set(weights))
        if missing:  # e.g. DeepSeek-V3's router bias in an import that did not carry it
            named = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise InputError(
                source.path, f"lacks {len(missing)} of the model's tensors ({named})",
                "generate from the folder it was made from (a Hugging Face folder is read directly)",
            )  # fmt: skip
        aliases = tied_aliases(model)  # a tied output projection: saved once, as the embedding
        model.load_state_dict(weights | {alias: weights[name] for alias, name in aliases.items()})
    return model.to(device).eval()
