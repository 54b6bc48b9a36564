"""Evaluation: HumanEval pass@k in a sandbox, log-likelihood tasks, perplexity, lm-eval adapter."""
