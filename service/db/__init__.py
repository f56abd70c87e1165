"""Database access: engines, the declarative base, column types and migrations."""
