"""Following a registered model's alias: when ``@champion`` moves, the endpoint moves with it.

A deployment started from ``models:/NAME@ALIAS`` resolves the alias to a version at start and then every
``interval_s``; when it points elsewhere, the new version is loaded and warmed up in the background while
the old one keeps answering, then swapped in with one reference assignment. A request works with the
model it started with from start to end, so no request fails or mixes two versions, and the version that
answered is the one named in its response. A registry that cannot be reached leaves the current version
serving (warned once, retried every interval).

``--pin-version`` resolves the alias once, at start, and never follows it.

Example:
    >>> parse_alias_uri("models:/liver@champion")
    ('liver', 'champion')
    >>> parse_alias_uri("models:/liver/3") is None
    True
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["AliasFollower", "parse_alias_uri", "resolve_alias"]

log = logging.getLogger(__name__)

_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")


def parse_alias_uri(uri: str) -> tuple[str, str] | None:
    """``(name, alias)`` of ``models:/NAME@ALIAS``, None for any other reference."""
    match = _ALIAS_URI.match(str(uri).strip())
    return (match["name"], match["alias"]) if match else None


def resolve_alias(name: str, alias: str, tracking_uri: str) -> str:
    """The version ``alias`` points to now (one quick request; raises what MLflow raises)."""
    from mlflow import MlflowClient

    from hypersort_ray.mlflow_store import check_reachable

    check_reachable(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return str(client.get_model_version_by_alias(name, alias).version)


class AliasFollower:
    """Polls an alias and swaps in the model of each new version (module docstring).

    Args:
        name, alias: the registered model and the alias followed.
        tracking_uri: the registry's store.
        version: the version loaded at start.
        load: builds (and warms up) the model of a version; runs in the follower's thread.
        install: receives ``(version, model)`` once loaded; must swap it in atomically.
        interval_s: seconds between two checks.
        resolve: how to read the alias (tests replace it); default :func:`resolve_alias`.
    """

    def __init__(
        self,
        name: str,
        alias: str,
        tracking_uri: str,
        version: str,
        load: Callable[[str], Any],
        install: Callable[[str, Any], None],
        interval_s: float = 30.0,
        resolve: Callable[[str, str, str], str] = resolve_alias,
    ) -> None:
        self.name, self.alias, self.tracking_uri = name, alias, tracking_uri
        self.version = str(version)
        self._load, self._install, self._resolve = load, install, resolve
        self.interval_s = float(interval_s)
        self._stop = threading.Event()
        self._warned = False
        self.swaps = 0
        self._thread = threading.Thread(target=self._run, name="hypersort-alias-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def check(self) -> bool:
        """One check: load and install the version the alias points to when it changed. Never raises."""
        try:
            current = self._resolve(self.name, self.alias, self.tracking_uri)
        except Exception as exc:  # noqa: BLE001 - the current version keeps serving
            if not self._warned:
                log.warning("cannot read models:/%s@%s from %s (%s); version %s keeps serving",
                            self.name, self.alias, self.tracking_uri, type(exc).__name__, self.version)
                self._warned = True
            return False
        self._warned = False
        if current == self.version:
            return False
        log.info("models:/%s@%s moved from version %s to %s: loading it", self.name, self.alias, self.version, current)
        try:
            model = self._load(current)
        except Exception:  # noqa: BLE001 - a version that cannot load must not take the endpoint down
            log.exception("version %s of %s could not be loaded; version %s keeps serving", current, self.name,
                          self.version)
            return False
        self._install(current, model)
        self.version = current
        self.swaps += 1
        log.info("now serving models:/%s/%s", self.name, current)
        return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
