"""lockstep compare: tables, first differing step, plots, exit codes (--run: test_run_pair.py)."""

import json
import math
import os
import subprocess
import sys

from lockstep.cli import main

LOCKSTEP = os.path.join(os.path.dirname(sys.executable), "lockstep")


def _losses(path, values):
    path.write_text(
        "".join(json.dumps({"step": i + 1, "loss": v, "grad_norm": 1.0}) + "\n" for i, v in enumerate(values))
    )
    return path


def _compare(*args):
    return subprocess.run([LOCKSTEP, "compare", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_one_ulp_is_found_at_its_step(tmp_path):
    values = [8.0 - 0.1 * i for i in range(10)]
    changed = values.copy()
    changed[6] = math.nextafter(changed[6], math.inf)  # one ULP (of a double) at step 7
    a, b = _losses(tmp_path / "a.jsonl", values), _losses(tmp_path / "b.jsonl", changed)
    done = _compare(a, b, "--assert-equal", "--plot", tmp_path / "plot.png")
    assert done.returncode == 1
    assert "first differing step (bitwise): 7" in done.stdout
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert _compare(a, b, "--rtol", "1e-9").returncode == 0
    copy = _losses(tmp_path / "a_again.jsonl", values)
    assert _compare(a, copy, "--assert-equal").returncode == 0
    assert _compare(a, a, "--assert-equal").returncode == 2  # a run against itself proves nothing


def _gate(capsys, *args):
    """lockstep compare in this process (no interpreter start): (exit code, stdout, stderr)."""
    code = main(["compare", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_gate_fails_on_steps_it_did_not_compare(tmp_path, capsys):
    full = _losses(tmp_path / "full.jsonl", [8.0 - 0.1 * i for i in range(10)])
    crashed = _losses(tmp_path / "crashed.jsonl", [8.0 - 0.1 * i for i in range(6)])  # steps 1-6 of the same run
    code, out, _ = _gate(capsys, full, crashed, "--assert-equal")
    assert code == 1
    assert f"{crashed} lacks 4 step(s) the other runs logged: 7-10" in out
    assert _gate(capsys, full, crashed, "--rtol", "1e-6")[0] == 1
    assert _gate(capsys, full, crashed, "--assert-equal", "--common-steps-only")[0] == 0
    assert _gate(capsys, full, crashed)[0] == 0  # no gate: the table and the note only
    later = tmp_path / "later.jsonl"
    later.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (11, 12)))
    code, out, _ = _gate(capsys, full, later, "--assert-equal", "--common-steps-only")
    assert code == 1 and "no common step" in out


def test_an_empty_or_malformed_run_is_one_line_and_exit_2(tmp_path, capsys):
    good = _losses(tmp_path / "good.jsonl", [1.0, 2.0])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss":\n')
    (tmp_path / "nostep.jsonl").write_text('{"loss": 1.0}\n')
    (tmp_path / "folder").mkdir()  # a run folder without metrics.jsonl
    for bad in ("empty.jsonl", "broken.jsonl", "nostep.jsonl", "folder", "absent.jsonl"):
        code, out, err = _gate(capsys, good, tmp_path / bad, "--assert-equal")
        assert code == 2, bad
        assert len(err.splitlines()) == 1 and err.startswith("lockstep compare: error: "), err
        assert bad in err and out == ""


def test_a_plot_into_a_missing_folder_or_of_an_unknown_format_is_one_line_before_any_work(tmp_path, capsys):
    a = _losses(tmp_path / "a.jsonl", [1.0, 2.0])
    b = _losses(tmp_path / "b.jsonl", [1.0, 2.5])
    for plot, fragment in ((tmp_path / "missing" / "c.png", "does not exist"), (tmp_path / "c.xyz", "no image suffix")):
        code, out, err = _gate(capsys, a, b, "--plot", plot)
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and fragment in err, err


def test_identical_nans_are_equal_whether_bare_or_strings(tmp_path, capsys):
    bare = tmp_path / "bare.jsonl"  # Python's json writes NaN/Infinity as bare tokens
    bare.write_text('{"step": 1, "loss": 2.5, "grad_norm": Infinity}\n{"step": 2, "loss": NaN, "grad_norm": NaN}\n')
    strict = tmp_path / "strict.jsonl"  # strict JSON writers give them as strings
    strict.write_text(
        '{"step": 1, "loss": 2.5, "grad_norm": "Infinity"}\n{"step": 2, "loss": "NaN", "grad_norm": "NaN"}\n'
    )
    code, out, _ = _gate(capsys, bare, strict, "--assert-equal")
    assert code == 0 and "no difference (bitwise) at the 2 common step(s)" in out
    assert _gate(capsys, bare, strict, "--rtol", "1e-9")[0] == 0
    finite = _losses(tmp_path / "finite.jsonl", [2.5, 3.0])
    code, out, _ = _gate(capsys, bare, finite, "--assert-equal")
    assert code == 1 and "first differing step (bitwise): 1" in out  # inf vs 1.0 grad norm at step 1


def test_config_and_environment_differences_are_printed_above_the_table(tmp_path, capsys):
    runs = []
    for name, lr, threads, dp in (("a", "0.001", 1, 1), ("b", "0.002", 4, 2)):
        run = tmp_path / name
        run.mkdir()
        run.joinpath("config.toml").write_text(f'[job]\ndump_folder = "{run}"\n[optimizer]\nlr = {lr}\neps = 1e-8\n')
        env = {"versions": {"torch": "2.13.0", "numpy": name}, "threads": threads, "world_size": dp}
        env |= {"git": {"revision": "abc", "dirty": False}, "layout": {"degrees": {"dp": dp, "tp": 1}}, "host": name}
        run.joinpath("env.json").write_text(json.dumps(env))
        _losses(run / "metrics.jsonl", [1.0, 2.0])
        runs.append(run)
    code, out, _ = _gate(capsys, *runs, "--assert-equal")
    assert code == 0
    above = out.split("step | ")[0].splitlines()
    assert above == [
        "config differs:",
        "  optimizer.lr: 0.001 vs 0.002",
        "environment differs:",
        "  layout.degrees.dp: 1 vs 2",
        "  threads: 1 vs 4",
        "  world_size: 1 vs 2",
    ]


def _run_with_validation(folder, val_losses, steps=20, freq=10):
    """A run folder whose metrics.jsonl holds val_loss (with val_ppl, val_tokens) every `freq` steps."""
    folder.mkdir()
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 8.0 - 0.1 * step, "grad_norm": 1.0, "elapsed_s": 0.5 * step}
        if step % freq == 0 and val_losses:
            val = val_losses[step // freq - 1]
            record |= {"val_loss": val, "val_ppl": math.exp(val), "val_tokens": 7418}
        lines.append(json.dumps(record) + "\n")
    (folder / "metrics.jsonl").write_text("".join(lines))
    return folder


def test_val_loss_gets_its_table_and_gate(tmp_path, capsys):
    values = [6.8466615201, 6.4998088475]
    changed = [values[0], math.nextafter(values[1], math.inf)]  # one ULP at the evaluation of step 20
    a = _run_with_validation(tmp_path / "a", values)
    b = _run_with_validation(tmp_path / "b", changed)
    code, out, _ = _gate(capsys, a, b, "--assert-equal", "--plot", tmp_path / "plot.png")
    assert code == 1
    assert "no difference (bitwise) at the 20 common step(s)" in out  # the training losses agree
    assert f"eval step | val_loss {a} | val_loss {b} | max abs diff | max rel diff | bitwise equal" in out
    assert "\n10 | 6.84666152 | 6.84666152 | 0.000e+00 | 0.000e+00 | yes" in out
    assert "\n20 | 6.49980885 | 6.49980885 | 8.882e-16 | 1.366e-16 | no" in out
    assert "first differing evaluation step (bitwise): 20" in out
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert _gate(capsys, a, b, "--rtol", "1e-9")[0] == 0
    code, out, _ = _gate(capsys, a, _run_with_validation(tmp_path / "a_again", values), "--assert-equal")
    assert code == 0 and "no val_loss difference (bitwise) at the 2 common evaluation step(s)" in out


def test_val_loss_only_some_runs_have_is_noted_not_gated(tmp_path, capsys):
    with_val = _run_with_validation(tmp_path / "with", [6.8, 6.5])
    without = _run_with_validation(tmp_path / "without", [])
    code, out, _ = _gate(capsys, with_val, without, "--assert-equal")
    assert code == 0
    assert "eval step" not in out
    assert f"{without} lacks val_loss at 2 step(s) another run evaluated: 10, 20" in out
    code, out, _ = _gate(capsys, without, _run_with_validation(tmp_path / "neither", []), "--assert-equal")
    assert code == 0  # runs without validation: as before
    assert out.splitlines()[-1] == "no difference (bitwise) at the 20 common step(s)"
