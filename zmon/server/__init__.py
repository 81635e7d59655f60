"""HTTP: /metrics, /healthz, /readyz and authenticated control endpoints, served under bounded load.

`core` is the application (routes, /metrics rendering, control-token auth), `http` the serving layer (asyncio
+ h11, bounded connections, workers and timeouts), `webconfig` the exporter-toolkit web configuration file
(TLS, basic auth, headers). The names below are the module's public surface.
"""

from zmon.server.core import (
    MAX_BODY_BYTES,
    App,
    Handler,
    HTTPError,
    RenderCache,
    Request,
    Response,
    Route,
)
from zmon.server.http import Limits, Server, raise_nofile_limit
from zmon.server.webconfig import WebConfig, WebConfigWatcher, load_web_config

__all__ = [
    "MAX_BODY_BYTES",
    "App",
    "HTTPError",
    "Handler",
    "Limits",
    "RenderCache",
    "Request",
    "Response",
    "Route",
    "Server",
    "WebConfig",
    "WebConfigWatcher",
    "load_web_config",
    "raise_nofile_limit",
]
