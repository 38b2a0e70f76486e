"""The run folder's contract, which training writes and every tool reads: the folder and its
environment record, the launches and the resume policy, the lock that keeps one run per folder, and
metrics.jsonl."""
