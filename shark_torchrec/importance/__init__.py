"""F-Permutation: feature-field importance (Taylor, Permutation, random) and pruning."""
