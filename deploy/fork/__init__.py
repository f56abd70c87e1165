"""The fork tool: a named copy of this service (copier), later template versions pulled in."""
