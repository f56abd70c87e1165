"""The per-node read cache: reads by id, never served past a client's consistency token.

Infrastructure: it knows no domain and no bus. The bus (or anything) tells
it about other nodes' writes through `invalidate` / `invalidate_older_than`,
and it tells the other nodes about this node's writes through the `publish`
callable the lifespan hands it. Routes use it through `service.cache.http`.
"""

from service.cache.store import ReadCache

__all__ = ["ReadCache"]
