#!/usr/bin/env python3
"""Writes the Envoy 1.40 bootstrap for one bench variant (all on loopback).

  plain      Envoy alone (variant 1)
  ext_authz  Envoy + an ext_authz gRPC server on --authz-port: the do-nothing one or tollgate (variants 2-5)
  jwt_authn  Envoy's own jwt_authn filter with a local JWKS (variant 6)

The route answers with a direct_response by default, so the figures isolate what the authorizer costs;
--upstream-port proxies to an upstream instead. The path is kept as the client sent it, as in envoy/.
"""
import argparse
import json
import sys

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["plain", "ext_authz", "jwt_authn"], required=True)
    ap.add_argument("--listen-port", type=int, required=True)
    ap.add_argument("--admin-port", type=int, required=True)
    ap.add_argument("--authz-port", type=int, default=0)
    ap.add_argument("--api", default="benchapi", help="the route's tollgate_api context extension")
    ap.add_argument("--access-log", action="store_true", help="gRPC access log to the authz server")
    ap.add_argument("--upstream-port", type=int, default=0, help="0: direct_response")
    ap.add_argument("--jwks", help="JWKS file (jwt_authn)")
    ap.add_argument("--issuer", default="https://issuer.bench.example")
    ap.add_argument("--audience", default="https://api.bench.example")
    a = ap.parse_args()
    if a.kind == "ext_authz" and not a.authz_port:
        ap.error("ext_authz needs --authz-port")
    if a.kind == "jwt_authn" and not a.jwks:
        ap.error("jwt_authn needs --jwks")
    if a.access_log and not a.authz_port:
        ap.error("--access-log needs --authz-port (the server that receives the entries)")

    route = {"match": {"prefix": "/"}}
    if a.upstream_port:
        route["route"] = {"cluster": "upstream"}
    else:
        route["direct_response"] = {"status": 200, "body": {"inline_string": "ok\n"}}
    if a.kind == "ext_authz":
        route["typed_per_filter_config"] = {
            "envoy.filters.http.ext_authz": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "check_settings": {"context_extensions": {"tollgate_api": a.api}},
            }
        }

    filters = []
    if a.kind == "ext_authz":
        filters.append({
            "name": "envoy.filters.http.ext_authz",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "transport_api_version": "V3",
                "failure_mode_allow": False,
                "status_on_error": {"code": "ServiceUnavailable"},
                "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "0.5s"},
            },
        })
    if a.kind == "jwt_authn":
        with open(a.jwks) as f:
            jwks = f.read()
        filters.append({
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {
                    "bench": {
                        "issuer": a.issuer,
                        "audiences": [a.audience],
                        "local_jwks": {"inline_string": jwks},
                        "forward": False,
                    }
                },
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
            },
        })
    filters.append({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })

    hcm = {
        "@type": HCM,
        "stat_prefix": "ingress_http",
        "normalize_path": False,
        "merge_slashes": False,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "route_config": {
            "name": "bench",
            "virtual_hosts": [{"name": "bench", "domains": ["*"], "routes": [route]}],
        },
        "http_filters": filters,
    }
    if a.access_log:
        hcm["access_log"] = [{
            "name": "envoy.access_loggers.http_grpc",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                "common_config": {
                    "log_name": "bench",
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}},
                    "buffer_flush_interval": "1s",
                    "buffer_size_bytes": 16384,
                },
                "additional_request_headers_to_log": ["x-request-id"],
            },
        }]

    def cluster(name, port, h2):
        c = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
            },
        }
        if h2:
            c["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return c

    clusters = []
    if a.authz_port:
        clusters.append(cluster("authz", a.authz_port, True))
    if a.upstream_port:
        clusters.append(cluster("upstream", a.upstream_port, False))
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": a.admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": a.listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm,
                }]}],
            }],
            "clusters": clusters,
        },
    }
    # JSON is YAML: Envoy reads it with -c file.yaml.
    json.dump(bootstrap, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
