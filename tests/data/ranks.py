"""Bodies of the processes that data tests start (a module of its own: a spawned process imports only it)."""

from lockstep.data.auto_prepare import prepare_cached
from lockstep.data.sources import file_source
from lockstep.data.tokenizer import BytesTokenizer


def auto_prepare_rank(barrier, path: str, cache: str, results) -> None:
    """A local rank starting on `path` at the same moment as the others; puts whether it tokenized."""
    barrier.wait()
    results.put(prepare_cached(file_source("json", path, "text"), BytesTokenizer(), cache)[1])
