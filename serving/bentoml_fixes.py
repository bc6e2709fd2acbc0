"""Two corrections to how BentoML 1.4.40 parses multipart forms, applied when the service loads.

1. A file part under a field name the API does not have (`-F file=@cat.png` instead of `image`)
   is answered with 500: BentoML runs json.loads on the bytes and catches only JSONDecodeError,
   not the UnicodeDecodeError that binary data raises. Fixed: the part is ignored, and the request
   gets BentoML's own 400 naming the missing `image` field.
2. A *text* value in a file field (`-F image=hello`) is taken as a URL that the server downloads
   (a server-side fetch of any address a client names), and a value that is no URL gives 500.
   Fixed: refused with 400 ("expected a file upload"); the service never fetches URLs.

Both keep BentoML's error format for bad input: {"error": "1 validation error for Input",
"detail": [...]}. `tests/test_serving.py` sends both requests to a real `bentoml serve`.
"""

from __future__ import annotations

import json
from typing import Any


class _TolerantJson:
    """The json module, except that loads() of non-UTF-8 bytes raises JSONDecodeError."""

    _cifar_fix = True
    JSONDecodeError = json.JSONDecodeError

    def __getattr__(self, name: str) -> Any:
        return getattr(json, name)

    @staticmethod
    def loads(s: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return json.loads(s, *args, **kwargs)
        except UnicodeDecodeError as exc:
            raise json.JSONDecodeError(f"not UTF-8 text: {exc}", "", 0) from None


async def _file_parts_only(obj: Any) -> Any:
    from pydantic_core import ValidationError
    from starlette.datastructures import UploadFile

    if isinstance(obj, UploadFile):
        return obj
    raise ValidationError.from_exception_data("Input", [{
        "type": "value_error", "loc": ("file",), "input": str(obj)[:100],
        "ctx": {"error": ValueError("expected a file upload (curl -F image=@cat.png), got a text "
                                    "value; this service does not download URLs")}}])


def apply() -> None:
    from _bentoml_impl import serde

    if not getattr(serde.json, "_cifar_fix", False):
        serde.json = _TolerantJson()  # type: ignore[attr-defined]
    serde.MultipartSerde.ensure_file = staticmethod(_file_parts_only)  # type: ignore[method-assign]
