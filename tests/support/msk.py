"""A stand-in for Amazon MSK's IAM listener: a Kafka-protocol proxy that does the SASL/OAUTHBEARER
login itself, checks the token as MSK would check its form, and then pipes the connection to a
real broker (tansu, which cannot authenticate; DESIGN.md §5).

What it checks of a token: it is base64url of an https URL to ``kafka.<region>.amazonaws.com``
with ``Action=kafka-cluster:Connect``, SigV4 query parameters for the ``kafka-cluster`` service in
that region, and an expiry (``X-Amz-Date`` + ``X-Amz-Expires``) in the future. What it cannot
check: the signature against IAM (there is no IAM here); it only checks that one is there.

Like MSK, it closes a connection when its login's session ends (``session_s``, much shorter than
MSK's token lifetime so a test sees it happen many times): the client must log in again on a new
connection. Connections whose first request names the client id ``HARNESS_CLIENT_ID`` (the tests'
own producers and readers) go through without a login; any other connection that does not log in
first is closed, as a SASL listener does.
"""

from __future__ import annotations

import asyncio
import calendar
import struct
import time
from dataclasses import dataclass, field

from aiokafka.protocol.admin import SaslAuthenticateResponse_v0, SaslAuthenticateResponse_v1, SaslHandShakeResponse_v1

from app.msk import decode_token
from tests.support.proxy import LoopbackServer
from tests.support.world import HARNESS_CLIENT_ID

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
SASL_AUTHENTICATION_FAILED, UNSUPPORTED_SASL_MECHANISM = 58, 33


def token_problem(token: str, region: str, now: float) -> str | None:
    """Why MSK would refuse this token, or None."""
    try:
        fields = decode_token(token)
    except (ValueError, UnicodeDecodeError):
        return "not a base64url-encoded URL"
    expected = {
        "scheme": "https",
        "host": f"kafka.{region}.amazonaws.com",
        "Action": "kafka-cluster:Connect",
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
    }
    for key, value in expected.items():
        if fields.get(key) != value:
            return f"{key} is {fields.get(key)!r}, not {value!r}"
    scope = fields.get("X-Amz-Credential", "").split("/")
    if len(scope) != 5 or scope[2:] != [region, "kafka-cluster", "aws4_request"]:
        return f"credential scope {fields.get('X-Amz-Credential')!r} is not for kafka-cluster in {region}"
    if len(fields.get("X-Amz-Signature", "")) != 64:
        return "no SigV4 signature"
    signed = calendar.timegm(time.strptime(fields.get("X-Amz-Date", "19700101T000000Z"), "%Y%m%dT%H%M%SZ"))
    expires = signed + int(fields.get("X-Amz-Expires", "0"))
    if expires <= now:
        return "token expired"
    return None


@dataclass
class Logins:
    accepted: int = 0
    refused: list[str] = field(default_factory=list)
    anonymous: int = 0  # harness connections
    closed_unauthenticated: int = 0
    sessions_ended: int = 0  # connections closed because their login's session ran out
    tokens: set[str] = field(default_factory=set)


