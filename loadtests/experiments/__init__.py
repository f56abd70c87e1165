"""Experiments on a lab cluster: scale-out, node loss and failover, each ending in its report."""
