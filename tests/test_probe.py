"""The linear probe: phase 1 of the default head and bench/quality.py's baseline."""
import keras
import numpy as np
import pytest

from job.training import model, probe


def blobs(classes: int, per_class: int, seed: int, spread: float = 1.5):
    """Gaussian clusters in 12 dimensions with a scale and offset per feature, as pooled
    features have."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0, 1, (classes, 12))
    labels = np.repeat(np.arange(classes), per_class)
    features = centres[labels] + rng.normal(0, spread, (len(labels), 12))
    return features * np.linspace(0.5, 20, 12) + 3.0, labels


def test_nearly_constant_features_do_not_blow_up_the_heads_weights():
    """Pooled features with a spread of 1e-4 beside ones with a spread of 10: the head's weights
    stay within what int8 can hold beside each other (the largest under 100x the median)."""
    features, labels = blobs(2, 60, seed=1)
    features[:, :4] = 1.0 + np.random.default_rng(2).normal(0, 1e-4, (len(labels), 4))
    validation = blobs(2, 20, seed=3)
    kernel, _ = probe.fit((features, labels), validation, balanced=False).dense_weights()
    assert np.abs(kernel).max() < 100 * np.median(np.abs(kernel))


@pytest.mark.parametrize("classes", [2, 4])
def test_the_head_given_the_probes_weights_predicts_what_the_probe_predicts(classes):
    fitted = probe.fit(blobs(classes, 40, seed=1), blobs(classes, 15, seed=2), balanced=False)
    head = model.build_head(12, classes, dense_units=0, dropout=0.2)
    head.get_layer("probabilities").set_weights(list(fitted.dense_weights()))
    features, _ = blobs(classes, 10, seed=3)
    expected = fitted.predict_proba(features)
    got = head.predict(features.astype(np.float32), verbose=0)
    np.testing.assert_allclose(got, expected[:, 1:] if classes == 2 else expected, atol=1e-5)


def test_the_strength_kept_scores_best_on_validation_of_the_grid():
    from sklearn.linear_model import LogisticRegression

    train, validation = blobs(3, 30, seed=1), blobs(3, 30, seed=2)
    fitted = probe.fit(train, validation, balanced=False)
    scaled = {name: (features - fitted.mean) / fitted.scale
              for name, (features, _) in (("train", train), ("validation", validation))}
    accuracy = {c: LogisticRegression(C=c, max_iter=2000).fit(scaled["train"], train[1])
                .score(scaled["validation"], validation[1]) for c in probe.C_GRID}
    assert fitted.c in probe.C_GRID
    assert fitted.validation_accuracy == pytest.approx(max(accuracy.values()))
    assert fitted.validation_accuracy > 0.6  # far above chance (1/3)


def test_the_grid_is_fitted_on_one_blas_thread(monkeypatch, two_blas_threads):
    """A second OpenBLAS thread spins between lbfgs's small products: 7x the wall on 2 loaded cores."""
    from threadpoolctl import threadpool_info

    seen = []

    class Recording(probe.LogisticRegression):
        def fit(self, *args, **kwargs):
            seen.append({pool["num_threads"] for pool in threadpool_info()
                         if pool["user_api"] == "blas"})
            return super().fit(*args, **kwargs)

    monkeypatch.setattr(probe, "LogisticRegression", Recording)
    probe.fit(blobs(2, 20, seed=1), blobs(2, 20, seed=2), balanced=False)
    assert len(seen) == len(probe.C_GRID) and all(threads == {1} for threads in seen)


def test_balanced_weights_raise_the_recall_of_a_rare_class():
    features, labels = blobs(2, 200, seed=1, spread=3.0)
    rare = np.concatenate([np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)[:20]])
    train = (features[rare], labels[rare])
    validation = blobs(2, 100, seed=2, spread=3.0)
    recall = {}
    for balanced in (False, True):
        predicted = probe.fit(train, validation, balanced).predict_proba(validation[0]).argmax(1)
        recall[balanced] = np.mean(predicted[validation[1] == 1] == 1)
    assert recall[True] > recall[False]


def test_a_linear_head_has_no_hidden_layer():
    head = model.build_head(12, 5, dense_units=0, dropout=0.2)
    assert [type(layer).__name__ for layer in head.layers[1:]] == ["Dropout", "Dense"]
    assert keras.ops.shape(head.get_layer("probabilities").kernel) == (12, 5)