class IamListener(LoopbackServer):
    """The proxy, on its own event loop in a daemon thread; ``close()`` stops it."""

    def __init__(self, upstream_port: int, region: str, session_s: float, port: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.region = region
        self.session_s = session_s
        self.logins = Logins()
        super().__init__(port, name="iam-listener")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.add(up_writer)
        try:
            while True:
                frame = await _read_frame(reader)
                api_key, _version, _correlation, client_id = _header(frame)
                if api_key == API_VERSIONS:  # allowed before a login, as on MSK: the broker answers
                    up_writer.write(frame)
                    writer.write(await _read_frame(up_reader))
                    continue
                if api_key == SASL_HANDSHAKE:
                    if await self._login(reader, writer, frame):
                        await _pipe_both(reader, writer, up_reader, up_writer, self.logins, self.session_s)
                    return
                if client_id == HARNESS_CLIENT_ID:
                    self.logins.anonymous += 1
                    up_writer.write(frame)
                    await _pipe_both(reader, writer, up_reader, up_writer, self.logins, None)
                else:
                    self.logins.closed_unauthenticated += 1
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            for side in (writer, up_writer):
                self._writers.discard(side)
                side.transport.abort()

    async def _login(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handshake: bytes) -> bool:
        _key, _version, correlation, _client = _header(handshake)
        mechanism = _string_after_header(handshake)
        error = 0 if mechanism == "OAUTHBEARER" else UNSUPPORTED_SASL_MECHANISM
        _respond(writer, correlation, SaslHandShakeResponse_v1(error, ["OAUTHBEARER"]).encode())
        if error:
            self.logins.refused.append(f"mechanism {mechanism}")
            return False
        request = await _read_frame(reader)
        api_key, version, correlation, _client = _header(request)
        if api_key != SASL_AUTHENTICATE:
            self.logins.refused.append(f"api key {api_key} where SaslAuthenticate was due")
            return False
        auth = _bytes_after_header(request).decode("utf-8", "replace")
        # RFC 7628 initial response: gs2 header "n,," then \x01-separated key=value pairs
        pairs = dict(part.split("=", 1) for part in auth.split("\x01") if "=" in part)
        token = pairs.get("auth", "").removeprefix("Bearer ")
        problem = token_problem(token, self.region, time.time()) if token else "no bearer token"
        if problem:
            self.logins.refused.append(problem)
            body = _auth_response(version, SASL_AUTHENTICATION_FAILED, f"Access denied: {problem}", 0)
            _respond(writer, correlation, body)
            await writer.drain()
            return False
        self.logins.accepted += 1
        self.logins.tokens.add(token)
        _respond(writer, correlation, _auth_response(version, 0, None, int(self.session_s * 1000)))
        await writer.drain()
        return True


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    size = await reader.readexactly(4)
    return size + await reader.readexactly(struct.unpack(">i", size)[0])


def _header(frame: bytes) -> tuple[int, int, int, str | None]:
    api_key, version, correlation, length = struct.unpack_from(">hhih", frame, 4)
    client_id = None if length < 0 else frame[14 : 14 + length].decode("utf-8", "replace")
    return api_key, version, correlation, client_id


def _body_offset(frame: bytes) -> int:
    length = struct.unpack_from(">h", frame, 12)[0]
    return 14 + max(length, 0)


def _string_after_header(frame: bytes) -> str:
    offset = _body_offset(frame)
    length = struct.unpack_from(">h", frame, offset)[0]
    return frame[offset + 2 : offset + 2 + length].decode("utf-8", "replace")


def _bytes_after_header(frame: bytes) -> bytes:
    offset = _body_offset(frame)
    length = struct.unpack_from(">i", frame, offset)[0]
    return frame[offset + 4 : offset + 4 + length]


def _auth_response(version: int, error: int, message: str | None, lifetime_ms: int) -> bytes:
    if version == 0:
        return SaslAuthenticateResponse_v0(error, message, b"").encode()
    return SaslAuthenticateResponse_v1(error, message, b"", lifetime_ms).encode()


def _respond(writer: asyncio.StreamWriter, correlation: int, body: bytes) -> None:
    payload = struct.pack(">i", correlation) + body
    writer.write(struct.pack(">i", len(payload)) + payload)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    logins: Logins,
    session_s: float | None,
) -> None:
    """Both directions until either side closes, or the login's session ends."""
    pipes = [asyncio.ensure_future(_pipe(reader, up_writer)), asyncio.ensure_future(_pipe(up_reader, writer))]
    done, pending = await asyncio.wait(pipes, timeout=session_s, return_when=asyncio.FIRST_COMPLETED)
    if not done:
        logins.sessions_ended += 1
    for task in pending:
        task.cancel()
