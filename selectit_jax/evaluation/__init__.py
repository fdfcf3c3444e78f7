"""`evaluate`: benchmarks (tasks), their log-likelihood forms through the scoring engine
(loglik), per-item results and the summary (results), the command (runner)."""
