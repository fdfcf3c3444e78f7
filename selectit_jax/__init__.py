"""SelectIT (arXiv 2402.16705) in JAX/Flax: rate, score, select, fine-tune."""
