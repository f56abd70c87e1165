"""What every measurement stands on: locust in a child process, CPU samples, the machine lock."""
