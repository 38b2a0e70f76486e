"""One rank of a 64-rank FSDP job, played through the real trainer on a mirror process group: its
start-up, steps, checkpoint save and resume touch only its own share of the files, and no phase costs
more file-system operations at W = 64 than at W = 16 (counted with the audit-hook counter, not timed)."""

import pytest

from lockstep.tools.scale.rank_play import play
from tests.data.test_prepare import _corpus, _prepare

OPERATIONS = ("opens", "files", "written", "stats", "listings", "maps", "fsyncs")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared")
    _corpus(folder / "in")
    _prepare(folder / "in", folder / "out", shard_bytes=4096)
    assert len(list((folder / "out" / "shards").glob("*.tokens"))) >= 48
    return folder / "out"


def _played(prepared, tmp_path, rank, world):
    run = tmp_path / f"run-{rank}-{world}"
    return play(rank, world, dataset=prepared, dump_folder=run, steps=2), run


def _names(paths):
    return {path.rsplit("/", 1)[-1] for path in paths}


def test_a_rank_of_64_touches_its_own_share_and_no_phase_grows_with_the_world(prepared, tmp_path):
    small, _ = _played(prepared, tmp_path, 5, 16)
    played, run = _played(prepared, tmp_path, 37, 64)
    checkpoints, shards = run / "checkpoint", prepared / "shards"

    assert played.start_up.opened_under(shards) == set() and played.start_up.maps == 0
    assert played.start_up.opens[str((prepared / "manifest.json").resolve())] == 1
    for step in played.steps:  # its own samples (and the next step's, read ahead): at most 2 shards each
        assert len(step.opened_under(shards)) <= 4 and step.listings == 0
        assert step.opened_under(checkpoints) == set()

    saved = played.save.opened_under(checkpoints)
    assert _names(played.save.written) == {"__37_0.distcp"} and saved == played.save.written
    assert played.save.fsyncs == 1 and played.save.listings == 0

    loaded = _names(played.load.opened_under(checkpoints))
    assert played.load.opens[str(checkpoints.resolve() / "step-00000002" / ".metadata")] == 1
    assert "__37_0.distcp" in loaded
    peers = {name for name in loaded if name.endswith(".distcp")} - {"__37_0.distcp"}
    assert len(peers) <= 1  # a peer's file this play verifies because its reader is not played (docstring)
    assert played.resume.opened_under(shards) == set() and played.load.written == set()
    assert played.initialised == [1, 0]  # the resumed launch draws no initial weights

    for phase in ("start_up", "save", "resume", "load"):
        ours, theirs = getattr(played, phase).as_record(), getattr(small, phase).as_record()
        assert {k: ours[k] for k in OPERATIONS} == {k: theirs[k] for k in OPERATIONS}, phase
    assert [s.as_record()["stats"] for s in played.steps] == [s.as_record()["stats"] for s in small.steps]


def test_rank_0_publishes_the_manifest_in_o1_file_operations_and_checks_only_its_share_of_the_files(prepared, tmp_path):
    played, run = _played(prepared, tmp_path, 0, 64)
    step = run / "checkpoint" / "step-00000002"
    assert len(list(step.glob("*.distcp"))) == 64
    written = _names(played.save.written)
    assert {"__0_0.distcp", "lockstep.json"} <= written
    assert any(name.startswith(".metadata") for name in written)  # DCP writes it under a temporary name
    assert not any(name.startswith("__") and not name.startswith("__0_") for name in written)
    assert played.initialised == [1, 0]
    # Rank 0 publishes from the sizes and digests in DCP's write results (no file per rank read, stat'd
    # or synced), and each rank checks the sizes of its share of the data files (1 of 64) on resume: rank
    # 0's save and resume, which also write the run folder's records, cost as much at W = 64 as at 16.
    small, _ = _played(prepared, tmp_path, 0, 16)
    for phase in ("save", "resume", "load"):
        ours, theirs = getattr(played, phase).as_record(), getattr(small, phase).as_record()
        assert {k: ours[k] for k in OPERATIONS} == {k: theirs[k] for k in OPERATIONS}, phase
