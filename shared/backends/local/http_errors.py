"""What local endpoints answer when they do not answer 200: OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`), for failures of every kind, routing ones
included, so clients such as the `openai` package raise a readable error."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("endpoint")


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, self.status, headers=headers)


def invalid_key() -> ApiError:
    return ApiError(401, "missing or invalid key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else error.detail
        code = "not_found" if error.status_code == 404 else None
        return ApiError(error.status_code, str(message), code=code).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return ApiError(400, "the request is not valid").response()

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:
        log.exception("a request failed")
        return ApiError(500, "the model failed to answer; see the endpoint log", "server_error").response()
