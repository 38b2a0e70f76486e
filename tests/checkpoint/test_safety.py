"""Loading a checkpoint never runs code from it."""

import os
import pickle

import pytest

from lockstep.checkpoint import folders
from lockstep.checkpoint.safe_reader import SafeFileSystemReader, load_metadata_safely
from tests.checkpoint.helpers import train


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_metadata_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        load_metadata_safely(pickle.dumps(_Payload()))
    assert not (tmp_path / "pwned").exists()


def test_real_metadata_is_readable(tmp_path):
    train(tmp_path, ["--training.steps", "4"])
    folder = folders.step_folder(tmp_path / "run" / "checkpoint", 4)
    keys = SafeFileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert "model.output.weight" in keys
    assert any(k.startswith("optimizer.state.output.weight.exp_avg") for k in keys)
    assert any(k.startswith("rng.pipeline_rank_0.torch_cpu") for k in keys)
