"""Serving: the HTTP gateway (``app``), its client (``client``), request checks and image helpers.

The submodules are imported on their own so that the client does not pull in aiohttp:
``layerline.serve.app`` (gateway), ``layerline.serve.client`` (stdlib-only client),
``layerline.serve.model_info``, ``layerline.serve.validation``, ``layerline.serve.oip``,
``layerline.serve.metrics``, ``layerline.serve.image``.
"""

from __future__ import annotations

__all__: list[str] = []
