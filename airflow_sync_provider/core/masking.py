"""Masking and tokenisation of sensitive columns, as a batch transform between extract and load.

A target that does not need a sensitive value should never receive it, and the masking should
happen before the batch is staged, so the staging area holds only what the target may see.
:func:`masking_transform` builds such a transform from a column -> rule mapping:

* ``tokenize(key)``: a keyed HMAC-SHA256 token (``tok_`` + 32 hex digits).  The same value gives
  the same token in every target masked with the same key, so systems can still join or match on
  it (fraud detection: "same national id, two customer records") without ever seeing the value;
  without the key the token cannot be reversed or recomputed by brute force over a small domain.
* ``mask_email``: keeps the first character of the local part and the domain (``j***@bank.example``).
* ``year_only``: a date or timestamp reduced to its year (an integer).
* ``drop``: the column is removed.

Rules may rename (``"national_id": ("national_id_token", tokenize(key))``) so the target's column
name says what it holds.  NULL stays NULL.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from airflow_sync_provider.core.errors import ConfigurationError

TOKEN_PREFIX = "tok_"
TOKEN_PATTERN = r"^tok_[0-9a-f]{32}$"


@dataclass(frozen=True)
class Rule:
    """How one column is masked: a vectorised function over the column, or ``None`` to drop it."""

    name: str
    apply: Callable[[pd.Series], pd.Series] | None


def tokenize(key: str | bytes) -> Rule:
    if not key:
        raise ConfigurationError("tokenize needs a secret key (e.g. an Airflow Variable or SYNC_TOKEN_KEY)")
    secret = key.encode() if isinstance(key, str) else key

    def token(value: Any) -> str:
        digest = hmac.new(secret, str(value).encode(), hashlib.sha256).hexdigest()
        return TOKEN_PREFIX + digest[:32]

    return Rule("tokenize", lambda column: column.map(token, na_action="ignore").astype("string"))


def _mask_email(value: Any) -> str:
    local, _, domain = str(value).partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


mask_email = Rule("mask_email", lambda column: column.map(_mask_email, na_action="ignore").astype("string"))


def _year(value: Any) -> Any:
    return value.year if isinstance(value, (dt.date, pd.Timestamp)) else pd.NA


year_only = Rule("year_only", lambda column: column.map(_year, na_action="ignore").astype("Int64"))

drop = Rule("drop", None)

RuleSpec = Rule | tuple[str, Rule]


def masking_transform(rules: Mapping[str, RuleSpec]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """A batch transform applying ``rules`` (``column -> rule`` or ``column -> (new name, rule)``)."""

    def mask(batch: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in rules if c not in batch.columns]
        if missing:
            raise ConfigurationError(f"masking rules name column(s) {missing} that the batch does not have")
        out = batch.copy()
        for column, spec in rules.items():
            new_name, rule = spec if isinstance(spec, tuple) else (column, spec)
            values = out.pop(column)
            if rule.apply is not None:
                out[new_name] = rule.apply(values)
        return out

    return mask


__all__ = [
    "TOKEN_PATTERN",
    "TOKEN_PREFIX",
    "Rule",
    "drop",
    "mask_email",
    "masking_transform",
    "tokenize",
    "year_only",
]
