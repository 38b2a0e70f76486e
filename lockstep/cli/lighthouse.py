"""``lockstep lighthouse --port P --min-replicas N``: torchft's lighthouse, which forms the quorum of
replica groups for fault-tolerant training (the fault_tolerance section).

It runs torchft's own ``LighthouseServer`` in this process (the same server as the package's
``torchft_lighthouse`` binary), prints its address (what ``--fault_tolerance.lighthouse`` or
``$TORCHFT_LIGHTHOUSE`` takes; a browser shows the quorum there) and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import signal
import threading

from lockstep.cli import EXIT_OK
from lockstep.cli.arguments import Parser, integer
from lockstep.errors import LockstepError


def run(argv: list[str]) -> int:
    parser = Parser(
        prog="lockstep lighthouse", description="Serve torchft's lighthouse for fault-tolerant replica groups."
    )
    parser.add_argument("--port", type=integer(0, 65535), default=29510, help="port to serve on (0: any free port)")
    parser.add_argument("--bind", default="[::]", help="address to bind (default all interfaces)")
    parser.add_argument(
        "--min-replicas", type=integer(1), default=1, help="fewest replica groups a quorum may hold (default 1)"
    )
    parser.add_argument(
        "--join-timeout-ms", type=integer(0), default=60000, help="how long a quorum waits for more groups to join"
    )
    parser.add_argument(
        "--heartbeat-timeout-ms", type=integer(1), default=5000, help="a group silent this long is dropped from quorums"
    )
    args = parser.parse_args(argv)
    if args.min_replicas < 1:
        raise LockstepError("--min-replicas must be >= 1")
    if not 0 <= args.port < 65536:
        raise LockstepError(f"--port must be in 0 .. 65535; got {args.port}")
    try:
        from torchft.coordination import LighthouseServer
    except ImportError as error:
        raise LockstepError("lockstep lighthouse needs torchft; pip install torchft==0.2.0") from error
    try:
        server = LighthouseServer(
            bind=f"{args.bind}:{args.port}",
            min_replicas=args.min_replicas,
            join_timeout_ms=args.join_timeout_ms,
            heartbeat_timeout_ms=args.heartbeat_timeout_ms,
        )
    except Exception as error:  # the Rust server reports a taken port as a RuntimeError
        raise LockstepError(f"cannot serve the lighthouse on {args.bind}:{args.port}: {error}") from error
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"lighthouse at {server.address()} (min replicas {args.min_replicas}); Ctrl-C stops it", flush=True)
    stop.wait()
    server.shutdown()
    return EXIT_OK
