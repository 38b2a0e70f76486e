"""lockstep inspect (lockstep.tools.inspect_step): which data trained step N of a run, on the spiky run
(tests/tools/spiky.py)."""

import json

from lockstep.config import load_config
from tests.helpers import run_cli


def test_inspect_names_the_windows_the_loader_serves(spiky, capfd):
    from lockstep.data.loader import DataLoader, build_token_windows
    from lockstep.data.tokenizer import build_tokenizer

    run, _, _ = spiky
    config = load_config(str(run / "config.toml"), [])
    tokenizer = build_tokenizer(config.model, config.data)
    seed = json.loads((run / "env.json").read_text())["seeds"]["data"]
    loader = DataLoader(
        build_token_windows(config.training, config.data, tokenizer), seed=seed, global_batch=2, local_batch=1
    )
    step = 17
    code, out, _ = run_cli(["inspect", str(run), "--step", str(step), "--json", "--preview-tokens", "12"], capfd)
    shown = json.loads(out)["sources"]
    assert code == 0 and [s["sample"] for s in shown] == [32, 33]
    for j, source in enumerate(shown):
        assert source["window"] == loader.order.window_of(32 + j)
        served = loader.global_microbatch(32, j).inputs[0, :12].tolist()
        assert source["preview"] == tokenizer.decode(served)
