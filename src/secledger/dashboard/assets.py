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
def own_asset(name: str) -> Asset | None:
    """One of the dashboard's own static files, or None."""
    suffix = Path(name).suffix
    if "/" in name or suffix not in OWN_TYPES:
        return None
    item = OWN / name
    if not item.is_file():
        return None
    return _asset(item.read_bytes(), OWN_TYPES[suffix])
