"""TensorDock v0 marketplace API: async client, request and response models, errors."""

from tdbot.tensordock.client import DEFAULT_BASE_URL, SpotValidation, TensorDockClient
from tdbot.tensordock.errors import (
    ApiTimeoutError,
    AuthenticationError,
    BidTooLowError,
    InvalidRequestError,
    MalformedResponseError,
    NoCapacityError,
    NotFoundError,
    TensorDockError,
    TransportError,
    WrongStateError,
)
from tdbot.tensordock.requests import ContainerDeployRequest, DeployRequest

__all__ = [
    "DEFAULT_BASE_URL",
    "ApiTimeoutError",
    "AuthenticationError",
    "BidTooLowError",
    "ContainerDeployRequest",
    "DeployRequest",
    "InvalidRequestError",
    "MalformedResponseError",
    "NoCapacityError",
    "NotFoundError",
    "SpotValidation",
    "TensorDockClient",
    "TensorDockError",
    "TransportError",
    "WrongStateError",
]
