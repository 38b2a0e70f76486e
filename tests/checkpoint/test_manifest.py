"""lockstep.checkpoint.manifest: a manifest is untrusted input, so its shape check refuses an entry that
names a device or a path outside its step folder before any file is opened, and the resume falls back to
the older checkpoint."""

import json

import pytest

from lockstep.checkpoint import folders
from lockstep.train.trainer import Trainer
from tests.checkpoint.conftest import EIGHT
from tests.checkpoint.helpers import CHECKPOINTED
from tests.helpers import tiny_config


@pytest.mark.parametrize(
    "key",
    ["/dev/zero", "../../../../../../etc/hostname", "sub/dir", ".."],
    ids=["device", "escape", "nested", "parent"],
)
def test_a_manifest_cannot_name_a_file_outside_its_step_folder(run, capsys, monkeypatch, key):
    """A checksum (or file) entry naming a device or a path outside the folder used to make the resume hash
    /dev/zero forever or open /etc/hostname. The manifest's shape check refuses it before any file is
    opened, and the resume falls back to the older checkpoint."""
    step_8 = folders.step_folder(run / "run" / "checkpoint", 8)
    manifest = json.loads((step_8 / folders.MANIFEST).read_text())
    manifest["checksums"][key] = "0" * 32
    (step_8 / folders.MANIFEST).write_text(json.dumps(manifest))
    opened = []
    monkeypatch.setattr("builtins.open", _recording_open(opened))
    with Trainer(tiny_config(run, *CHECKPOINTED, *EIGHT), show_progress=False) as trainer:
        assert trainer.state.step == 4
    assert not any(str(path).startswith(("/dev/", "/etc/")) for path in opened)
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and f"checksums.{key}" in out


def _recording_open(opened: list):
    real = open

    def recording(file, *args, **kwargs):
        opened.append(file)
        return real(file, *args, **kwargs)

    return recording
