"""Envoy bootstrap for a sidecar: who it is, where its admin API listens, where xDS is.

Everything else (listeners, clusters, routes, endpoints) arrives over ADS, so this
file never changes while the mesh runs; a sidecar is configured without restarts.
"""

from __future__ import annotations

from core.endpoints import XdsApi

XDS_CLUSTER = "greymesh_xds"


def sidecar_bootstrap(
    *,
    node_id: str,
    service: str,
    admin_host: str,
    admin_port: int,
    xds_host: str,
    xds_port: int,
    xds_api: XdsApi,
) -> dict:
    """Bootstrap as a JSON-ready dict (Envoy reads JSON as YAML's subset)."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": service},
        "admin": {"address": _socket(admin_host, admin_port)},
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
                        }
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
