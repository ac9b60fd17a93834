"""Amazon MSK IAM authentication: AWS credentials turned into OAUTHBEARER tokens for aiokafka.

MSK's IAM listener (port 9098, TLS) takes a SASL/OAUTHBEARER token that is a SigV4-presigned
``kafka-cluster:Connect`` URL. AWS's signer (``aws-msk-iam-sasl-signer-python``, the ``msk``
extra) makes one from the standard credential chain: environment, profile, web identity (IRSA),
EKS pod identity, instance role. A token lives 15 minutes; aiokafka does not re-authenticate an
open connection, so MSK closes it when its token expires, and the client opens a new one and
asks for a token again. That costs a reconnect: a request in flight fails retriably and is sent
again, a commit not yet answered is retried; nothing in millstream depends on a connection
living long (docs/msk.md).

One provider serves every client of a worker. faust runs its consumer on a thread with its own
event loop, so the cache is guarded by a thread lock, not an asyncio one, and signing (blocking:
it may call STS or the instance metadata service) runs on the default executor.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from aiokafka.abc import AbstractTokenProvider

# A token is used for new connections until this long before it expires; signing is cheap, a
# login refused because its token lapsed on the way is not.
REFRESH_MARGIN_S = 120.0

Signer = Callable[[], "tuple[str, int]"]


class MskIamUnavailable(RuntimeError):
    """AWS_MSK_IAM is configured but its signer is not installed or cannot sign."""


def aws_signer(region: str) -> Signer:
    """AWS's signer for ``region`` over one botocore session: () -> (token, expiry in ms).

    The session resolves the standard credential chain once and refreshes what expires (web
    identity, pod identity, instance role); the signer alone would resolve it on every token and
    fail on no credentials with an AttributeError.
    """
    try:
        import botocore.exceptions
        import botocore.session
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider
        from botocore.credentials import CredentialProvider
    except ImportError as exc:
        raise MskIamUnavailable(
            "AWS_MSK_IAM needs the msk extra: pip install 'millstream[msk]' (aws-msk-iam-sasl-signer-python)"
        ) from exc

    class SessionCredentials(CredentialProvider):  # type: ignore[misc]
        METHOD = "millstream-botocore-session"

        def __init__(self) -> None:
            super().__init__()
            self.session = botocore.session.Session()

        def load(self) -> object:
            credentials = self.session.get_credentials()
            if credentials is None:
                raise MskIamUnavailable(
                    "no AWS credentials found (environment, profile, web identity / IRSA, pod identity or "
                    "instance role)"
                )
            return credentials

    provider = SessionCredentials()

    def sign() -> tuple[str, int]:
        try:
            token, expiry_ms = MSKAuthTokenProvider.generate_auth_token_from_credentials_provider(region, provider)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, ValueError) as exc:
            raise MskIamUnavailable(f"cannot sign an MSK IAM token: {exc}") from exc
        return token, int(expiry_ms)

    return sign


class MskIamTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """aiokafka token provider: one signed token, reused until shortly before it expires."""

    def __init__(self, sign: Signer, *, clock: Callable[[], float] = time.time) -> None:
        self._sign = sign
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self.signed = 0  # tokens made so far (tests, logs)

    def _fresh(self) -> str | None:
        if self._token is not None and self._clock() < self._expires_at - REFRESH_MARGIN_S:
            return self._token
        return None

    def current(self) -> str:
        """The token to log in with, signed now if there is none or it is about to expire (blocking)."""
        with self._lock:
            token = self._fresh()
            if token is None:
                token, expiry_ms = self._sign()
                self._token, self._expires_at = token, expiry_ms / 1000
                self.signed += 1
            return token

    async def token(self) -> str:
        token = self._fresh()
        if token is not None:
            return token
        return await asyncio.get_running_loop().run_in_executor(None, self.current)


def decode_token(token: str) -> dict[str, str]:
    """The presigned URL a token carries, as its query parameters plus ``host`` (tests, diagnostics)."""
    url = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    parts = urlsplit(url)
    fields = {key: values[0] for key, values in parse_qs(parts.query).items()}
    fields["host"] = parts.hostname or ""
    fields["scheme"] = parts.scheme
    return fields
