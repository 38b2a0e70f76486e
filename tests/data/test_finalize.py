"""lockstep.data.finalize: `lockstep data verify` re-hashes every shard against the manifest and names the
file whose content differs, since a flipped byte would otherwise train silently on other tokens."""

from lockstep.cli import main
from tests.data.test_prepare import _corpus, _prepare


def test_verify_names_a_flipped_byte(tmp_path, capsys):
    _corpus(tmp_path / "in")
    out = _prepare(tmp_path / "in", tmp_path / "out", shard_bytes=16 << 10).folder
    assert main(["data", "verify", str(out)]) == 0
    shard = out / "shards" / "00002.tokens"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(data)
    assert main(["data", "verify", str(out)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lockstep data verify: {shard}: content differs from the manifest's xxh3_128 checksum"
    ]
