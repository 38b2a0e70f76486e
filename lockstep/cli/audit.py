"""``lockstep audit``: nondeterministic ops and layout-dependent settings of a config."""

from __future__ import annotations

from lockstep.cli.arguments import Parser, integer
from lockstep.config import load_config


def run(argv: list[str]) -> int:
    parser = Parser(
        prog="lockstep audit",
        description="Run a few steps with deterministic warn-only mode and list every nondeterministic op "
        "and every layout-dependent feature of the config (exit 1 if any is nondeterministic).",
    )
    parser.add_argument("--config", help="a shipped config name or a TOML file path")
    parser.add_argument("--steps", type=integer(1, 10**6), default=3)
    args, overrides = parser.parse_known_args(argv)
    import tempfile

    from lockstep.tools.audit import audit_overrides, config_findings, format_findings, torch_alerts

    config = load_config(args.config, overrides)
    known = config_findings(
        debug=config.debug, parallelism=config.parallelism, optimizer=config.optimizer, training=config.training,
        compile_config=config.compile, model=config.model, document_masking=config.data.document_masking,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        audited = load_config(args.config, overrides + audit_overrides(args.steps, f"{folder}/run"))
        audited.fault_tolerance.enable = False  # a brief run alone, never in a live job's quorum
        from lockstep.train.trainer import Trainer

        def train_briefly() -> None:
            with Trainer(audited, show_progress=False) as trainer:
                trainer.train()

        findings = torch_alerts(train_briefly) + known
    print(format_findings(findings))
    return 1 if any(f.verdict == "nondeterministic" for f in findings) else 0
