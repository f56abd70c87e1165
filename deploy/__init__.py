"""Deployment tooling: the lab and the configuration of real components."""
