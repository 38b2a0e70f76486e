"""lockstep.cli.arguments: a bad option is one line on stderr naming the problem and pointing at --help,
exit 2; ``integer`` keeps whole numbers within its bounds (either open) and ``number`` finite numbers at or
above (or strictly above) its low bound, each refusal saying why. These matter because every command
parses its options through them: a NaN learning rate, a negative count or infinity would otherwise reach
the command and fail deep inside it (or worse, run), and a bad option would print the whole usage text."""

from __future__ import annotations

import argparse

import pytest

from lockstep.cli.arguments import MAX_PROCESSES_PER_MACHINE, Parser, integer, number


def test_an_error_is_one_line_pointing_at_help_and_exit_2(capsys):
    parser = Parser(prog="lockstep thing")
    parser.add_argument("--steps", type=integer(low=1), required=True)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--steps", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage" not in err
    assert err == "lockstep thing: error: argument --steps: 0 must be >= 1 (lockstep thing --help lists the options)\n"
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert capsys.readouterr().err.startswith("lockstep thing: error: the following arguments are required: --steps")


def test_integer_keeps_whole_numbers_within_its_bounds():
    assert integer()("-7") == -7
    assert integer(low=0)("0") == 0
    assert integer(high=3)("-100") == -100
    assert integer(1, 4)("4") == 4
    cases = [(integer(), "1.5", "'1.5' is not a whole number"), (integer(), "nan", "'nan' is not a whole number"),
             (integer(low=0), "-1", "-1 must be >= 0"), (integer(high=3), "4", "4 must be <= 3"),
             (integer(1, 4), "5", "5 must be in 1 .. 4"), (integer(1, 4), "0", "0 must be in 1 .. 4")]  # fmt: skip
    for parse, text, message in cases:
        with pytest.raises(argparse.ArgumentTypeError) as refused:
            parse(text)
        assert str(refused.value) == message


def test_number_keeps_finite_numbers_at_or_above_its_bound():
    assert number()("-1e300") == -1e300
    assert number(0.0)("0") == 0.0
    assert number(0.0, above=True)("1e-30") == 1e-30
    cases = [(number(), "abc", "'abc' is not a number"), (number(), "nan", "nan is not a finite number"),
             (number(), "inf", "inf is not a finite number"), (number(), "-Infinity", "-Infinity is not a finite number"),
             (number(0.0), "-0.5", "-0.5 must be >= 0"), (number(0.0, above=True), "0", "0 must be > 0"),
             (number(1.5, above=True), "1.5", "1.5 must be > 1.5")]  # fmt: skip
    for parse, text, message in cases:
        with pytest.raises(argparse.ArgumentTypeError) as refused:
            parse(text)
        assert str(refused.value) == message


def test_a_refused_number_reaches_the_user_as_one_line(capsys):
    parser = Parser(prog="p")
    parser.add_argument("--lr", type=number(0.0, above=True))
    parser.add_argument("--procs", type=integer(1, MAX_PROCESSES_PER_MACHINE))
    assert (
        parser.parse_args(["--lr", "3e-4", "--procs", str(MAX_PROCESSES_PER_MACHINE)]).procs
        == MAX_PROCESSES_PER_MACHINE
    )
    for argv, message in ((["--lr", "nan"], "argument --lr: nan is not a finite number"),
                          (["--procs", str(MAX_PROCESSES_PER_MACHINE + 1)], f"argument --procs: {MAX_PROCESSES_PER_MACHINE + 1} must be in 1 .. {MAX_PROCESSES_PER_MACHINE}")):  # fmt: skip
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert capsys.readouterr().err == f"p: error: {message} (p --help lists the options)\n"
