"""Cost of debug.fingerprint on llama3_debug (seq 256, batch 8): tokens/s with and without, at the
default logging interval (fingerprints are taken at logged steps) and at every step.

    .venv/bin/python benchmarks/fingerprint.py [--steps 80] [--threads 2]
"""

from __future__ import annotations

import argparse
import json

from throughput import RESULTS, matmul_peak, run_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    peak = matmul_peak(args.threads)
    rows = []
    for log_freq in (10, 1):
        for fingerprint in (False, True):
            extra = ["--metrics.log_freq", str(log_freq)]
            extra += ["--debug.fingerprint"] if fingerprint else []
            result = run_one(256, 8, args.steps, args.threads, extra, peak)
            rows.append({"log_freq": log_freq, "fingerprint": fingerprint, **result})
            print(
                f"log_freq {log_freq:>2}  fingerprint {fingerprint!s:<5}  {result['tokens_per_sec']:>8,.0f} tok/s",
                flush=True,
            )
        off, on = rows[-2]["tokens_per_sec"], rows[-1]["tokens_per_sec"]
        print(f"log_freq {log_freq}: fingerprints cost {100 * (1 - on / off):.1f}% of tokens/s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fingerprint.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
