"""Replay one step of a run with hooks on every module, for ``lockstep bisect``.

    [torchrun --nproc_per_node N] -m lockstep.tools.replay --replay-run RUN --replay-step K --replay-out CAPTURE.pt

Starts from the run's newest checkpoint before step K (or from its initial weights), read-only: the
step folder is linked into a scratch checkpoint root, so the source run's folder is never written,
pruned or overwritten (and its checkpoint is verified like any resume). Then it trains up to
step K-1 without hooks, then runs step K capturing, for the global batch's first microbatch, every
module's forward output and output gradient (first call, execution order), and after the step the
reduced gradients and the updated parameters, all as full tensors (DTensors gathered). Ranks that
hold data-parallel index 0 and tensor-parallel index 0 write ``CAPTURE.rank<R>.pt``.

With ``--replay-mode verify`` (``lockstep replay`` and ``lockstep inspect --losses``) no hooks are
attached: step K runs as training ran it, with fingerprints, after each sample's loss is taken with
the weights it started from, and every rank writes ``CAPTURE.rank<R>.json``: the loss, grad norm,
fingerprints, its own part of every tensor's digest, and the per-sample losses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lockstep.checkpoint import folders
from lockstep.config import load_config
from lockstep.config.job import standalone
from lockstep.errors import LockstepError
from lockstep.parallel.canonical import full_value
from lockstep.parallel.mesh import axis_rank
from lockstep.run.jsonl import json_floats, strict_json
from lockstep.run.launches import config_for_step, env_for_step
from lockstep.train.trainer import Trainer
from lockstep.untrusted import parse_json


def _full(value) -> torch.Tensor | None:
    if isinstance(value, tuple | list):
        value = next((v for v in value if isinstance(v, torch.Tensor)), None)
    if not isinstance(value, torch.Tensor):
        return None
    return full_value(value).detach().float().cpu().clone()


class Capture:
    def __init__(self) -> None:
        self.forward: dict[str, tuple[str, torch.Tensor]] = {}
        self.backward: dict[str, tuple[str, torch.Tensor]] = {}
        self.gradients: dict[str, torch.Tensor] = {}
        self.parameters: dict[str, torch.Tensor] = {}
        self.handles = []

    def attach(self, model: torch.nn.Module) -> None:
        for name, module in model.named_modules():
            if not name:
                continue
            self.handles.append(module.register_forward_hook(self._on_forward(name)))
            self.handles.append(module.register_full_backward_hook(self._on_backward(name)))

    def _on_forward(self, name: str):
        def hook(module, args, output):
            if name not in self.forward and (value := _full(output)) is not None:
                self.forward[name] = (type(module).__name__, value)

        return hook

    def _on_backward(self, name: str):
        def hook(module, grad_input, grad_output):
            if name not in self.backward and (value := _full(grad_output)) is not None:
                self.backward[name] = (type(module).__name__, value)

        return hook

    def observe(self, what: str, tensors: dict) -> None:
        target = self.gradients if what == "gradients" else self.parameters
        for name, tensor in tensors.items():
            target[name] = _full(tensor)

    def state(self) -> dict:
        return {"forward": self.forward, "backward": self.backward, "gradients": self.gradients,
                "parameters": self.parameters}  # fmt: skip


def checkpoint_before(run: Path, step: int) -> int | None:
    """Newest intact full checkpoint of `run` at a step < `step` (damaged ones are passed over)."""
    candidates = [
        s for s, folder in folders.published_steps(run / "checkpoint")
        if s < step and folders.problem_with(folder, content=False) is None
        and not folders.read_manifest(folder).get("model_only")
    ]  # fmt: skip
    return max(candidates) if candidates else None


class ReplayFailed(LockstepError):
    """The replay could not run (its last error line says why): exit 2, apart from "does not reproduce"."""


def launch_replay(run: Path, step: int, out: Path, mode: str = "capture") -> None:
    """Run this module for `run`'s step under torchrun with the world size and CPU thread count of the
    launch that trained it (kernels sum differently with other thread counts), on this machine."""
    env_record = env_for_step(run, step)
    world = int(env_record.get("world_size", 1))
    if (env_record.get("device") or {}).get("type") == "cuda":
        if world > torch.cuda.device_count():
            raise ReplayFailed(
                f"step {step} of {run} ran on {world} GPUs and this machine has {torch.cuda.device_count()}; run "
                f"`torchrun --nnodes ... -m lockstep.tools.replay --replay-run {run} --replay-step {step} "
                "--replay-out OUT --replay-mode verify` over enough nodes"
            )
    launcher = [sys.executable]
    if world > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    command = [*launcher, "-m", "lockstep.tools.replay", "--replay-run", str(run), "--replay-step", str(step)]
    command += ["--replay-out", str(out), "--replay-mode", mode]
    threads = str(env_record.get("threads") or 1)
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": threads})
    if done.returncode:
        if os.environ.get("LOCKSTEP_TRACEBACK") == "1":
            print(done.stdout + done.stderr, file=sys.stderr)
        lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(("W", "["))]
        why = lines[-1].strip() if lines else f"exit code {done.returncode}"
        raise ReplayFailed(f"replaying step {step} of {run} failed: {why} (LOCKSTEP_TRACEBACK=1 shows its output)")


def read_replay(out: Path) -> dict[int, dict]:
    """The replay's per-rank records (verify mode), by rank."""
    return {
        int(path.name.rsplit(".rank", 1)[1].split(".")[0]): json_floats(parse_json(path.read_bytes(), allow_nan=True))
        for path in out.parent.glob(f"{out.name}.rank*.json")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lockstep.tools.replay")
    parser.add_argument("--replay-run", dest="run", type=Path, required=True)
    parser.add_argument("--replay-step", dest="step", type=int, required=True)
    parser.add_argument("--replay-out", dest="out", type=Path, required=True)
    parser.add_argument("--replay-mode", dest="mode", choices=("capture", "verify"), default="capture")
    args = parser.parse_args(argv)

    start = checkpoint_before(args.run, args.step)
    scratch = Path(tempfile.mkdtemp(prefix="lockstep-replay-"))
    overrides = ["--job.dump_folder", str(scratch), "--debug.no-fingerprint"]
    if args.mode == "capture":  # bisect looks at every tensor, non-finite ones too; verify runs as training ran
        overrides += ["--debug.nonfinite", "ignore"]
    if start is not None:
        source = folders.step_folder((args.run / "checkpoint").resolve(), start)
        readonly_root = scratch / "source-checkpoint"
        readonly_root.mkdir()
        folders.step_folder(readonly_root, start).symlink_to(source, target_is_directory=True)
        overrides += ["--checkpoint.enable", "--checkpoint.folder", str(readonly_root)]
        overrides += ["--checkpoint.load_step", str(start), "--checkpoint.interval", str(1 << 30)]
    else:
        overrides += ["--checkpoint.no-enable"]
    config = load_config(str(config_for_step(args.run, args.step)), overrides)  # the launch that trained it
    standalone(config, int(os.environ.get("WORLD_SIZE", "1")))  # a replica group's run replays alone
    try:
        return _replay(config, args)
    finally:  # the scratch run (its checkpoint root holds only a link to the source step)
        shutil.rmtree(scratch, ignore_errors=True)


def _replay(config, args) -> int:
    with Trainer(config, show_progress=False) as trainer:
        while trainer.state.step < args.step - 1:
            result = trainer.step.run(trainer.state.step + 1)
            trainer.state.advance(result.samples * config.training.seq_len)
        rank = os.environ.get("RANK", "0")
        if args.mode == "verify":
            Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(_verify(trainer)))
            return 0
        capture = Capture()
        for part in trainer.model.parts:
            capture.attach(part)
        trainer.step.run(trainer.state.step + 1, observe=capture.observe)
        if axis_rank(trainer.mesh, "dp") == 0 and axis_rank(trainer.mesh, "tp") == 0:
            stage = axis_rank(trainer.mesh, "pp")
            torch.save(capture.state() | {"stage": stage}, f"{args.out}.rank{rank}.pt")
    return 0


def _verify(trainer) -> dict:
    """The next step as training ran it, and each of its samples' losses beforehand."""
    start = trainer.loader.next_sample_index
    losses = trainer.step.sample_losses(start)
    result = trainer.step.run(trainer.state.step + 1, fingerprint=True)
    return strict_json({
        "step": trainer.state.step + 1, "loss": result.loss_value, "grad_norm": result.grad_norm_value,
        "fingerprints": result.fingerprints, "local_digests": result.local_digests,
        "samples": list(range(start, start + result.samples)),
        "sample_losses": None if losses is None else {"summed": losses.summed, "tokens": losses.tokens},
    })  # fmt: skip


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # see lockstep/train/__main__.py: gloo may abort in interpreter-exit destructors
