"""Every table of the service, gathered so migrations see the whole schema."""

from service.db.base import Base
from service.idempotency.models import IdempotencyRecord
from service.notes.models import Note

metadata = Base.metadata

__all__ = ["IdempotencyRecord", "Note", "metadata"]
