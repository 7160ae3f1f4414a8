"""Pagination styles of REST APIs, each a small object that turns one page into the next request.

* :class:`NextLinkPaginator`: the body holds the next page's URL (``{"next": "https://..."}``).
* :class:`LinkHeaderPaginator`: RFC 8288 ``Link: <...>; rel="next"`` (GitHub, Shopify).
* :class:`CursorPaginator`: the body holds an opaque token sent back as a parameter (Stripe, Slack).
* :class:`OffsetPaginator`: ``offset``/``limit`` (stops on a short page or at the reported total).
* :class:`PageNumberPaginator`: ``page=1, 2, ...`` (stops on an empty page or at the total pages).
* :class:`SinglePage`: no pagination.

The driver (:mod:`.fetch`) guards every style against loops: a next request equal to one already
made (a cursor or URL that repeats) fails the run, and so does a run past ``max_pages``; neither
ever stops silently with records left unread.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests

from airflow_sync_provider.core.api.records import select
from airflow_sync_provider.core.errors import ConfigurationError


@dataclass(frozen=True)
class PageRequest:
    """One GET: a URL (absolute, or relative to the base URL) and its query parameters."""

    url: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def identity(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """What makes two requests the same page (the loop guard compares it)."""
        return self.url, tuple(sorted((str(k), str(v)) for k, v in self.params.items()))


class Paginator(Protocol):
    """Turns the first request into the first page's, and a served page into the next request."""

    def first(self, request: PageRequest) -> PageRequest: ...

    def next(self, request: PageRequest, response: requests.Response, body: Any, records: int) -> PageRequest | None:
        """The next page's request, or None after the last page."""
        ...


def _value(body: Any, path: str) -> Any:
    return select(body, path)


@dataclass(frozen=True)
class SinglePage:
    def first(self, request: PageRequest) -> PageRequest:
        return request

    def next(self, request: PageRequest, response: requests.Response, body: Any, records: int) -> PageRequest | None:
        return None


@dataclass(frozen=True)
class NextLinkPaginator:
    """The next page's URL is in the body at ``path``; it carries every parameter itself."""

    path: str = "next"

    def first(self, request: PageRequest) -> PageRequest:
        return request

    def next(self, request: PageRequest, response: requests.Response, body: Any, records: int) -> PageRequest | None:
        link = _value(body, self.path)
        if not link:
            return None
        return PageRequest(requests.compat.urljoin(response.url, str(link)), {})


@dataclass(frozen=True)
class LinkHeaderPaginator:
    """The next page's URL is the ``Link`` header's ``rel="next"`` entry."""

    rel: str = "next"

    def first(self, request: PageRequest) -> PageRequest:
        return request

    def next(self, request: PageRequest, response: requests.Response, body: Any, records: int) -> PageRequest | None:
        link = response.links.get(self.rel, {}).get("url")
        if not link:
            return None
        return PageRequest(requests.compat.urljoin(response.url, link), {})


@dataclass(frozen=True)
class CursorPaginator:
    """An opaque token at ``cursor_path`` in the body, sent back as ``param``; none (or
    ``has_more_path`` false) ends the pages."""

    cursor_path: str = "next_cursor"
    param: str = "cursor"
    has_more_path: str | None = None

    def first(self, request: PageRequest) -> PageRequest:
        return request

    def next(self, request: PageRequest, response: requests.Response, body: Any, records: int) -> PageRequest | None:
        token = _value(body, self.cursor_path)
        if token in (None, "") or (self.has_more_path and not _value(body, self.has_more_path)):
            return None
        return PageRequest(request.url, {**request.params, self.param: token})


@dataclass(frozen=True)
class OffsetPaginator:
    """``offset``/``limit`` parameters; ends on a page shorter than ``limit`` or at ``total_path``."""

    limit: int = 100
    offset_param: str = "offset"
    limit_param: str = "limit"
    total_path: str | None = None

    def first(self, request: PageRequest) -> PageRequest:
        return PageRequest(request.url, {**request.params, self.offset_param: 0, self.limit_param: self.limit})

    def next(self, request: PageRequest, response: requests.Response, body: Any, records: int) -> PageRequest | None:
        offset = int(request.params.get(self.offset_param, 0)) + records
        total = _value(body, self.total_path) if self.total_path else None
        if records < self.limit or (total is not None and offset >= int(total)):
            return None
        return PageRequest(request.url, {**request.params, self.offset_param: offset})


@dataclass(frozen=True)
class PageNumberPaginator:
    """``page=start, start+1, ...``; ends on an empty page or past ``total_pages_path``."""

    page_param: str = "page"
    start_page: int = 1
    size: int | None = None
    size_param: str = "per_page"
    total_pages_path: str | None = None

    def first(self, request: PageRequest) -> PageRequest:
        params = {**request.params, self.page_param: self.start_page}
        if self.size is not None:
            params[self.size_param] = self.size
        return PageRequest(request.url, params)

    def next(self, request: PageRequest, response: requests.Response, body: Any, records: int) -> PageRequest | None:
        page = int(request.params.get(self.page_param, self.start_page))
        total = _value(body, self.total_pages_path) if self.total_pages_path else None
        if records == 0 or (total is not None and page >= int(total) + self.start_page - 1):
            return None
        return PageRequest(request.url, {**request.params, self.page_param: page + 1})


PAGINATORS: dict[str, type[Any]] = {
    "single": SinglePage,
    "next_link": NextLinkPaginator,
    "link_header": LinkHeaderPaginator,
    "cursor": CursorPaginator,
    "offset": OffsetPaginator,
    "page_number": PageNumberPaginator,
}


def paginator_from(value: Paginator | Mapping[str, Any] | str | None) -> Paginator:
    """A paginator object, or its declaration: ``"link_header"`` or ``{"type": "offset", "limit": 500}``
    (handy in templated or YAML DAGs)."""
    if value is None:
        return SinglePage()
    if isinstance(value, str):
        value = {"type": value}
    if isinstance(value, Mapping):
        options = dict(value)
        kind = options.pop("type", None)
        if kind not in PAGINATORS:
            raise ConfigurationError(f"paginator type must be one of {', '.join(PAGINATORS)}, not {kind!r}")
        try:
            return PAGINATORS[kind](**options)
        except TypeError as error:
            raise ConfigurationError(f"paginator {kind!r}: {error}") from None
    return value


__all__ = [
    "PAGINATORS",
    "CursorPaginator",
    "LinkHeaderPaginator",
    "NextLinkPaginator",
    "OffsetPaginator",
    "PageNumberPaginator",
    "PageRequest",
    "Paginator",
    "SinglePage",
    "paginator_from",
]
