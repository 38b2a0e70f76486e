"""``lockstep config-reference``: every config key with its default and docstring."""

from __future__ import annotations


def run(argv: list[str]) -> int:
    from lockstep.config.reference import config_reference

    print(config_reference())
    return 0
