"""cattle: a stateless API node built to be one of many identical, disposable nodes.

`NAME` is the service's name in one place: the settings' environment prefix,
metric names, problem type URNs, advisory-lock ids, telemetry's `service.name`
and the log's service field all derive from it. A fork renames the service
by changing this line (the fork tool does it for you).
"""

NAME = "cattle"
ENV_PREFIX = NAME.upper() + "_"

__version__ = "0.1.0"
