"""Errors a client caused, carried as HTTP errors so MONAI Label's FastAPI endpoints answer 4xx, not 500."""

from fastapi import HTTPException


class RequestError(HTTPException):
    """A request the server cannot serve as asked; `detail` says what to change."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(status_code=status_code, detail=detail)

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


def bad_request(detail: str) -> RequestError:
    return RequestError(400, detail)


def not_found(detail: str) -> RequestError:
    return RequestError(404, detail)


def unreadable(detail: str) -> RequestError:
    return RequestError(422, detail)
