"""One error table per sink: which driver errors retry and which crash the worker."""

from __future__ import annotations

import pytest
from asynch.errors import NetworkError, ServerException
from cassandra import InvalidRequest, OperationTimedOut, Unauthorized, Unavailable, WriteTimeout
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionShutdown

from sinks import clickhouse, scylla
from sinks.base import FatalSinkError, RetriableSinkError


def server_error(code: int) -> ServerException:
    return ServerException("DB::Exception: something", code)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (server_error(252), RetriableSinkError),  # TOO_MANY_PARTS
        (server_error(159), RetriableSinkError),  # TIMEOUT_EXCEEDED
        (server_error(242), RetriableSinkError),  # TABLE_IS_READ_ONLY
        (server_error(60), FatalSinkError),  # UNKNOWN_TABLE
        (server_error(16), FatalSinkError),  # NO_SUCH_COLUMN_IN_TABLE
        (server_error(516), FatalSinkError),  # AUTHENTICATION_FAILED
        (server_error(12345), RetriableSinkError),  # unknown: retried within the budget
        (ConnectionRefusedError(111, "refused"), RetriableSinkError),
        (TimeoutError(), RetriableSinkError),
        (EOFError("Unexpected EOF while reading bytes"), RetriableSinkError),
        (NetworkError("connection lost"), RetriableSinkError),
    ],
)
def test_clickhouse_classification(exc: BaseException, kind: type) -> None:
    assert isinstance(clickhouse.classify(exc), kind)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (WriteTimeout("timeout", write_type=0), RetriableSinkError),
        (Unavailable("unavailable"), RetriableSinkError),
        (OperationTimedOut("slow"), RetriableSinkError),
        (NoHostAvailable("none", {"h": Unavailable("u")}), RetriableSinkError),
        (NoHostAvailable("none", {"h": ConnectionShutdown("closed")}), RetriableSinkError),
        (NoHostAvailable("none", {}), RetriableSinkError),
        (NoHostAvailable("none", {"h": Unauthorized("no")}), FatalSinkError),
        (InvalidRequest("Expected 4 or 0 byte int"), FatalSinkError),
        (Unauthorized("no"), FatalSinkError),
        (TypeError("Received an argument of invalid type"), FatalSinkError),
        (RuntimeError("who knows"), RetriableSinkError),
    ],
)
def test_scylla_classification(exc: BaseException, kind: type) -> None:
    assert isinstance(scylla.classify(exc), kind)


def test_overloaded_is_retriable() -> None:
    from cassandra.protocol import OverloadedErrorMessage

    overloaded = OverloadedErrorMessage(0x1001, "overloaded", {})
    assert isinstance(scylla.classify(NoHostAvailable("none", {"h": overloaded})), RetriableSinkError)
