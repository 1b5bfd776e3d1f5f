"""The one exception hierarchy of slm-agent.

Every error carries the HTTP status and OpenAI error ``type`` it maps to, so the HTTP layer turns
any of them into a response in exactly one place (``runtime/http/errors.py``) and the CLI prints
the same message.

    SlmAgentError
    ├── BadRequestError            400 invalid_request_error
    │   ├── ContextOverflowError   413 prompt longer than the context window
    │   ├── RequestTooLargeError   413 request body over the configured limit
    │   └── SchemaError            422 invalid or unsatisfiable JSON schema / task output
    ├── AuthenticationError        401
    ├── ForbiddenError             403 a token used for another device
    ├── NotFoundError              404 unknown model, adapter, task or trace
    ├── ConflictError              409 name already taken
    ├── RunLimitError              409 an agent run hit its step, time or cost limit
    ├── QueueFullError             429 engine queue full (Retry-After)
    ├── BudgetExceededError        402 remote budget spent
    ├── ModelStoreError            400 not GGUF, truncated, wrong architecture, checksum
    │   └── OfflineError           503 a download was needed while offline
    ├── InsufficientMemoryError    507 model does not fit in memory
    ├── StorageFullError           507 no room to write: nothing acknowledged
    ├── DeadlineExceededError      504 request deadline passed
    ├── RemoteError                502 remote LLM failed
    └── UnavailableError           503 loading, shutting down, breaker open
"""

from __future__ import annotations


class SlmAgentError(Exception):
    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None
    # Set once the failed request is traced, so the client can still rate or correct it.
    trace_id: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class BadRequestError(SlmAgentError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextOverflowError(BadRequestError):
    status_code = 413
    code = "context_length_exceeded"


class RequestTooLargeError(BadRequestError):
    status_code = 413
    code = "request_too_large"


class SchemaError(BadRequestError):
    status_code = 422
    code = "invalid_schema"


class AuthenticationError(SlmAgentError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class ForbiddenError(SlmAgentError):
    status_code = 403
    error_type = "permission_error"
    code = "wrong_device"


class NotFoundError(SlmAgentError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ConflictError(SlmAgentError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class RunLimitError(SlmAgentError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "run_limit"


class QueueFullError(SlmAgentError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BudgetExceededError(SlmAgentError):
    status_code = 402
    error_type = "insufficient_quota"
    code = "budget_exceeded"


class ModelStoreError(SlmAgentError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_model_file"


class OfflineError(ModelStoreError):
    status_code = 503
    error_type = "server_error"
    code = "offline"


class InsufficientMemoryError(SlmAgentError):
    status_code = 507
    error_type = "server_error"
    code = "insufficient_memory"


class StorageFullError(SlmAgentError):
    """The target has no room: nothing was acknowledged, the batch will be sent again."""

    status_code = 507
    error_type = "server_error"
    code = "storage_full"


class DeadlineExceededError(SlmAgentError):
    status_code = 504
    error_type = "timeout_error"
    code = "deadline_exceeded"


class RemoteError(SlmAgentError):
    status_code = 502
    error_type = "api_error"
    code = "remote_error"


class UnavailableError(SlmAgentError):
    status_code = 503
    error_type = "server_error"
    code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: float | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s
