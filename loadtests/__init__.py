"""Load tests and experiments: locust scenarios, scale-out and node-loss runs."""
