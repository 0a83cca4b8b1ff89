"""The error the simulated market raises for a request the real API would reject."""

from __future__ import annotations


class SimApiError(Exception):
    """A rejected request, sent as `{"success": false, "error": message}` with `status_code`.

    `status_code` follows what clients have seen from the real API: 400 for deploy
    validation, 401 for bad credentials, 404 for an unknown id and 500 for a VM in the
    wrong state.
    """

    def __init__(self, status_code: int, message: str) -> None:
        self.status_code = status_code
        self.message = message
        super().__init__(message)


def bad_request(message: str) -> SimApiError:
    return SimApiError(400, message)


def not_found(message: str) -> SimApiError:
    return SimApiError(404, message)


def server_error(message: str) -> SimApiError:
    return SimApiError(500, message)
