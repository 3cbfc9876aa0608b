"""One exception hierarchy for the whole service, mapped to HTTP and gRPC codes at the edges.

The message of a :class:`ServiceError` is what a client sees: it says what was wrong
with *its* request. Anything that is not a ServiceError is an internal error.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a client may see. ``http_status`` and ``grpc_code`` name its mapping."""

    http_status: int = 500
    grpc_code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """The request itself is malformed: bad image bytes, wrong tensor shape, bad JSON."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLarge(InvalidInput):
    """The payload, or the image it decodes to, is larger than the configured cap."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class Unauthorized(ServiceError):
    """A token was required and was missing or wrong."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class Forbidden(ServiceError):
    """The operation is disabled on this server."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class ModelNotFound(ServiceError):
    """No model (or version) of that name in the repository."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class ModelNotReady(ServiceError):
    """The model exists but is not loaded (failed to load, unloaded, or still loading)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class QueueFull(ServiceError):
    """The model's queue is full: the server refuses at once instead of queuing without bound.

    ``retry_after_s``: whole seconds after which a retry may be admitted (HTTP ``Retry-After``).
    """

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before it could be computed."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class ShuttingDown(ServiceError):
    """The server is draining and accepts no new work."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class InternalError(ServiceError):
    """Something failed on the server's side; the client sees a generic message, the log has the details."""

    http_status = 500
    grpc_code = "INTERNAL"


class PackageError(Exception):
    """A model package on disk is invalid: missing manifest, bad checksum, unknown format."""
