"""A CQL native-protocol v4 server for tests: the stand-in for ScyllaDB, which cannot run here.

The real ``cassandra-driver`` talks to it over TCP. It implements:

- the handshake: OPTIONS/SUPPORTED, STARTUP/READY, REGISTER; a client asking for a newer
  protocol version gets the "unsupported protocol version" error and downgrades to v4;
- ``system.local`` (cluster name, Murmur3 partitioner, one token, release_version 3.11.x,
  schema_version), ``system.peers`` (empty), ``system.peers_v2`` (an error, as on Cassandra 3.x
  and Scylla), and empty results for ``system_schema.*`` so the driver's metadata refresh succeeds;
- QUERY, PREPARE, EXECUTE, BATCH (logged/unlogged, mixed string and prepared statements);
- a CQL subset: CREATE/DROP KEYSPACE, CREATE/DROP TABLE (with ``IF [NOT] EXISTS`` and
  ``CLUSTERING ORDER BY``), TRUNCATE, USE, INSERT, UPDATE ... SET ... WHERE <full key>,
  DELETE FROM ... WHERE <full key>, SELECT cols|*|COUNT(*) ... [WHERE c = v AND ...] [LIMIT n];
  INSERT and UPDATE are upserts on the primary key, as on a real server, and every cell keeps
  its write timestamp (``USING TIMESTAMP``, else the client's default timestamp, else server
  time): a write older than the cell's timestamp is ignored (last write wins);
- every bound value and literal is decoded and validated against its column's type; a wrong
  one is an ``InvalidRequest`` error, as from a server; missing key columns are rejected;
- fault injection switchable from a test (:class:`Faults`): write timeout, read timeout,
  unavailable, overloaded, dropped connection, slow responses; for a number of requests or a
  time span.

It does not implement: authentication, compression, paging (all rows come in one page),
TTL expiry, lightweight transactions (``IF NOT EXISTS`` on INSERT is ignored), counters, range tombstones,
user-defined types, tuples, secondary indexes, materialized views, ``IN``/range restrictions,
ORDER BY in SELECT, consistency levels (all accepted), several nodes, shard awareness,
protocol v5 framing. Rows are kept in memory only.
"""

from tests.support.cql.faults import Faults
from tests.support.cql.server import CqlServer

__all__ = ["CqlServer", "Faults"]
