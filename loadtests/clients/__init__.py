"""Locust users: one module per domain; a fork that replaces the domain replaces its module."""
