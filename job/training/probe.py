"""Probe: a linear probe, the L2-regularised logistic regression on a frozen base's pooled features.

It is the default head's phase 1 (DENSE_UNITS=0): the probe is solved, not trained by epochs, and
its weights become the head's output layer, so that fine-tuning starts from the best linear head
the frozen features allow ("LP-FT", Kumar et al. 2022, arXiv:2202.10054). It is also the baseline
bench/quality.py scores the job against, fitted the same way.

scikit-learn solves it (lbfgs, to convergence): a Keras head trained by Adam for a few epochs on
augmented features ended below it on the validation split of every data set measured (README,
Quality). The features are centred on the training split and divided by one scale, their root
mean square there, so that one grid of C fits every backbone; both are folded into the weights
afterwards, so the head takes the raw features. One scale, not one per feature as a
StandardScaler would: folding a per-feature scale multiplied the weights of nearly constant
features by up to 10^4, which int8 quantization of the head then rounded away (every test image
one class) and which fine-tuning amplified.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from threadpoolctl import threadpool_limits

C_GRID = [float(f"{c:.3g}") for c in np.logspace(-4, 2, 10)]  # inverse L2 strengths tried


@dataclasses.dataclass(frozen=True)
class Probe:
    """The fitted probe: its C, chosen on validation, the Cs whose solver did not converge, and
    the regression on the features centred by mean and divided by scale."""

    c: float
    unconverged: list[float]
    validation_accuracy: float
    mean: np.ndarray  # per feature, of the training split
    scale: float  # one for all features
    regression: LogisticRegression

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Per-class probabilities of raw (unscaled) features."""
        return self.regression.predict_proba((features - self.mean) / self.scale)

    def dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(kernel, bias) of the Dense layer that computes the same logits from the raw features:
        one sigmoid unit (the second class's logit) for two classes, a softmax row otherwise."""
        kernel = self.regression.coef_ / self.scale  # (outputs, features)
        bias = self.regression.intercept_ - kernel @ self.mean
        return kernel.T.astype(np.float32), bias.astype(np.float32)


def fit(train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
        balanced: bool) -> Probe:
    """Fits a regression per C of C_GRID on train (features, labels) and keeps the C with the best
    validation accuracy; ties (frequent on small splits) go to the lower validation log loss.
    balanced: weight the classes n / (k * count), as the job's CLASS_WEIGHTS=auto does."""
    mean = train[0].mean(axis=0)
    scale = float(np.sqrt(np.mean((train[0] - mean) ** 2))) or 1.0  # 1: constant features
    features, validation_features = (train[0] - mean) / scale, (validation[0] - mean) / scale
    fitted, unconverged = {}, []
    # One BLAS thread: lbfgs multiplies small matrices hundreds of times per C, and OpenBLAS's
    # second thread spins between them; on 2 loaded cores the grid took 122 s wall, 36 s CPU on
    # intel_scenes against 17 s, 2.8 s on one thread, choosing the same C (docs/training.md).
    with threadpool_limits(1, user_api="blas"):
        for c in C_GRID:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                fitted[c] = LogisticRegression(C=c, max_iter=2000,
                                               class_weight="balanced" if balanced else None
                                               ).fit(features, train[1])
            if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                unconverged.append(c)

    def rank(c: float) -> tuple[float, float]:
        probabilities = fitted[c].predict_proba(validation_features)
        accuracy = float(np.mean(fitted[c].classes_[probabilities.argmax(axis=1)] == validation[1]))
        return accuracy, -log_loss(validation[1], probabilities, labels=fitted[c].classes_)

    chosen = max(fitted, key=rank)
    return Probe(chosen, unconverged, rank(chosen)[0], mean, scale, fitted[chosen])
