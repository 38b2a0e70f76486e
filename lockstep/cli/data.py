"""``lockstep data prepare|finalize|verify``: tokenize a dataset once into a prepared folder, in parallel
and resumably, then train on it with ``--training.dataset prepared --training.dataset_path FOLDER``.

``prepare`` splits the input into shards (files, or byte ranges of JSON Lines files) and tokenizes them
in worker processes; ``--num-jobs N --job-index i`` runs one of N independent jobs (e.g. a SLURM array),
and ``finalize`` writes the manifest once all are done (a lone job finalizes itself). ``verify`` re-hashes
every shard against the manifest: exit 1 naming each file that differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lockstep.cli import EXIT_FAILURE, EXIT_OK
from lockstep.cli.arguments import MAX_PROCESSES_PER_MACHINE, Parser, integer, number
from lockstep.errors import InputError, LockstepError

EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lockstep data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="tokenize a dataset into a prepared folder")
    prepare.add_argument("--dataset", required=True, choices=["text", "json", "parquet", "hf"])
    prepare.add_argument(
        "--dataset-path",
        required=True,
        help="a file or folder (text: .txt, one document each; json: .json/.jsonl; parquet); for hf a dataset "
        "name in the local Hugging Face cache or a folder (read offline)",
    )
    prepare.add_argument("--tokenizer", default="builtin", choices=["builtin", "bytes", "hf"])
    prepare.add_argument("--tokenizer-path", default="", help="tokenizer.json or its folder (--tokenizer hf)")
    prepare.add_argument("--out", required=True, type=Path, help="the prepared folder (new, or this preparation's)")
    prepare.add_argument(
        "--workers", type=integer(0, MAX_PROCESSES_PER_MACHINE), default=0, help="worker processes; 0 = one per core"
    )
    prepare.add_argument(
        "--tokenizer-threads",
        type=integer(0, 4096),
        default=0,
        help="tokenizer threads per worker; 0 = cores / workers",
    )
    prepare.add_argument("--num-jobs", type=integer(1, 10**6), default=1, help="independent jobs sharing the work")
    prepare.add_argument("--job-index", type=integer(0), default=0, help="this job's index, 0 .. num-jobs - 1")
    prepare.add_argument(
        "--shard-mb",
        type=number(0, above=True),
        default=16.0,
        help="input MB per shard (JSON Lines files are cut at line ends)",
    )
    prepare.add_argument("--text-field", default="text", help="field/column holding the text (json, parquet, hf)")
    prepare.add_argument("--split", default="train", help="the split to read (hf)")
    prepare.add_argument(
        "--cache-folder", default="", help="where the built-in tokenizer is cached (data.cache_folder)"
    )
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, text in (("finalize", "write the manifest once every job is done"), ("verify", "re-hash every shard")):
        commands.add_parser(name, help=text).add_argument("folder", type=Path)
    return parser


def _tokenizer(args: argparse.Namespace):
    from lockstep.config.sections import DataConfig, ModelConfig
    from lockstep.data.tokenizer import HFTokenizer, build_tokenizer

    if args.tokenizer != "hf":
        if args.tokenizer_path:
            raise LockstepError(f"--tokenizer-path: has no effect with --tokenizer {args.tokenizer}; drop it")
        return build_tokenizer(ModelConfig(tokenizer=args.tokenizer), DataConfig(cache_folder=args.cache_folder))
    path = Path(args.tokenizer_path)
    if not args.tokenizer_path or not (path.is_file() or (path / "tokenizer.json").is_file()):
        raise InputError(args.tokenizer_path or "--tokenizer-path", "no tokenizer.json there", "pass --tokenizer-path")
    return HFTokenizer(path)


def _prepare(args: argparse.Namespace) -> int:
    from lockstep.data.prepare import prepare
    from lockstep.data.shard_plan import plan_files, plan_hf
    from lockstep.data.sources import file_source

    if args.num_jobs < 1 or not 0 <= args.job_index < args.num_jobs:
        raise LockstepError(f"--job-index {args.job_index} of --num-jobs {args.num_jobs}: need 0 <= index < jobs")
    if args.workers < 0 or args.tokenizer_threads < 0:
        raise LockstepError("--workers and --tokenizer-threads must be >= 0 (0 = automatic)")
    tokenizer = _tokenizer(args)
    if args.shard_mb <= 0:
        raise LockstepError(f"--shard-mb must be > 0; got {args.shard_mb}")
    shard_bytes = max(1, int(args.shard_mb * (1 << 20)))
    if args.dataset == "hf":
        source, tasks = plan_hf(args.dataset_path, args.split, args.text_field, shard_bytes)
    else:
        files = file_source(args.dataset, args.dataset_path, args.text_field, key="--dataset-path")
        source, tasks = plan_files(files, shard_bytes)
    result = prepare(
        source,
        tasks,
        str(Path(args.dataset_path).resolve()) if args.dataset != "hf" else args.dataset_path,
        tokenizer,
        args.out,
        tokenizer_name=args.tokenizer if args.tokenizer != "hf" else str(Path(args.tokenizer_path).resolve()),
        workers=args.workers,
        tokenizer_threads=args.tokenizer_threads,
        num_jobs=args.num_jobs,
        job_index=args.job_index,
        show_progress=not args.no_progress and sys.stderr.isatty(),
    )
    if result.status == "already prepared":
        print(f"{args.out}: already prepared from these inputs with this tokenizer; nothing to do", flush=True)
    else:
        print(result.summary(), flush=True)
    return EXIT_OK


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            return _prepare(args)
        if args.command == "finalize":
            from lockstep.data.finalize import finalize

            manifest = finalize(args.folder)
            print(
                f"{args.folder}: manifest written: {len(manifest['shards'])} shards, {manifest['num_tokens']} tokens, "
                f"{manifest['num_documents']} documents; fingerprint {manifest['fingerprint'][:16]}",
                flush=True,
            )
            return EXIT_OK
        from lockstep.data.finalize import verify

        problems = verify(args.folder)
        for problem in problems:
            print(f"lockstep data verify: {problem}", file=sys.stderr, flush=True)
        if problems:
            return EXIT_FAILURE
        print(f"{args.folder}: every shard matches the manifest", flush=True)
        return EXIT_OK
    except KeyboardInterrupt:
        print(
            "lockstep data: interrupted; finished shards are kept: run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
