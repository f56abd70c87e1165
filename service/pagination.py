"""Opaque, tamper-evident cursors for keyset pagination.

A cursor is `base64url(json).base64url(hmac)`: clients cannot forge or edit
one, and every node that shares CATTLE_CURSOR_SECRET accepts the cursors of
every other node, so a client may page through a fleet without stickiness.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any


class InvalidCursor(ValueError):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class CursorCodec:
    MAX_LENGTH = 512
    # The shape of every cursor encode() issues, for the OpenAPI description:
    # two unpadded base64url parts joined by one dot.
    PATTERN = r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$"
    _SIGNATURE_BYTES = 16

    def __init__(self, secret: bytes, *, purpose: str) -> None:
        # Keying by purpose keeps a cursor of one listing from being valid in another.
        self._key = hmac.new(secret, purpose.encode(), hashlib.sha256).digest()

    def _sign(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()[: self._SIGNATURE_BYTES]

    def encode(self, payload: dict[str, Any]) -> str:
        data = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        return f"{_b64(data)}.{_b64(self._sign(data))}"

    def decode(self, cursor: str) -> dict[str, Any]:
        if len(cursor) > self.MAX_LENGTH or cursor.count(".") != 1:
            raise InvalidCursor("the cursor is malformed")
        data_part, sig_part = cursor.split(".")
        try:
            data, signature = _unb64(data_part), _unb64(sig_part)
        except (binascii.Error, ValueError):
            raise InvalidCursor("the cursor is malformed") from None
        if not hmac.compare_digest(signature, self._sign(data)):
            raise InvalidCursor("the cursor was not issued by this service or has been altered")
        try:
            payload = json.loads(data)
        except ValueError:
            raise InvalidCursor("the cursor is malformed") from None
        if not isinstance(payload, dict):
            raise InvalidCursor("the cursor is malformed")
        return payload
