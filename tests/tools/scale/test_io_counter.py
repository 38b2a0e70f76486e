"""lockstep.tools.scale.io_counter: opens (with the paths opened for writing), stats, listings, memory
maps, fsyncs and bytes done inside a count are counted; a nested count or ``not_counted`` takes its work
out of the outer count; the wrapped os functions are the real ones again after the count. Every expected
figure is what the test's own file operations must add."""

import mmap
import os

from lockstep.tools.scale.io_counter import counting_file_ops, not_counted

PAYLOAD = 1 << 20  # bytes: far above any incidental write of the process


def test_each_kind_of_file_operation_is_counted_with_its_paths(tmp_path):
    real = (os.stat, os.lstat, os.fsync)
    (tmp_path / "read.bin").write_bytes(b"x" * 4096)
    with counting_file_ops() as ops:
        with open(tmp_path / "written.bin", "wb") as f:
            f.write(b"y" * PAYLOAD)
            f.flush()
            os.fsync(f.fileno())
        for _ in range(2):
            (tmp_path / "read.bin").read_bytes()
        os.stat(tmp_path / "read.bin")
        os.lstat(tmp_path / "read.bin")
        os.listdir(tmp_path)
        with open(tmp_path / "read.bin", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ):
            pass
    written, read = os.path.abspath(tmp_path / "written.bin"), os.path.abspath(tmp_path / "read.bin")
    assert ops.opens == {written: 1, read: 3}
    assert ops.written == {written}
    assert ops.opened_under(tmp_path) == {written, read}
    assert ops.opened_under(tmp_path / "elsewhere") == set()
    assert ops.listings == 1 and ops.maps == 1 and ops.fsyncs == 1
    assert ops.stats >= 2  # the two calls here (read_bytes and open may stat too)
    assert ops.bytes_written >= PAYLOAD and ops.bytes_read >= 2 * 4096
    record = ops.as_record()
    assert (record["opens"], record["files"], record["written"]) == (4, 2, 1)
    assert (os.stat, os.lstat, os.fsync) == real  # unwrapped after the count


def test_a_nested_count_and_not_counted_take_their_work_out_of_the_outer_count(tmp_path):
    with counting_file_ops() as outer:
        with counting_file_ops() as inner:
            (tmp_path / "inner.bin").write_bytes(b"z" * PAYLOAD)
            os.stat(tmp_path / "inner.bin")
        with not_counted():
            (tmp_path / "other_rank.bin").write_bytes(b"w" * PAYLOAD)
            os.listdir(tmp_path)
        (tmp_path / "outer.bin").write_bytes(b"v")
    inner_path, outer_path = (os.path.abspath(tmp_path / name) for name in ("inner.bin", "outer.bin"))
    assert set(inner.opens) == inner.written == {inner_path} and inner.stats >= 1
    assert inner.bytes_written >= PAYLOAD
    assert set(outer.opens) == outer.written == {outer_path} and outer.listings == 0
    assert outer.bytes_written < PAYLOAD  # neither megabyte is the outer count's
