"""A torchtitan job as a lockstep config: ``lockstep config from-torchtitan FILE``, where FILE is a 0.2 job
TOML or the ``job.json`` a 0.3 trainer writes (``--debug.save_config_file``; lockstep.tools.torchtitan_resolved).

Every key the job sets is either translated (the table below: same meaning, lockstep's
name) or named in the result's ``unmapped`` list with why, so nothing is silently dropped. The
translation also selects what makes the run follow torchtitan step for step where lockstep's defaults
differ: torchtitan's learning-rate formulas (``lr_scheduler.formula = torchtitan``), its sequential
data order (``data.shuffle = false``) and its Hugging Face tokenizer folder (``hf_assets_path``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lockstep.errors import InputError
from lockstep.tools.torchtitan_resolved import resolved_sections
from lockstep.untrusted import load_toml, parse_json

SAME = {
    "job": {"dump_folder": "job.dump_folder", "description": "job.description"},
    "metrics": {"log_freq": "metrics.log_freq", "enable_tensorboard": "metrics.enable_tensorboard",
                "enable_wandb": "metrics.enable_wandb"},
    "optimizer": {"lr": "optimizer.lr", "eps": "optimizer.eps", "weight_decay": "optimizer.weight_decay",
                  "implementation": "optimizer.implementation", "betas": "optimizer.betas"},
    "lr_scheduler": {"warmup_steps": "lr_scheduler.warmup_steps", "decay_type": "lr_scheduler.decay_type",
                     "min_lr_factor": "lr_scheduler.min_lr_factor"},
    "training": {"local_batch_size": "training.local_batch_size", "global_batch_size": "training.global_batch_size",
                 "seq_len": "training.seq_len", "max_norm": "training.max_norm", "steps": "training.steps"},
    "parallelism": {
        "data_parallel_replicate_degree": "parallelism.data_parallel_replicate_degree",
        "data_parallel_shard_degree": "parallelism.data_parallel_shard_degree",
        "tensor_parallel_degree": "parallelism.tensor_parallel_degree",
        "pipeline_parallel_degree": "parallelism.pipeline_parallel_degree",
        "pipeline_parallel_schedule": "parallelism.pipeline_parallel_schedule",
        "pipeline_parallel_microbatch_size": "parallelism.pipeline_parallel_microbatch_size",
        "expert_parallel_degree": "parallelism.expert_parallel_degree",
        "enable_loss_parallel": "parallelism.loss_parallel",
    },
    "checkpoint": {"enable": "checkpoint.enable", "folder": "checkpoint.folder", "interval": "checkpoint.interval",
                   "keep_latest_k": "checkpoint.keep_latest_k", "initial_load_path": "checkpoint.initial_load_path",
                   "exclude_from_loading": "checkpoint.exclude_from_loading", "load_step": "checkpoint.load_step",
                   "initial_load_model_only": "checkpoint.initial_load_model_only",
                   "last_save_model_only": "checkpoint.last_save_model_only",
                   "create_seed_checkpoint": "checkpoint.create_seed_checkpoint"},
    "activation_checkpoint": {"mode": "activation_checkpoint.mode",
                              "selective_ac_option": "activation_checkpoint.selective_ac_option",
                              "preserve_rng_state": "activation_checkpoint.preserve_rng_state"},
    "compile": {"enable": "compile.enable", "components": "compile.components"},
    "profiling": {key: f"profiling.{key}" for key in (
        "enable_profiling", "profile_freq", "profiler_warmup", "profiler_active", "save_traces_folder",
        "enable_memory_snapshot", "save_memory_snapshot_folder")},
    "comm": {"init_timeout_seconds": "comm.init_timeout_seconds", "train_timeout_seconds": "comm.train_timeout_seconds",
             "trace_buf_size": "comm.trace_buf_size"},
    "debug": {"seed": "debug.seed", "deterministic": "debug.deterministic"},
    "validation": {"enable": "validation.enable", "freq": "validation.freq", "steps": "validation.steps",
                   "local_batch_size": "validation.local_batch_size", "seq_len": "validation.seq_len"},
}  # fmt: skip
"""torchtitan [section] key -> lockstep section.key, where the meaning is the same."""

MODELS = {"llama3": "llama3", "deepseek_v3": "deepseek_v3", "qwen3": "qwen3"}
FLAVORS = {"debugmodel": "debug", "debugmodel_flex_attn": "debug"}
"""torchtitan's debug model is lockstep's debug flavor with the vocabulary padded to 2,048 rows."""
IGNORED_WHY = {
    "model.hf_assets_path": "read as the tokenizer folder (model.tokenizer_path)",
    "training.dataset": "torchtitan names a Hugging Face loader; lockstep reads the files at training.dataset_path",
    "training.mixed_precision_param": "lockstep's bf16 is training.mixed_precision = bf16 (FSDP's mixed precision)",
    "lr_scheduler.decay_ratio": "translated (torchtitan's none is lockstep's -1)",
    "training.dtype": "lockstep keeps fp32 parameters; bf16 compute is training.mixed_precision",
    "training.mixed_precision_reduce": "lockstep reduces in fp32 (docs/determinism.md)",
    "loss.num_chunks": "lockstep chunks the loss by tokens (training.loss_chunk_tokens), to the same value",
    "parallelism.context_parallel_degree": "lockstep has no context parallelism",
}
EXPORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}


@dataclass
class Translation:
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The lockstep config as TOML sections."""
    unmapped: list[str] = field(default_factory=list)
    """torchtitan keys with no lockstep equivalent, each with why."""
    left_off: list[str] = field(default_factory=list)
    """torchtitan keys with no lockstep equivalent that the job leaves off (false, empty): nothing is lost.
    A 0.3 job.json records every option, so most of its keys are these."""

    def set(self, dotted: str, value: Any) -> None:
        section, key = dotted.split(".", 1)
        self.config.setdefault(section, {})[key] = value


