"""Scoring candidates: the lm-eval adapter, built-in demo tasks, fitness."""
