"""Evaluation beyond likelihoods: judged win rates, graded scores, exact match (apo_jax.eval.judge)."""
