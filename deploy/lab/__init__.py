"""The lab: real PostgreSQL, service nodes and proxies on one machine."""
