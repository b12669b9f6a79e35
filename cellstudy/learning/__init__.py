"""Learning: folds and augmentation, the networks, training (both regimes, resume), the classical
baseline, metrics and the convergence rule."""
