"""ris.layers: the Keras layers a saved head is made of."""
from __future__ import annotations

import numpy as np
import pytest


def _one_step(model, x: np.ndarray, y: np.ndarray, loss="mse") -> bool:
    """One optimiser step; True when every weight is still finite."""
    import keras

    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    model.fit(x, y, epochs=1, verbose=0, batch_size=len(x))
    return all(np.isfinite(w).all() for w in model.get_weights())


def test_a_zero_row_through_l2_normalisation_leaves_the_weights_finite():
    """On Keras' JAX backend (the GPU machine's), a row that reached L2Normalize as zeros (a small
    ReLU layer all off) made the gradient NaN (the norm's derivative at 0, times 0): one step turned
    every weight NaN, so `ris-train --arch mlp --hidden 8` stopped as 'training diverged' at
    lr 0.001 (before the NaN guard, the NaN head was saved). TensorFlow's gradient hid it."""
    keras = pytest.importorskip("keras")
    from ris.layers import L2Normalize

    inp = keras.Input((4,))
    hidden = keras.layers.Dense(4, kernel_initializer="ones", bias_initializer="zeros")(inp)
    model = keras.Model(inp, keras.layers.Dense(1)(L2Normalize()(hidden)))
    x = np.array([[0, 0, 0, 0], [1, 2, 3, 4]], np.float32)
    assert _one_step(model, x, np.ones((2, 1), np.float32))
    out = L2Normalize()(x)
    assert np.allclose(np.asarray(out), [[0, 0, 0, 0], x[1] / np.linalg.norm(x[1])], atol=1e-7)


@pytest.mark.parametrize("mining", ["batch-hard", "random"])
def test_cosine_losses_on_a_zero_embedding_leave_the_weights_finite(mining):
    """The cosine distances normalise rows the same way: a zero embedding must not make NaN gradients."""
    keras = pytest.importorskip("keras")
    from ris.head import MININGS, build_triplet_network, training_loss

    inp = keras.Input((4,))
    base = keras.Model(inp, keras.layers.Dense(4, kernel_initializer="ones", bias_initializer="zeros")(inp))
    x = np.array([[0, 0, 0, 0], [1, 2, 3, 4], [4, 3, 2, 1], [1, 0, 0, 1]], np.float32)
    if MININGS[mining].triplet_inputs:
        model, xs, y = build_triplet_network(base), [x[:2], x[1:3], x[2:4]], np.zeros((2, 1))
    else:
        model, xs, y = base, x, np.array([0, 0, 1, 1])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=training_loss(mining, 0.2, "cosine"))
    model.fit(xs, y.astype(np.float32), epochs=1, verbose=0, batch_size=len(y))
    assert all(np.isfinite(w).all() for w in model.get_weights())
