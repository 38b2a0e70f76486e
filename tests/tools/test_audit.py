"""lockstep audit lists nondeterministic ops and layout-dependent features."""

import os
import subprocess
import sys

import pytest
import torch._inductor.config as inductor

from lockstep.config import load_config
from lockstep.config.errors import ConfigError
from lockstep.determinism.seeds import refuse_timed_kernel_choice
from lockstep.tools.audit import config_findings, torch_alerts
from tests.helpers import tiny_overrides

LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")


def _audit(tmp_path, *extra):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = [LOCKSTEP, "audit", "--config", "llama3_debug", "--steps", "2", *tiny_overrides(tmp_path), *extra]
    env = os.environ | {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_audit_lists_a_nondeterministic_op(tmp_path):
    done = _audit(tmp_path, "--job.custom_config_module", "tests.assets.nondeterministic_op")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "torch | scatter_add_cuda_kernel | nondeterministic" in done.stdout


def test_audit_of_a_clean_config_passes(tmp_path):
    done = _audit(tmp_path, "--debug.deterministic")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "nothing found" in done.stdout


def _findings(config, document_masking: bool = True):
    """config_findings of a whole job config's sections."""
    return config_findings(
        debug=config.debug, parallelism=config.parallelism, optimizer=config.optimizer, training=config.training,
        compile_config=config.compile, model=config.model, document_masking=document_masking,
    )  # fmt: skip


def test_layout_dependent_features_are_named():
    config = load_config(
        "llama3_debug", ["--optimizer.implementation", "fused", "--debug.no-layout-invariant-reductions"]
    )
    findings = _findings(config)
    items = {f.item: f.verdict for f in findings}
    assert items["optimizer.implementation = fused"] == "layout-dependent"
    assert items["debug.layout_invariant_reductions = false"] == "layout-dependent"
    assert items["debug.deterministic = false"] == "nondeterministic"


def _cuda_attention_findings(*overrides: str, document_masking: bool = True) -> dict[str, str]:
    config = load_config("llama3_debug", ["--training.device", "cuda", *overrides])
    findings = _findings(config, document_masking=document_masking)
    return {f.item.split(" (")[0]: f.verdict for f in findings if "SDPA" in f.item or "Flex" in f.item}


def test_cuda_attention_is_flagged_unless_strictly_deterministic():
    def sdpa_verdict(*overrides: str) -> str:
        return _cuda_attention_findings("--model.attention", "sdpa", *overrides)["SDPA on CUDA"]

    assert sdpa_verdict("--debug.deterministic") == "ok"
    assert sdpa_verdict("--debug.deterministic", "--debug.deterministic_warn_only") == "nondeterministic"
    assert sdpa_verdict() == "nondeterministic"


def test_flex_on_cuda_is_deterministic_and_plain_causal_runs_sdpa():
    """auto is flex on CUDA: its Triton backward has no atomics, so it is ok even in warn-only mode;
    without document masks attention is SDPA's causal kernel whatever the backend, and is flagged."""
    warn_only = ("--debug.deterministic", "--debug.deterministic_warn_only")
    assert _cuda_attention_findings(*warn_only) == {"FlexAttention": "ok"}
    assert _cuda_attention_findings(*warn_only, document_masking=False) == {"SDPA on CUDA": "nondeterministic"}


def test_max_autotune_is_refused_under_deterministic():
    """Kernels picked by timing can differ run to run: deterministic mode fails closed."""
    with inductor.patch(max_autotune=False, max_autotune_gemm=False):
        refuse_timed_kernel_choice()  # the default: one configuration per kernel
    refusing = inductor.patch(max_autotune=True, deterministic=False)  # another test may have left it on
    with refusing, pytest.raises(ConfigError, match="debug.deterministic: inductor max"):
        refuse_timed_kernel_choice()
    with inductor.patch(max_autotune=True, deterministic=True):  # inductor then picks without timing
        refuse_timed_kernel_choice()


def test_attention_warnings_are_caught_as_alerts():
    import warnings

    def run() -> None:  # what flash / memory-efficient SDPA emit on CUDA in warn-only mode
        warnings.warn(
            "Memory Efficient attention defaults to a non-deterministic algorithm. To explicitly ...", stacklevel=1
        )
        warnings.warn("Flash Attention defaults to a non-deterministic algorithm. To explicitly ...", stacklevel=1)

    items = [f.item for f in torch_alerts(run)]
    assert items == ["Memory Efficient attention", "Flash Attention"]


def test_deterministic_mode_turns_cudnn_attention_off():
    import torch

    from lockstep.config.sections import DebugConfig
    from lockstep.determinism.seeds import configure_determinism

    was = torch.backends.cuda.cudnn_sdp_enabled(), torch.are_deterministic_algorithms_enabled()
    try:
        configure_determinism(DebugConfig(deterministic=True))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert os.environ["NCCL_ALGO"] == "Ring"  # one NCCL summation order for native reductions
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was[0])
        torch.use_deterministic_algorithms(was[1])


def test_bf16_tensor_and_expert_parallelism_are_not_layout_dependent_under_determinism():
    config = load_config(
        "llama3_debug",
        ["--training.mixed_precision", "bf16", "--parallelism.tensor_parallel_degree", "2",
         "--parallelism.expert_parallel_degree", "2", "--debug.deterministic"],
    )  # fmt: skip
    findings = _findings(config)
    items = {f.item: (f.verdict, f.note) for f in findings}
    assert items["training.mixed_precision = bf16"][0] == "ok"
    assert items["tensor parallelism"][0] == "ok"
    assert items["expert parallelism"][0] == "ok"
    loose = load_config("llama3_debug", ["--parallelism.tensor_parallel_degree", "2"])
    findings = _findings(loose)
    assert {f.item: f.verdict for f in findings}["tensor parallelism"] == "layout-dependent"
