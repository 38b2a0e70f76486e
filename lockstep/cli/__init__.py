"""The ``lockstep`` command: one thin module per subcommand over the library.

Exit codes (every subcommand): 0 done; 1 a failure (a bug, a crash, a collective that broke, a
comparison that found a difference); 2 bad config or input (one line naming the key or file and the
fix); 75 (EX_TEMPFAIL) training stopped early (SIGTERM/SIGINT/SIGHUP, or its fault-tolerance lighthouse
lost) after its last step was saved (with checkpointing on): run the same command again to resume; 76
training stopped early with nothing saved for its last step (checkpointing off): a rerun starts from
the last saved step, if any. ``LOCKSTEP_TRACEBACK=1`` prints the full
traceback of a bad-input error, for bug reports.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

from lockstep.errors import LockstepError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_STOPPED_UNSAVED = 0, 1, 2, 75, 76

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lockstep.cli.train", "train a model (resumes from the run folder's newest checkpoint)"),
    "convert": ("lockstep.cli.convert", "Hugging Face <-> lockstep checkpoints (to-hf, from-hf)"),
    "compare": ("lockstep.cli.compare", "compare runs step by step (tables, plots, exact/tolerance gates)"),
    "bisect": ("lockstep.cli.bisect", "find the first step and module where two runs differ"),
    "eval": ("lockstep.cli.eval", "held-out loss of a run, a checkpoint or a Hugging Face folder"),
    "data": ("lockstep.cli.data", "prepare a dataset once (parallel, resumable), finalize and verify it"),
    "generate": ("lockstep.cli.generate", "continue prompts with a run, a checkpoint or a Hugging Face folder"),
    "lighthouse": ("lockstep.cli.lighthouse", "serve torchft's lighthouse for fault-tolerant replica groups"),
    "inspect": ("lockstep.cli.inspect", "the samples of a step: sources, text previews, replayed per-sample losses"),
    "replay": ("lockstep.cli.replay", "recompute a step here and compare it bitwise with the run's record"),
    "estimate": ("lockstep.cli.estimate", "predict per-rank memory and per-step traffic of a layout at any scale"),
    "audit": ("lockstep.cli.audit", "list nondeterministic ops and layout-dependent settings of a config"),
    "config-reference": ("lockstep.cli.config_reference", "print every config key with its default and meaning"),
    "config": ("lockstep.cli.config", "translate a job config from another trainer (from-torchtitan)"),
}


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lockstep")
    except metadata.PackageNotFoundError:
        return "unknown"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lockstep COMMAND [ARGS ...]   (lockstep COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += [
        "",
        "exit codes: 0 done, 1 failure, 2 bad config or input, 75 stopped by a signal (saved; rerun to resume), "
        "76 stopped by a signal, nothing saved",
    ]
    return "\n".join(lines)


_json_stdout: list = []
"""The real stdout while a ``--json`` command runs (everything else it prints goes to stderr)."""


def print_json(text: str) -> None:
    """Print one JSON document (or JSON Lines record) to the command's stdout. Under ``--json``, ``main``
    sends every other print to stderr (notices such as "loaded model from ..."), so stdout is JSON only."""
    print(text, file=_json_stdout[-1] if _json_stdout else sys.stdout, flush=True)


def report(command: str, error: BaseException) -> int:
    """One line for a user-fixable error (exit 2); LOCKSTEP_TRACEBACK=1 shows the traceback too."""
    if os.environ.get("LOCKSTEP_TRACEBACK") == "1":
        import traceback

        traceback.print_exception(error)
    print(f"lockstep {command}: error: {error}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--version", "-V"):
        print(f"lockstep {_version()}")
        return EXIT_OK
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_BAD_INPUT
    if argv[0] not in COMMANDS:
        print(f"lockstep: unknown command {argv[0]!r}\n{usage()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    module = importlib.import_module(COMMANDS[argv[0]][0])
    json_only = "--json" in argv[1:]
    if json_only:
        _json_stdout.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr) if json_only else contextlib.nullcontext():
            return module.run(argv[1:])
    except LockstepError as error:
        return report(argv[0], error)
    except SystemExit as done:  # argparse: --help (0) or a bad option (2, its one line printed already)
        return done.code if isinstance(done.code, int) else EXIT_FAILURE
    finally:
        if json_only:
            _json_stdout.pop()
