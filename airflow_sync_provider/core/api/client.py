"""HTTP for API sources: auth on a ``requests.Session``, retries that honour ``Retry-After``, and
errors that name the URL (secrets masked), the status, the attempts and the body.

Retry rules (tenacity):

* 429 and 503: wait what ``Retry-After`` says (seconds or an HTTP date), else back off; a
  ``Retry-After`` longer than ``max_retry_after`` fails at once (let the scheduler retry later
  rather than hold a worker slot);
* other 5xx, connection errors (refused, reset) and timeouts: exponential backoff;
* other 4xx: terminal at the first attempt (a retry would get the same answer).

After the last attempt the error is :class:`ApiUnavailableError` (a retryable
:class:`~..errors.SourceUnavailableError`: Airflow may retry the task) for the retryable cases and
:class:`ApiRequestError` (fails the task) for the rest.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import tenacity

from airflow_sync_provider.core.errors import ConfigurationError, SourceUnavailableError, SyncError
from airflow_sync_provider.core.progress import LOG, Logger

AuthKind = Literal["none", "bearer", "basic", "api_key"]

#: Query parameters whose values never appear in a message or a log line.
SECRET_PARAMS = frozenset(
    {"api_key", "apikey", "key", "token", "access_token", "auth", "password", "secret", "client_secret", "signature"}
)
MASK = "***"
BODY_EXCERPT = 300


@dataclass(frozen=True)
class ApiAuth:
    """How requests authenticate: ``bearer`` (``token``), ``basic`` (``username``/``password``) or
    ``api_key`` (``token`` under ``name`` in the ``header`` or the ``query``)."""

    kind: AuthKind = "none"
    token: str | None = None
    username: str | None = None
    password: str | None = None
    name: str = "X-API-Key"
    location: Literal["header", "query"] = "header"

    def __post_init__(self) -> None:
        if self.kind not in ("none", "bearer", "basic", "api_key"):
            raise ConfigurationError(f"auth kind must be none, bearer, basic or api_key, not {self.kind!r}")
        if self.kind in ("bearer", "api_key") and not self.token:
            raise ConfigurationError(f"{self.kind} auth needs a token (the connection's password)")
        if self.kind == "basic" and not self.username:
            raise ConfigurationError("basic auth needs a username (the connection's login)")
        if self.location not in ("header", "query"):
            raise ConfigurationError(f"an api key goes in the header or the query, not {self.location!r}")

    def apply(self, session: requests.Session) -> None:
        if self.kind == "bearer":
            session.headers["Authorization"] = f"Bearer {self.token}"
        elif self.kind == "basic":
            session.auth = (self.username or "", self.password or "")
        elif self.kind == "api_key" and self.location == "header":
            session.headers[self.name] = self.token or ""
        elif self.kind == "api_key":
            session.params = {**dict(session.params or {}), self.name: self.token}

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values to mask wherever they appear."""
        values = [self.token, self.password]
        if self.kind == "basic" and self.username is not None:
            values.append(base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode())
        return tuple(v for v in values if v)

    @property
    def secret_params(self) -> frozenset[str]:
        return SECRET_PARAMS | ({self.name.lower()} if self.kind == "api_key" and self.location == "query" else set())


def mask_url(url: str, auth: ApiAuth | None = None) -> str:
    """``url`` without secrets: credentials in the netloc dropped, secret query values and any
    known secret value replaced by ``***``."""
    auth = auth or ApiAuth()
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = [(k, MASK if k.lower() in auth.secret_params else v) for k, v in parse_qsl(parts.query, True)]
    masked = urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*:/,"), parts.fragment))
    for secret in auth.secrets:
        masked = masked.replace(secret, MASK)
    return masked


def mask_text(text: str, auth: ApiAuth | None) -> str:
    for secret in (auth or ApiAuth()).secrets:
        text = text.replace(secret, MASK)
    return text


class ApiRequestError(SyncError):
    """A request the API refused for good (4xx other than 429), or a response that is not JSON."""

    def __init__(self, message: str, *, url: str, status: int | None, attempts: int, **context: Any) -> None:
        self.url = url
        self.status = status
        self.attempts = attempts
        super().__init__(message, **context)


class ApiUnavailableError(SourceUnavailableError):
    """The API kept failing (429/5xx/connection) through every retry: a later retry can succeed."""

    def __init__(self, message: str, *, url: str, status: int | None, attempts: int, **context: Any) -> None:
        self.url = url
        self.status = status
        self.attempts = attempts
        super().__init__(message, **context)


class _Retryable(Exception):
    """An answer worth another attempt (429, 5xx), with what the server asked us to wait."""

    def __init__(self, response: requests.Response, retry_after: float | None) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response
        self.retry_after = retry_after


class _TooLong(Exception):
    def __init__(self, response: requests.Response, retry_after: float) -> None:
        super().__init__(f"Retry-After {retry_after:.0f} s")
        self.response = response
        self.retry_after = retry_after


