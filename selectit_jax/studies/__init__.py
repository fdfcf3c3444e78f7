"""`study`: train one base model on several selections of one scored pool (SelectIT, random,
longest responses, the full pool), evaluate each, and compare them the way the paper's tables do."""