def from_torchtitan(path: Path) -> Translation:
    """Translate the torchtitan job at `path` (see the module docstring)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        job = parse_json(raw) if path.suffix == ".json" else load_toml(raw)
    except (OSError, ValueError) as error:
        raise InputError(
            path, f"is not a readable job file ({error})", "give a torchtitan job TOML or job.json"
        ) from None
    if not isinstance(job, dict):
        raise InputError(path, "is not a table of sections", "give a torchtitan job TOML or job.json")
    args: dict[str, Any] = {}
    notes: list[str] = []
    if path.suffix == ".json":
        try:
            job, args, notes = resolved_sections(job, path)
        except InputError:
            raise
        except (KeyError, TypeError, AttributeError, IndexError, ValueError, ZeroDivisionError) as error:
            raise InputError(
                path, f"is not a job.json this importer reads ({type(error).__name__}: {error})",
                "give the file torchtitan 0.3 writes with --debug.save_config_file, unedited",
            ) from None  # fmt: skip
    out = Translation(unmapped=notes)
    out.set("lr_scheduler.formula", "torchtitan")
    out.set("data.shuffle", False)
    for section, values in job.items():
        if not isinstance(values, dict):
            out.unmapped.append(f"{section}: not a section")
            continue
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key in SAME.get(section, {}):
                out.set(SAME[section][key], value)
            elif dotted in ("model.name", "model.flavor", "model.hf_assets_path"):
                continue  # below
            elif dotted == "optimizer.name":
                if value != "AdamW":
                    out.unmapped.append(f"{dotted} = {value!r}: lockstep trains with AdamW only")
            elif dotted == "lr_scheduler.decay_ratio":
                out.set("lr_scheduler.decay_ratio", -1.0 if value is None else value)
            elif dotted == "training.mixed_precision_param":
                out.set("training.mixed_precision", "bf16" if value == "bfloat16" else "fp32")
            elif dotted == "training.dataset_path":
                kind = _file_kind(Path(value))
                if kind is None:
                    out.unmapped.append(f"{dotted} = {value!r}: no text, json or parquet files found there")
                else:
                    out.set("training.dataset", kind)
                    out.set("training.dataset_path", value)
            elif dotted == "parallelism.fsdp_reshard_after_forward":  # default, always or never
                out.set("parallelism.fsdp_reshard_after_forward", value != "never")
            elif dotted == "checkpoint.async_mode":
                out.set("checkpoint.async_mode", value)
            elif dotted == "checkpoint.export_dtype" and value in EXPORT_DTYPES:
                out.set("checkpoint.export_dtype", EXPORT_DTYPES[value])
            elif value is False or value in ("", [], {}) or (dotted.endswith("_degree") and value == 1):
                out.left_off.append(dotted)
            else:
                why = IGNORED_WHY.get(dotted, "no lockstep equivalent")
                out.unmapped.append(f"{dotted} = {value!r}: {why}")
    model = job.get("model", {}) if isinstance(job.get("model"), dict) else {}
    name, flavor = model.get("name", "llama3"), model.get("flavor", "debugmodel")
    if name not in MODELS:
        raise InputError(path, f"model.name {name!r} is not a family lockstep has", f"use one of {', '.join(MODELS)}")
    out.set("model.name", MODELS[name])
    if args:  # every field, from the job's own module configs
        out.set("model.flavor", "custom")
        out.set("model.overrides", {k: v for k, v in args.items() if k != "max_seq_len"})
    else:
        out.set("model.flavor", FLAVORS.get(flavor, flavor))
        if flavor in FLAVORS:
            out.set("model.overrides", {"vocab_size": 2048})
    if "hf_assets_path" in model:
        out.set("model.tokenizer", "hf")
        out.set("model.tokenizer_path", str(Path(model["hf_assets_path"]) / "tokenizer.json"))
    return out


def _file_kind(path: Path) -> str | None:
    """text, json or parquet: what the files at a torchtitan dataset_path are, by their suffix."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for suffix, kind in ((".parquet", "parquet"), (".json", "json"), (".jsonl", "json"), (".txt", "text")):
        if any(f.suffix == suffix for f in files):
            return kind
    return None
