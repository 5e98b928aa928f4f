"""CLAIR: contrastive revisions of the model's own answers, and how contrastive pairs are.

`python -m apo_jax.data.clair revise ...` and `... stats ...` (see __main__).
"""

from apo_jax.data.clair.prompts import ParseError, parse_revision, revision_messages
from apo_jax.data.clair.stats import jaccard, levenshtein, pair_stats

__all__ = ["ParseError", "jaccard", "levenshtein", "pair_stats", "parse_revision", "revision_messages"]
