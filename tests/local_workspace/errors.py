"""The error answers of the local workspace."""


class ApiError(Exception):
    """An error answer: HTTP status and JSON body."""

    def __init__(self, status, body, headers=None):
        super().__init__(body)
        self.status = status
        self.body = body
        self.headers = headers or {}


def context_gone(context_id):
    return ApiError(400, {"error": "Context ExecutionContextId(%s) is disconnected." % context_id})


def param_error(message):
    return ApiError(400, {"error_code": "INVALID_PARAMETER_VALUE", "message": message})


