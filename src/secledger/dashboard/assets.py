"""Static files: the dashboard's own CSS and JS, and plotly.js from the installed plotly wheel.

secledger serves the chart library itself so the dashboard works on an air-gapped
network: nothing is loaded from a CDN and no third-party code lives in this repository.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

from secledger.errors import ConfigError

OWN = resources.files("secledger.dashboard") / "static"
OWN_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def plotly_js_path() -> Path:
    """Where the plotly wheel keeps its bundled plotly.min.js (found without importing it)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the plotly package is not installed; the dashboard needs its plotly.js")
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed plotly package")
    return path


def plotly_version() -> str:
    """The plotly wheel's version, used in the asset URL so browsers can cache it forever."""
    return metadata.version("plotly")


@dataclass(frozen=True)
class Asset:
    """A file held in memory with its gzip form and a strong ETag."""

    body: bytes
    gzipped: bytes
    media_type: str
    etag: str


def _asset(body: bytes, media_type: str) -> Asset:
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return Asset(body, gzip.compress(body, compresslevel=6, mtime=0), media_type, etag)


@functools.cache
def plotly_asset() -> Asset:
    """plotly.min.js, compressed once per process."""
    return _asset(plotly_js_path().read_bytes(), "text/javascript; charset=utf-8")


@functools.cache
def _own_names() -> frozenset[str]:
    return frozenset(
        item.name
        for item in OWN.iterdir()
        if item.is_file() and Path(item.name).suffix in OWN_TYPES
    )


def own_asset(name: str) -> Asset | None:
    """One of the dashboard's own static files, or None. Only names the package holds
    are looked at: anyone may ask for any name, and each new one was a file system
    lookup (a 500 for a name too long for it) and an entry in a cache that never shrank."""
    if name not in _own_names():
        return None
    return _own_asset(name)


@functools.cache
def _own_asset(name: str) -> Asset:
    return _asset((OWN / name).read_bytes(), OWN_TYPES[Path(name).suffix])
