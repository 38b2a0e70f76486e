"""Corpus, tokenizers, tokenized-and-packed datasets, and the deterministic sample order.

Data knows no model: it produces token windows and document boundaries, nothing else.
"""
