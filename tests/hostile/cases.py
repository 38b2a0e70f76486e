"""The catalogue of hostile cases (issue 25), by group: checkpoint step folders, Hugging Face folders,
prepared data folders and user datasets, run-folder files read back, every config number and every
command-line number, a few refusals through a real process, and signals against real processes.
`fast` cases run in ``make test``; the benchmark (benchmarks/hostile.py) runs them all."""

from __future__ import annotations

from collections import Counter

from tests.hostile import (
    cases_checkpoint,
    cases_cli,
    cases_config,
    cases_data,
    cases_hf,
    cases_run,
    cases_signals,
    cases_user,
)
from tests.hostile.harness import Case

GROUPS = (cases_checkpoint, cases_hf, cases_data, cases_run, cases_config, cases_cli, cases_user, cases_signals)


def all_cases() -> list[Case]:
    found = [case for module in GROUPS for case in module.cases()]
    repeated = [name for name, count in Counter(c.id for c in found).items() if count > 1]
    if repeated:
        raise ValueError(f"case ids must be unique; repeated: {repeated[:5]}")
    return found


CASES = all_cases()
FAST = [case for case in CASES if case.fast]
