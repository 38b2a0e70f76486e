"""lockstep.data.corpus: the built-in corpus is the same on every machine (its sha256 is part of every
fingerprint built on it) and its validation split is a small, disjoint share of the documents."""

import json

from lockstep.data.corpus import builtin_corpus, corpus_documents


def test_builtin_corpus_is_deterministic_and_split():
    corpus = builtin_corpus()
    assert len(corpus.sha256) == 64
    train = corpus.train_path.read_text().splitlines()
    validation = corpus.validation_path.read_text().splitlines()
    assert len(train) > 300 and 0 < len(validation) < len(train) / 10
    assert len(corpus_documents()) == len(train) + len(validation)
    assert "text" in json.loads(train[0])
