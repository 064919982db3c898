"""Mean-field statistics of activations, used to initialise example networks without any data.

Every builder tracks, layer by layer, the mean and variance that one activation has over random inputs
(the same for every channel, because all weights are drawn alike). Knowing them, a layer can be given a
bias (or BatchNormalization statistics) that re-centres its output and a weight scale that keeps its
variance at one. With plain He initialisation the positive mean that every ReLU adds is mapped by each
following layer to a fixed offset, and after 16 layers every input produces almost the same logits; with
the re-centring, two independent inputs stay uncorrelated to the last layer and the outputs stay finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Moments"]

_SQRT2 = math.sqrt(2.0)


def _pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / _SQRT2))


@dataclass(frozen=True)
class Moments:
    """Mean and variance of one activation over the input distribution (treated as Gaussian)."""

    mean: float = 0.0
    var: float = 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def relu(self) -> Moments:
        """Moments of ``max(x, 0)`` for ``x ~ N(mean, var)`` (the rectified Gaussian)."""
        s = self.std
        a = self.mean / s
        mean = self.mean * _cdf(a) + s * _pdf(a)
        second = (self.mean**2 + self.var) * _cdf(a) + self.mean * s * _pdf(a)
        return Moments(mean, max(second - mean * mean, 1e-12))

    def max_of(self, k: int, effective: float = 1.0) -> Moments:
        """Moments of the maximum of a ``k``-element pooling window of such Gaussian activations.

        Correlated neighbours make the maximum of ``k`` of them behave like that of fewer independent ones
        (``effective * k``, at least 2); in the example networks treating them as independent measured
        closest. Max and ReLU commute, so a ReLU followed by a MaxPool has moments ``max_of(k).relu()``.
        """
        n = max(2.0, effective * k)
        s = self.std
        z = np.linspace(-8.0, 8.0, 4001)
        cdf = 0.5 * (1.0 + np.array([math.erf(v / _SQRT2) for v in z]))
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        density = n * cdf ** (n - 1.0) * pdf
        m1 = float(np.trapezoid(z * density, z))
        m2 = float(np.trapezoid(z * z * density, z))
        return Moments(self.mean + s * m1, max((m2 - m1 * m1) * self.var, 1e-12))

    def __add__(self, other: Moments) -> Moments:
        """Moments of the sum of two independent activations."""
        return Moments(self.mean + other.mean, self.var + other.var)

    def gelu(self) -> Moments:
        """Moments of ``x * Phi(x)`` (the exact, erf-based GELU) for ``x ~ N(mean, var)``."""
        x = self.mean + self.std * np.linspace(-8.0, 8.0, 4001)
        t = np.linspace(-8.0, 8.0, 4001)
        weight = np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
        y = x * 0.5 * (1.0 + np.array([math.erf(v / _SQRT2) for v in x]))
        m1 = float(np.trapezoid(y * weight, t))
        m2 = float(np.trapezoid(y * y * weight, t))
        return Moments(m1, max(m2 - m1 * m1, 1e-12))
