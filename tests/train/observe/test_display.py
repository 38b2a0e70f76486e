"""The console: a logged record's line, and a display that stays silent when disabled and draws no
progress bar off a terminal."""

import pytest

from lockstep.train.observe.display import ConsoleDisplay, format_record

RECORD = {
    "step": 12, "loss": 2.345678, "grad_norm": 0.5, "lr": 3e-4, "tokens_per_sec": 12345.6, "mfu": 41.25,
    "memory_gib": 1.5,
}  # fmt: skip


def test_a_record_is_one_line_with_its_figures_rounded_for_reading():
    line = format_record(RECORD)
    assert "\n" not in line and line.startswith("step     12  loss 2.3457  grad_norm 0.5000  lr 3.00e-04")
    assert "tok/s 12,346" in line and "mfu 41.2%" in line and line.endswith("mem 1.50 GiB")
    assert "val_loss" not in line and "expert load" not in line


def test_validation_and_the_worst_expert_balance_are_appended_when_present():
    record = RECORD | {"val_loss": 2.0, "val_ppl": 7.389056, "moe/layers.0/load_cv": 0.25}
    record |= {"moe/layers.1/load_cv": 1.75, "moe/layers.1/max_load": 9.0}  # not a cv: not counted
    line = format_record(record)
    assert "val_loss 2.0000  val_ppl 7.39" in line and line.endswith("expert load cv max 1.75")


@pytest.mark.parametrize("enabled", [True, False])
def test_off_a_terminal_there_is_no_progress_bar_and_a_disabled_display_prints_nothing(capsys, enabled):
    display = ConsoleDisplay(total_steps=10, start_step=2, enabled=enabled)  # pytest's stdout is no terminal
    assert display._progress is None
    display.step(3, 1.0)
    display.print("hello [bold]world[/bold]")  # no markup: printed as written
    display.close()
    assert capsys.readouterr().out == ("hello [bold]world[/bold]\n" if enabled else "")