def retry_after_seconds(value: str | None, now: dt.datetime | None = None) -> float | None:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max((when - (now or dt.datetime.now(dt.UTC))).total_seconds(), 0.0)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` in all per request; backoff ``backoff * 2**n`` seconds up to ``max_backoff``."""

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
    timeout: float = 30.0
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 500, 502, 503, 504}))

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 0 or self.timeout <= 0:
            raise ConfigurationError("retry policy: attempts >= 1, backoff >= 0 and timeout > 0")


class ApiClient:
    """A session on one base URL with auth and the retry policy; :meth:`get` returns the JSON body.

    ``waits`` records every wait between attempts (seconds, and why): the log shows them and the
    tests assert them.  ``sleep`` is ``time.sleep`` unless a test replaces it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: ApiAuth | None = None,
        headers: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        logger: Logger | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.auth = auth or ApiAuth()
        self.retry = retry or RetryPolicy()
        self.session = session or requests.Session()
        self.session.headers.setdefault("Accept", "application/json")
        self.session.headers.update(dict(headers or {}))
        self.auth.apply(self.session)
        self.log: Logger = logger or LOG
        self.sleep = sleep
        self.waits: list[tuple[float, str]] = []
        self.requests = 0

    def url(self, url: str) -> str:
        return url if "://" in url else urljoin(self.base_url, url.lstrip("/"))

    def masked(self, url: str, params: Mapping[str, Any] | None = None) -> str:
        """The URL a GET sends (the session's parameters too, e.g. a query API key), secrets masked."""
        merged = {**dict(self.session.params or {}), **dict(params or {})}
        full = requests.Request("GET", self.url(url), params=merged).prepare().url or url
        return mask_url(full, self.auth)

    def close(self) -> None:
        self.session.close()

    def get(
        self, url: str, params: Mapping[str, Any] | None = None, *, where: str | None = None, sync_id: str | None = None
    ) -> tuple[requests.Response, Any]:
        """GET ``url`` with retries; returns the response and its parsed JSON body."""
        target = self.url(url)
        attempts = 0

        def attempt() -> requests.Response:
            nonlocal attempts
            attempts += 1
            self.requests += 1
            response = self.session.get(target, params=dict(params or {}), timeout=self.retry.timeout)
            if response.status_code in self.retry.retry_statuses:
                asked = retry_after_seconds(response.headers.get("Retry-After"))
                if asked is not None and asked > self.retry.max_retry_after:
                    raise _TooLong(response, asked)
                raise _Retryable(response, asked)
            return response

        def wait(state: tenacity.RetryCallState) -> float:
            if state.attempt_number >= self.retry.attempts:
                return 0.0  # the last attempt: tenacity asks before it stops
            error = state.outcome.exception() if state.outcome else None
            backoff = min(self.retry.backoff * 2 ** (state.attempt_number - 1), self.retry.max_backoff)
            if isinstance(error, _Retryable) and error.retry_after is not None:
                seconds, why = error.retry_after, f"HTTP {error.response.status_code}, Retry-After"
            elif isinstance(error, _Retryable):
                seconds, why = backoff, f"HTTP {error.response.status_code}, backoff"
            else:
                seconds, why = backoff, f"{type(error).__name__}, backoff"
            self.waits.append((seconds, why))
            self.log.warning(
                "GET %s: attempt %d failed (%s); waiting %.2f s", self.masked(url, params), state.attempt_number,
                why, seconds,
            )  # fmt: skip
            return seconds

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.retry.attempts),
            wait=wait,
            retry=tenacity.retry_if_exception_type((_Retryable, requests.ConnectionError, requests.Timeout)),
            sleep=self.sleep,
            reraise=True,
        )
        shown = self.masked(url, params)
        context = {"sync_id": sync_id, "table": where}
        try:
            response = retrying(attempt)
        except _TooLong as error:
            raise ApiUnavailableError(
                f"GET {shown}: HTTP {error.response.status_code} asks to retry after {error.retry_after:.0f} s, "
                f"more than max_retry_after={self.retry.max_retry_after:.0f} s; nothing was committed "
                f"(attempts: {attempts}; body: {self._excerpt(error.response)})",
                url=shown, status=error.response.status_code, attempts=attempts, **context,
            ) from None  # fmt: skip
        except _Retryable as error:
            raise ApiUnavailableError(
                f"GET {shown} failed after {attempts} attempt(s): HTTP {error.response.status_code} "
                f"{error.response.reason}; nothing was committed (body: {self._excerpt(error.response)})",
                url=shown, status=error.response.status_code, attempts=attempts, **context,
            ) from None  # fmt: skip
        except (requests.ConnectionError, requests.Timeout) as error:
            raise ApiUnavailableError(
                f"GET {shown} failed after {attempts} attempt(s): {type(error).__name__}: "
                f"{mask_text(str(error), self.auth)[:BODY_EXCERPT]}; nothing was committed",
                url=shown, status=None, attempts=attempts, **context,
            ) from None  # fmt: skip
        if response.status_code >= 400:
            raise ApiRequestError(
                f"GET {shown} failed: HTTP {response.status_code} {response.reason} after {attempts} attempt(s) "
                f"(not retried: a {response.status_code} answers the same every time); nothing was committed "
                f"(body: {self._excerpt(response)})",
                url=shown, status=response.status_code, attempts=attempts, **context,
            )  # fmt: skip
        try:
            body = response.json() if response.content else None
        except ValueError:
            raise ApiRequestError(
                f"GET {shown}: HTTP {response.status_code} but the body is not JSON "
                f"(content type {response.headers.get('Content-Type')!r}; body: {self._excerpt(response)})",
                url=shown, status=response.status_code, attempts=attempts, **context,
            ) from None  # fmt: skip
        return response, body

    def _excerpt(self, response: requests.Response) -> str:
        text = mask_text(response.text or "", self.auth).strip().replace("\n", " ")
        return repr(text[:BODY_EXCERPT] + ("..." if len(text) > BODY_EXCERPT else ""))


def format_cursor(value: Any, fmt: str | None) -> str:
    """A cursor value as a query parameter: ``fmt`` (strftime) or ISO 8601 for times, else ``str``."""
    if isinstance(value, dt.datetime | dt.date):
        return value.strftime(fmt) if fmt else value.isoformat()
    return str(value)


__all__ = [
    "ApiAuth",
    "ApiClient",
    "ApiRequestError",
    "ApiUnavailableError",
    "RetryPolicy",
    "format_cursor",
    "mask_url",
    "retry_after_seconds",
]
