"""Is the synthetic data useful: downstream classifiers, sentence embeddings, MAUVE, memorisation.

`classifier` (fine-tuned or embedding classifiers trained on one source, tested on the real test
set), `embeddings` (MiniLM features, logistic regression, MAUVE), `dp_classifier` (a classifier
trained directly with DP-SGD, the baseline a synthetic set must beat), `memorisation` (the
suffix-array screen). The evaluate stage (`dpnb.stages.evaluate`) runs them.
"""
