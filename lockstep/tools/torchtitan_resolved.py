"""torchtitan 0.3's job as its trainer resolved it, in the sections of the 0.2 job TOML that
lockstep.tools.torchtitan_config translates.

torchtitan 0.3 has no job TOML: a job is a Python config function (``--module llama3 --config
llama3_debugmodel``) plus command-line overrides, and the one file holding all of it is the JSON its trainer
writes with ``--debug.save_config_file job.json``. Three of its sections moved (``profiler``, ``validator``,
``dataloader``), the optimizer became a list of parameter groups, and the model is a tree of module
configs (``model_spec.model``), read here into the family's *Args fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lockstep.errors import InputError

MOVED = {
    "dump_folder": "job.dump_folder",
    "hf_assets_path": "model.hf_assets_path",
    "dataloader.dataset": "training.dataset",
    "dataloader.dataset_path": "training.dataset_path",
}
"""0.3 key -> the 0.2 section.key of the same meaning."""
SECTIONS = {"profiler": "profiling", "validator": "validation"}
"""0.3 section -> the 0.2 section of the same meaning."""
MODEL_FAMILIES = ("llama3",)
"""Families whose 0.3 module configs are read field by field (others keep lockstep's flavor's args)."""


def resolved_sections(job: dict[str, Any], path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any], list[str]]:
    """The 0.2-style sections of a resolved 0.3 job, the model args read from its module configs (empty when
    its family is not read), and notes on what was not carried over."""
    spec = job.get("model_spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise InputError(
            path, "has no model_spec.model", "give the job.json torchtitan writes with --debug.save_config_file"
        )
    sections: dict[str, dict[str, Any]] = {
        "model": {"name": spec.get("name", "llama3"), "flavor": spec.get("flavor", "")}
    }
    notes: list[str] = []
    for dotted, value in _leaves(job, exclude=("model_spec", "optimizer.param_groups")):
        section, key = dotted.split(".", 1) if "." in dotted else ("", dotted)
        target = MOVED.get(dotted) or (f"{SECTIONS.get(section, section)}.{key}" if section else dotted)
        if value is None or "." not in target:
            if value is not None:
                notes.append(f"{dotted} = {value!r}: no lockstep equivalent")
            continue
        section, key = target.split(".", 1)
        sections.setdefault(section, {})[key] = value
    sections["optimizer"] = sections.get("optimizer", {}) | _optimizer(job.get("optimizer", {}), notes)
    args = llama3_args(spec["model"], job, path) if sections["model"]["name"] in MODEL_FAMILIES else {}
    if not args:
        notes.append(
            f"model_spec.model: module configs of {sections['model']['name']} are not read; its flavor's args are used"
        )
    return sections, args, notes


def _leaves(tree: dict[str, Any], prefix: str = "", exclude: tuple[str, ...] = ()):
    """(dotted key, value) for every non-table value of `tree`, depth first."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in exclude:
            continue
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{dotted}.", exclude)
        elif not (isinstance(value, dict) and not value):
            yield dotted, value


def _optimizer(optimizer: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """One parameter group over every parameter becomes lockstep's optimizer section; more are named."""
    groups = optimizer.get("param_groups") or []
    if len(groups) != 1 or groups[0].get("pattern") != ".*":
        notes.append(f"optimizer.param_groups = {groups!r}: lockstep has one group (its weight_decay_exempt aside)")
        return {}
    kwargs = groups[0].get("optimizer_kwargs", {})
    out = {"name": groups[0].get("optimizer_name", "AdamW")}
    for key in ("lr", "eps", "weight_decay", "betas"):
        if key in kwargs:
            out[key] = list(kwargs[key]) if key == "betas" else kwargs[key]
    for key in sorted(set(kwargs) - {"lr", "eps", "weight_decay", "betas"}):
        notes.append(f"optimizer.param_groups[0].optimizer_kwargs.{key} = {kwargs[key]!r}: no lockstep equivalent")
    return out


def llama3_args(model: dict[str, Any], job: dict[str, Any], path: Path) -> dict[str, Any]:
    """Llama3Args fields of torchtitan 0.3's Llama3Model config: every field, so nothing comes from a flavor."""
    layers = model.get("layers") or []
    if not layers or any(_shape(layer) != _shape(layers[0]) for layer in layers):
        raise InputError(
            path, "model_spec.model.layers differ from block to block", "lockstep's llama3 blocks are all alike"
        )
    attention, feed_forward = layers[0]["attention"], layers[0]["feed_forward"]
    rope = attention.get("rope") or {}
    n_heads = attention["n_heads"]
    n_kv_heads = attention.get("n_kv_heads") or n_heads
    head_dim = attention.get("head_dim") or model["dim"] // n_heads
    if head_dim * n_heads != model["dim"] or layers[0].get("moe") or attention.get("qk_norm"):
        raise InputError(path, "model_spec.model is not a Llama 3 shape lockstep's llama3 builds",
                         "give head_dim = dim / n_heads, no MoE and no QK norm")  # fmt: skip
    scaling = rope.get("scaling")
    if scaling not in (None, "none", "llama"):
        raise InputError(
            path, f"RoPE scaling {scaling!r} is not Llama 3's", "lockstep's llama3 has llama scaling or none"
        )
    return {
        "dim": model["dim"], "n_layers": len(layers), "n_heads": n_heads, "n_kv_heads": n_kv_heads,
        "vocab_size": model["vocab_size"], "ffn_hidden_size": feed_forward["w1"]["out_features"],
        "multiple_of": 256,  # no effect beside an explicit ffn_hidden_size; lockstep's custom flavor asks for it
        "norm_eps": model["norm"]["eps"], "rope_theta": rope.get("theta", 500000.0),
        "rope_scaling": {
            "factor": rope["scaling_factor"], "low_freq_factor": rope["low_freq_factor"],
            "high_freq_factor": rope["high_freq_factor"],
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
        } if scaling == "llama" else "none",
        "max_seq_len": job.get("training", {}).get("seq_len", rope.get("max_seq_len", 8192)),
        "tie_embeddings": bool(model.get("enable_weight_tying", False)),
    }  # fmt: skip


def _shape(layer: dict[str, Any]) -> tuple:
    """What must agree between blocks: the attention and feed-forward sizes."""
    attention, feed_forward = layer.get("attention") or {}, layer.get("feed_forward") or {}
    return (attention.get("n_heads"), attention.get("n_kv_heads"), attention.get("head_dim"),
            (feed_forward.get("w1") or {}).get("out_features"), str(attention.get("rope")))  # fmt: skip
