"""Envoy bootstrap for a sidecar: who it is, where its admin API listens, where xDS is,
and the credential that proves to xDS that it is that node.

Everything else (listeners, clusters, routes, endpoints) arrives over ADS, so this
file never changes while the mesh runs; a sidecar is configured without restarts.
The file holds the sidecar's xDS token, so it is written 0600 (BOOTSTRAP_MODE) and
Envoy gets only its path (``-c``).  Envoy's admin API would print it (``/config_dump``
shows the bootstrap and every resource), so the admin API answers only the read-only
paths in ADMIN_PATHS.
"""

from __future__ import annotations

from core.endpoints import XdsApi
from core.sidecar_auth import METADATA_KEY, SCHEME

XDS_CLUSTER = "greymesh_xds"
BOOTSTRAP_MODE = 0o600
# Readiness, counters and certificate metadata: what greymesh and its tests read.  Anything
# else (config_dump with every token, quitquitquit, runtime_modify, ...) answers 403.  Envoy
# matches the whole request path including the query, hence the optional query part.
ADMIN_PATHS = r"/(ready|stats|stats/prometheus|certs|server_info|clusters|listeners)(\?[^/]*)?"


def sidecar_bootstrap(
    *,
    node_id: str,
    service: str,
    admin_host: str,
    admin_port: int,
    xds_host: str,
    xds_port: int,
    xds_api: XdsApi,
    xds_token: str,
) -> dict:
    """Bootstrap as a JSON-ready dict (Envoy reads JSON as YAML's subset); ``xds_token`` is the
    node's credential (``SidecarKey.tokens("xds").mint(...)``): write the result BOOTSTRAP_MODE."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": service},
        "admin": {"address": _socket(admin_host, admin_port), "allow_paths": [{"safe_regex": {"regex": ADMIN_PATHS}}]},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if xds_api == "delta" else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            # Reconnect quickly after a control-plane restart (default
                            # backoff grows to 30 s); config keeps serving meanwhile.
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.25s", "max_interval": "2s"}
                            },
                        },
                        "initial_metadata": [{"key": METADATA_KEY, "value": SCHEME + xds_token}],
                    }
                ],
            },
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(xds_host, xds_port)}}]}],
                    },
                }
            ]
        },
    }


def _socket(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}
