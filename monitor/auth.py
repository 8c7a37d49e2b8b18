"""The API token: where it is read from, and the bearer check of write endpoints."""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from monitor.config import AuthConfig

logger = logging.getLogger(__name__)


def load_token(auth: AuthConfig) -> str | None:
    """Read the API token from the environment, else from the token file; never from the config."""
    token = os.environ.get(auth.token_env)
    if token:
        return token.strip()
    if auth.token_file:
        path = Path(auth.token_file)
        if path.is_file():
            return path.read_text().strip() or None
        logger.warning("auth.token_file %s not found; write endpoints stay closed", path)
    return None


def bearer_matches(authorization: str, token: str) -> bool:
    """Return whether an ``Authorization`` header carries ``token`` as a bearer token, compared in constant time."""
    scheme, _, supplied = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(supplied.strip().encode(), token.encode())


def bearer_header(token: str | None) -> dict[str, str]:
    """Return the header that carries ``token``, or no header without one."""
    return {"Authorization": f"Bearer {token}"} if token else {}
