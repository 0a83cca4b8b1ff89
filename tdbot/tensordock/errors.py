"""Errors raised by the TensorDock client.

Every failure of an API call maps to exactly one class below, in one place
(`tdbot.tensordock.client`). Each error carries the endpoint and the id involved as
attributes, and its message names them; none ever contains the API key or token.

    TensorDockError
    ├── AuthenticationError     the key and token pair was rejected
    ├── NotFoundError           the VM, hostnode or container does not exist
    ├── InvalidRequestError     the API rejected the request (odd vCPUs, bad ports, ...)
    │   └── NoCapacityError     the hostnode has no free ports, GPUs or resources
    ├── WrongStateError         the VM is already in the requested state
    ├── BidTooLowError          a spot validation did not accept the bid
    ├── TransportError          connection failure, timeout, 5xx or an HTML page
    │   └── ApiTimeoutError     no answer within the timeout
    └── MalformedResponseError  the body is not the JSON shape the endpoint documents
"""

from __future__ import annotations


class TensorDockError(Exception):
    """Base of every error raised by the TensorDock client."""

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        subject_id: str | None = None,
        status_code: int | None = None,
        server_message: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.subject_id = subject_id
        self.status_code = status_code
        self.server_message = server_message
        super().__init__(message)

    @property
    def retryable(self) -> bool:
        """Whether the same read may succeed if sent again later."""
        return False


class AuthenticationError(TensorDockError):
    """The API key and token pair was rejected; set TDBOT_API_KEY and TDBOT_API_TOKEN."""


class NotFoundError(TensorDockError):
    """The VM, hostnode or container named in the request does not exist."""


class InvalidRequestError(TensorDockError):
    """The API rejected the request's values; the server's text is in `server_message`."""


class NoCapacityError(InvalidRequestError):
    """The hostnode cannot take the deployment: no free ports, GPUs or other resources."""


class WrongStateError(TensorDockError):
    """The VM is already in the state the call asks for, such as starting a running VM."""


class BidTooLowError(TensorDockError):
    """A spot validation did not accept the bid: it is too low or capacity is missing."""


class TransportError(TensorDockError):
    """The API could not be reached or answered with a server error or a non-JSON page."""

    @property
    def retryable(self) -> bool:
        return True


class ApiTimeoutError(TransportError):
    """The API did not respond within the configured timeout."""


class MalformedResponseError(TensorDockError):
    """The answer is not valid JSON or lacks a key the endpoint always returns."""

    @property
    def retryable(self) -> bool:
        return True
