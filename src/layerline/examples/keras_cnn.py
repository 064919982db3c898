"""A small Keras 3 CNN saved as ``.keras``: the test and demo input of ``layerline.importers.from_keras``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["keras_cnn"]


def keras_cnn(
    path: str | os.PathLike[str], *, image_size: int = 32, num_classes: int = 10, seed: int = 0
) -> Path:
    """Build and save a Conv2D/BatchNorm/MaxPool/Dense classifier (NHWC input ``image``, output
    ``logits``) with seeded random weights and non-trivial BatchNormalization statistics.

    Needs keras and torch (``pip install 'layerline[keras]'``); keras runs on its torch backend.
    """
    from layerline.importers.keras_export import import_keras

    keras = import_keras()
    layers = keras.layers
    rng = np.random.default_rng(seed)

    def init(i: int) -> object:
        return keras.initializers.HeNormal(seed=seed * 100 + i)

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Conv2D(16, 3, padding="same", kernel_initializer=init(1), name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(32, 3, padding="same", kernel_initializer=init(2), name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", kernel_initializer=init(3), name="fc1")(x)
    outputs = layers.Dense(num_classes, kernel_initializer=init(4), name="logits")(x)
    model = keras.Model(inputs, outputs, name="keras_cnn")
    for bn in (model.get_layer("bn1"), model.get_layer("bn2")):
        c = bn.moving_mean.shape[0]
        bn.moving_mean.assign(rng.uniform(-0.2, 0.2, c).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
        bn.gamma.assign(rng.uniform(0.8, 1.2, c).astype("float32"))
        bn.beta.assign(rng.uniform(-0.1, 0.1, c).astype("float32"))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(target))
    return target
