"""The one place that opens an MLflow tracking store, and the reachability check every command makes first.

Light on purpose (MLflow only, no torch): `pipeline-report` imports it and answers in MLflow's import time.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from mlflow.tracking import MlflowClient


def client(tracking_uri: str) -> MlflowClient:
    """A client of the store at `tracking_uri` (a `sqlite:///` file or an http(s) server)."""
    return MlflowClient(tracking_uri)


def unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why an http(s) tracking server does not answer its /health endpoint, or None when it does (or is local)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered (an auth proxy or a server without /health): reachable
    except (urllib.error.URLError, OSError) as err:
        return str(err)
    return None


def check_reachable(uri: str) -> None:
    """Fail in seconds with a clear message when an http(s) tracking server does not answer.

    MLflow's own client would retry an unreachable server with back-off for minutes before failing.
    """
    reason = unreachable(uri)
    if reason is not None:
        raise ConnectionError(
            f"MLflow tracking server {uri} is not reachable ({reason}). Start it, fix MLFLOW_TRACKING_URI / "
            "logger.tracking_uri, or unset it to use the local SQLite store."
        )
