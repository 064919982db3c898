"""The testbed's exception, a :class:`~layerline.errors.LayerlineError` (the CLI prints ``error: ...``)."""

from __future__ import annotations

from layerline.errors import LayerlineError

__all__ = ["TestbedError"]


class TestbedError(LayerlineError):
    """A fleet is invalid, the host cannot run it, or a testbed could not be started or removed."""

    __test__ = False  # not a pytest test class despite the name
