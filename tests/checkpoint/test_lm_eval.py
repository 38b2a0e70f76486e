"""lm-eval 0.4's ``hf`` model (its users' way: ``simple_evaluate(model="hf", model_args="pretrained=...")``)
scores a small local multiple-choice task on a ``lockstep convert to-hf`` export, with no network: the
export's weights, tokenizer files and special tokens are enough, and every log-likelihood lm-eval reports
is the one lockstep's own model gives the same text (so its accuracy is lockstep's).

lm-eval is an optional extra (``pip install -e .[eval]``); without it this test is skipped."""

import json
import math

import pytest
import torch

from lockstep.checkpoint.hf import export_to_hf
from lockstep.train.trainer import Trainer
from tests.checkpoint.helpers import CHECKPOINTED, train
from tests.helpers import tiny_config

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402  (after the skip: only with the extra)

DOCS = [
    {"context": "def main():\n    return", "choices": ["0", "import", "class"], "gold": 1},
    {"context": "for i in range(10):\n   ", "choices": ["print(i)", "return", "]"], "gold": 1},
    {"context": "import", "choices": ["os", "=", "def"], "gold": 2},
    {"context": "class Foo(", "choices": ["object):", "return", "0"], "gold": 0},
]
"""The golds are set so that the 4-step model gets some right and some wrong: the accuracy lm-eval reports
then tests how it uses the log-likelihoods, not only that it runs."""
TASK = """task: lockstep_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval's hf model splits the pair: the context's trailing
    whitespace moved to the continuation, the whole text encoded, the continuation's tokens being those
    after the context's encoding (no BOS added)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode_batch([context + continuation])[0]
    context_ids = tokenizer.encode_batch([context])[0]
    tokens = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens[:, :-1]).double(), dim=-1)[0]
    targets = whole[len(context_ids) :]
    start = len(context_ids) - 1
    return sum(logprobs[start + i, t].item() for i, t in enumerate(targets))


def test_lm_eval_scores_a_local_task_on_the_export_as_lockstep_would(tmp_path, monkeypatch):
    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(offline, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # nothing cached from elsewhere
    train(tmp_path, ["--training.steps", "4"])
    export_to_hf(tmp_path / "run", tmp_path / "hf")
    (tmp_path / "task").mkdir()
    data = tmp_path / "task" / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tmp_path / "task" / "lockstep_local.yaml").write_text(TASK.format(data=data))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32", tasks=["lockstep_local"],
        task_manager=TaskManager(include_path=str(tmp_path / "task")), device="cpu", batch_size=2, log_samples=True,
    )  # fmt: skip
    samples = sorted(results["samples"]["lockstep_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    with Trainer(tiny_config(tmp_path, *CHECKPOINTED, "--training.steps", "4"), show_progress=False) as trainer:
        model, tokenizer = trainer.model.parts[0].eval(), trainer.tokenizer
        ours = [[_loglikelihood(model, tokenizer, d["context"], " " + c) for c in d["choices"]] for d in DOCS]
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    assert all(math.isclose(a, b, abs_tol=1e-5) for row_a, row_b in zip(ours, theirs, strict=True) for a, b in zip(row_a, row_b, strict=True)), (ours, theirs)  # fmt: skip
    accuracy = sum(
        max(range(len(row)), key=row.__getitem__) == d["gold"] for row, d in zip(ours, DOCS, strict=True)
    ) / len(DOCS)
    assert 0 < accuracy < 1 and results["results"]["lockstep_local"]["acc,none"] == pytest.approx(accuracy)
