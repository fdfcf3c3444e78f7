"""Evaluation of a tuned model on the paper's benchmarks."""
