"""Small builders shared by tests."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

import lockstep
from lockstep.cli import main as cli_main
from lockstep.config import JobConfig, load_config
from lockstep.config.sections import ModelConfig
from lockstep.models.registry import model_args


def tiny_overrides(folder) -> list[str]:
    """CLI overrides for a seconds-long run: the tiny Llama on the built-in corpus, CPU."""
    return [
        "--job.dump_folder", str(folder / "run"),
        "--model.flavor", "tiny",
        "--training.steps", "6",
        "--training.local_batch_size", "2",
        "--training.seq_len", "32",
        "--training.device", "cpu",
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.log_freq", "1",
        "--debug.seed", "7",
    ]  # fmt: skip


def tiny_config(folder, *overrides: str) -> JobConfig:
    """The tiny run's typed config, one process."""
    return load_config("llama3_debug", tiny_overrides(folder) + list(overrides))


def tiny_model(vocab_size: int = 97, seq_len: int = 32, seed: int = 0, flavor: str = "tiny") -> torch.nn.Module:
    spec, args = model_args(ModelConfig(flavor=flavor), vocab_size, seq_len)
    with torch.device("meta"):
        model = spec.build(args, "sdpa")
    model.init_weights(seed, "cpu")
    return model


def save_rank_weights(trainer, folder, tag: str = "final") -> None:
    """This rank's full weights (DTensors gathered), for merged_rank_weights."""
    torch.save(trainer.full_weights(), folder / f"weights.{tag}.{os.environ.get('RANK', '0')}.pt")


def merged_rank_weights(folder, tag: str = "final") -> dict[str, torch.Tensor]:
    """The whole model's weights, merged from every rank's stages; ranks that hold the same parameter
    must agree on it bitwise."""
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob(f"weights.{tag}.*.pt")):
        for name, value in torch.load(file).items():
            assert name not in weights or torch.equal(weights[name], value), f"ranks disagree on {name}"
            weights[name] = value
    return weights


_LOCKSTEP_SOURCE = str(Path(lockstep.__file__).parent)


@contextlib.contextmanager
def host_reads():
    """Count reads of tensor values into Python (item, tolist, int, float, bool, index) by calling
    file: each is a host sync on an accelerator. The CPU has no sync to count, so this counts calls.
    Calls from lockstep's own modules are keyed by file name, all others by "outside lockstep"."""
    counts: collections.Counter = collections.Counter()
    names = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counted(original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            counts[caller.rsplit("/", 1)[-1] if caller.startswith(_LOCKSTEP_SOURCE) else "outside lockstep"] += 1
            return original(self, *args, **kwargs)

        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(original))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class WarningRecords(logging.Handler):
    """WARNING records: a `lockstep` process would print them on stderr (logging's last resort)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# Hidden by Python's default warning filters in a `lockstep` process (pytest would show them).
_HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _process_state() -> dict:
    return {
        "environment": dict(os.environ),
        "working directory": os.getcwd(),
        "signal handlers": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
        "process group": dist.is_initialized(),
    }


def run_cli(args: list[str], capture) -> tuple[int, str, str]:
    """``lockstep ARGS`` in this process, for refusals that come before any torch.distributed work or
    launch (a ``--nproc`` launch fails the test here instead of starting torchrun inside pytest).
    ``capture`` is pytest's capfd (or capsys); returns (exit code, stdout, stderr). What a `lockstep`
    process would print on stderr besides and pytest would catch instead (warnings, WARNING log
    records) is appended to stderr. Asserts there is no traceback and that the call leaves no process
    group, environment variable, working directory or signal handler changed."""
    capture.readouterr()  # drop what came before
    before = _process_state()
    records, root = WarningRecords(), logging.getLogger()
    launch = mock.patch("lockstep.cli.launch.launch_torchrun", side_effect=AssertionError("run_cli launched torchrun"))
    root.addHandler(records)
    try:
        with launch, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = cli_main([str(arg) for arg in args])
    finally:
        root.removeHandler(records)
    out, err = capture.readouterr()
    shown = [w for w in caught if not issubclass(w.category, _HIDDEN_WARNINGS)]
    err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in shown)
    err += "".join(line + "\n" for line in records.lines)
    assert "Traceback" not in err, err
    after = _process_state()
    changed = [key for key in before if before[key] != after[key]]
    env_before, env_after = before["environment"], after["environment"]
    variables = sorted(k for k in env_before.keys() | env_after.keys() if env_before.get(k) != env_after.get(k))
    assert not changed, f"the command changed this process's {', '.join(changed)} {variables or ''}"
    return code, out, err
