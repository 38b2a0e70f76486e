"""``lockstep generate PATH --prompt TEXT``: continue prompts with a trained or imported model.

PATH is a run folder (its newest checkpoint), a checkpoint step folder or a Hugging Face folder
(lockstep.generate.loading). Each prompt is encoded after the tokenizer's BOS, as training packs
documents. One prompt's continuation is printed as it comes; several are printed when their batch is
done. ``--json`` prints one JSON object per prompt and line (JSON Lines, in prompt order):
``{"prompt_ids", "generated_ids", "text", "finish_reason"}``, where generated_ids ends with EOS when
it came (finish_reason "eos", else "length") and text is the decoded generated_ids without that EOS.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lockstep.cli import EXIT_OK, print_json
from lockstep.cli.arguments import Parser, integer, number
from lockstep.errors import InputError, LockstepError
from lockstep.models.size import machine_memory_bytes


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lockstep generate", description="Continue prompts with a model.")
    parser.add_argument("path", type=Path, help="a run folder, a checkpoint step folder or a Hugging Face folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument(
        "--prompts-file", type=Path, help="a UTF-8 text file, one prompt per line (blank lines skipped)"
    )
    parser.add_argument("--max-new-tokens", type=integer(1), default=64, help="tokens per prompt at most (default 64)")
    parser.add_argument("--greedy", action="store_true", help="always the most likely token")
    parser.add_argument("--temperature", type=number(0), default=1.0, help="0 means greedy (default 1.0)")
    parser.add_argument("--top-k", type=integer(0), default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument(
        "--top-p", type=number(0, above=True), default=1.0, help="nucleus sampling mass in (0, 1] (default 1)"
    )
    parser.add_argument(
        "--seed", type=integer(0, 2**63 - 1), default=0, help="the same seed gives the same tokens (default 0)"
    )
    parser.add_argument("--batch-size", type=integer(1), default=8, help="prompts decoded together (default 8)")
    parser.add_argument("--tokenizer-path", type=Path, help="a tokenizer.json (or its folder) to use instead")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt and line")
    return parser


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_bytes().decode("utf-8").splitlines()
        except OSError as e:
            raise InputError(args.prompts_file, f"cannot be read ({e.strerror})", "give a text file") from e
        except UnicodeDecodeError as e:
            raise InputError(args.prompts_file, f"is not UTF-8 text ({e.reason} at byte {e.start})") from e
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise LockstepError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


class _Stream:
    """Prints one prompt's continuation as its tokens come. Decodes all tokens so far each time and
    prints what was added, holding back a trailing partial UTF-8 character (U+FFFD)."""

    def __init__(self, tokenizer, eos_id: int) -> None:
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, emitted: list[tuple[int, int]]) -> None:
        self.ids += [token for _, token in emitted if token != self.eos_id]
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)

    def finish(self) -> None:
        sys.stdout.write(self.tokenizer.decode(self.ids)[self.printed :] + "\n")
        sys.stdout.flush()


def _check_generation_fits(model_args, positions: int, batch: int) -> None:
    """Refuse, before anything is allocated, a generation whose RoPE table and KV cache could not fit this
    machine: at least 4 bytes per position for each rotary dimension, and per position, layer and row of
    the batch one key and one value head."""
    head = (
        getattr(model_args, "head_dim", 0)
        or getattr(model_args, "v_head_dim", 0)
        or model_args.dim // model_args.n_heads
    )
    need = 4 * positions * (head + 2 * model_args.n_layers * batch * head)
    have = machine_memory_bytes()
    if need > have:
        raise LockstepError(
            f"--max-new-tokens: {positions} positions need at least {need / 2**30:.1f} GiB for the RoPE table and "
            f"the KV cache; this machine has {have / 2**30:.1f} GiB (use fewer new tokens or a smaller --batch-size)"
        )


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from lockstep.generate.loading import load_model, load_tokenizer, resolve_device, resolve_source
    from lockstep.generate.loop import generate
    from lockstep.generate.sampling import SamplingSettings

    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )  # fmt: skip
    settings.validate()
    if args.batch_size < 1:
        raise LockstepError(f"--batch-size must be at least 1; got {args.batch_size}")
    texts = _prompts(args)
    device = resolve_device(args.device)
    source = resolve_source(args.path)
    tokenizer = load_tokenizer(source, args.tokenizer_path)
    prompts = [[tokenizer.bos_id, *ids] for ids in tokenizer.encode_batch(texts)]
    positions = max(map(len, prompts)) + settings.max_new_tokens
    _check_generation_fits(source.args, positions, min(args.batch_size, len(prompts)))
    model = load_model(source, device, positions)
    stream = len(prompts) == 1 and not args.json
    for first in range(0, len(prompts), args.batch_size):
        batch = prompts[first : first + args.batch_size]
        on_tokens = None
        if stream:
            sys.stdout.write(texts[0])
            on_tokens = _Stream(tokenizer, tokenizer.eos_id)
        generated = generate(model, batch, settings, tokenizer.eos_id, first_index=first, use_cache=True,
                             on_tokens=on_tokens)  # fmt: skip
        if on_tokens is not None:
            on_tokens.finish()
            continue
        for i, (prompt_ids, ids) in enumerate(zip(batch, generated, strict=True)):
            ended = bool(ids) and ids[-1] == tokenizer.eos_id
            text = tokenizer.decode(ids[:-1] if ended else ids)
            if args.json:
                record = {"prompt_ids": prompt_ids, "generated_ids": ids, "text": text,
                          "finish_reason": "eos" if ended else "length"}  # fmt: skip
                print_json(json.dumps(record, ensure_ascii=False))
            else:
                print(("\n" if first + i else "") + texts[first + i] + text, flush=True)
    return EXIT_OK
