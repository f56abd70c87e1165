"""Health, lifecycle and drain: how a node tells proxies and sidecars the truth about itself."""
