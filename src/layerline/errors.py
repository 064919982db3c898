"""The exception tree of layerline.

Every error a user can cause derives from :class:`LayerlineError`; its message names the problem and the fix.

    LayerlineError
    ├── ModelImportError     a model file or module could not be turned into ONNX
    ├── SliceError           a model could not be cut (no valid cut, bad option)
    ├── FormatError          a manifest / plan / profile file is missing, malformed or of another version
    ├── PlanError            no placement satisfies the constraints, or a plan does not fit its model
    ├── EngineError          a deployment could not be started, found or stopped
    │   └── DeploymentExists a deployment with that name or port is already running
    ├── TransportError       a frame could not be sent or decoded
    │   └── ProtocolError    the peer sent bytes that are not a valid frame
    └── InferenceError       a request failed inside the pipeline
        ├── BadRequest       the input does not match what the model expects (HTTP 4xx)
        ├── StageFailed      a stage raised while running the request (HTTP 500)
        ├── StageUnavailable a stage is not connected or died (HTTP 503)
        └── DeadlineExceeded the request ran past its deadline (HTTP 504)
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "DeadlineExceeded",
    "DeploymentExists",
    "EngineError",
    "FormatError",
    "InferenceError",
    "LayerlineError",
    "ModelImportError",
    "PlanError",
    "ProtocolError",
    "SliceError",
    "StageFailed",
    "StageUnavailable",
    "TransportError",
]


class LayerlineError(Exception):
    """Base class of every error layerline raises on purpose."""


class ModelImportError(LayerlineError):
    """A model file or module could not be converted to ONNX."""


class SliceError(LayerlineError):
    """A model could not be cut into blocks."""


class FormatError(LayerlineError):
    """An artifact file (manifest, plan, profile) is missing, malformed or of an unsupported version."""


class PlanError(LayerlineError):
    """No placement satisfies the constraints, or a plan does not match its sliced model."""


class EngineError(LayerlineError):
    """A deployment could not be started, found or stopped."""


class DeploymentExists(EngineError):
    """A deployment with the same name, or one holding the same port, is already running."""


class TransportError(LayerlineError):
    """A frame could not be sent to or received from a peer."""


class ProtocolError(TransportError):
    """The peer sent bytes that are not a valid layerline frame."""


class InferenceError(LayerlineError):
    """A request failed; ``http_status`` is the status the gateway answers with."""

    http_status = 500


class BadRequest(InferenceError):
    """The request's tensors do not match the model's inputs."""

    http_status = 400


class StageFailed(InferenceError):
    """A stage raised an error while running the request."""

    http_status = 500


class StageUnavailable(InferenceError):
    """A stage is not connected, or the connection to it broke."""

    http_status = 503


class DeadlineExceeded(InferenceError):
    """The request did not complete before its deadline."""

    http_status = 504
