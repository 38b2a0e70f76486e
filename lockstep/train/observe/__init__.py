"""What the trainer reports and never changes: step metrics, throughput, the console, profiles and
memory snapshots, fingerprints, per-sample losses, expert load."""
