#!/usr/bin/env python3
"""Writes the Envoy 1.40 bootstrap for one bench variant (all on loopback).

  plain      Envoy alone (variant 1)
  ext_authz  Envoy + an ext_authz gRPC server on --authz-port: the do-nothing one or tollgate (variants 2-5, 7-13)
  jwt_authn  Envoy's own jwt_authn filter with a local JWKS (variant 6)
  genai      ext_authz + the gRPC access log in front of a streaming LLM upstream (--upstream-port), three
             routes (bench/run --phases genai):
               /llm/on/   ext_authz + ext_proc (enabled on this route only, as in envoy/llm.yaml)
               /llm/off/  the same route without ext_proc (same upstream, same tollgate_api)
               /plain/    a direct_response route with ext_authz only (tollgate_api --plain-api)
             With --ext-proc the ext_proc filter is in the chain, disabled by default (envoy/llm.yaml's
             settings: STREAMED response body, metadata namespaces); without it there is no ext_proc filter
             at all and no /llm/on/ route. --nofilter-listen-port adds a second listener to the same Envoy
             whose chain has no ext_proc filter (and no /llm/on/ route): what routes without ext_proc pay for
             the filter being there, measured in one process (same worker, same connections to tollgate).

The route answers with a direct_response by default, so the figures isolate what the authorizer costs;
--upstream-port proxies to an upstream instead. The path is kept as the client sent it, as in envoy/.

--ratelimit-port adds Envoy's global rate limit filter (envoy.filters.http.ratelimit) after ext_authz, calling a
rate limit service (Limitador, variant 10 "the peer stack") over gRPC: `domain: bench`, one descriptor per request
`api_key = <x-api-key header>` (a route action: the filter reads its descriptors from the route), fail closed.
Envoy's ratelimit filter does nothing on a direct_response route (it needs a route entry with a cluster), so
without --upstream-port the route names an empty cluster (`local_reply`, never connected to) and the fault filter,
last before the router, answers 200 itself (`abort: {http_status: 200}` for every request, body "fault filter
abort"): the same kind of local reply as direct_response, by another filter.
"""
import argparse
import json
import sys

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["plain", "ext_authz", "jwt_authn", "genai"], required=True)
    ap.add_argument("--listen-port", type=int, required=True)
    ap.add_argument("--admin-port", type=int, required=True)
    ap.add_argument("--authz-port", type=int, default=0)
    ap.add_argument("--api", default="benchapi", help="the route's tollgate_api context extension")
    ap.add_argument("--access-log", action="store_true", help="gRPC access log to the authz server")
    ap.add_argument("--access-log-connection", choices=["shared", "own"], default="shared",
                    help="shared: the access log rides the Check's cluster, one HTTP/2 connection per worker for"
                         " both (as the reference configs); own: a second cluster to the same server")
    ap.add_argument("--upstream-port", type=int, default=0, help="0: direct_response")
    ap.add_argument("--jwks", help="JWKS file (jwt_authn)")
    ap.add_argument("--issuer", default="https://issuer.bench.example")
    ap.add_argument("--audience", default="https://api.bench.example")
    ap.add_argument("--ext-proc", action="store_true", help="genai: the ext_proc filter (to --authz-port)")
    ap.add_argument("--plain-api", default="plainapi", help="genai: the /plain/ route's tollgate_api")
    ap.add_argument("--nofilter-listen-port", type=int, default=0,
                    help="genai: a second listener without the ext_proc filter")
    ap.add_argument("--ratelimit-port", type=int, default=0,
                    help="Envoy's ratelimit filter calling a rate limit service (Limitador) on this port")
    ap.add_argument("--ratelimit-domain", default="bench")
    a = ap.parse_args()
    if a.kind in ("ext_authz", "genai") and not a.authz_port:
        ap.error(f"{a.kind} needs --authz-port")
    if a.kind == "genai" and not a.upstream_port:
        ap.error("genai needs --upstream-port (the streaming upstream)")
    if a.kind == "jwt_authn" and not a.jwks:
        ap.error("jwt_authn needs --jwks")
    if a.access_log and not a.authz_port:
        ap.error("--access-log needs --authz-port (the server that receives the entries)")
    if a.ratelimit_port and a.kind == "genai":
        ap.error("--ratelimit-port is for the variants' kinds, not genai")

    def authz_per_route(api):
        return {
            "envoy.filters.http.ext_authz": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "check_settings": {"context_extensions": {"tollgate_api": api}},
            }
        }

    route = {"match": {"prefix": "/"}}
    if a.upstream_port:
        route["route"] = {"cluster": "upstream"}
    elif a.ratelimit_port:
        # The ratelimit filter skips routes without a cluster: an empty one, the fault filter answers (above).
        route["route"] = {"cluster": "local_reply"}
    else:
        route["direct_response"] = {"status": 200, "body": {"inline_string": "ok\n"}}
    if a.ratelimit_port:
        # One descriptor per request, api_key = the x-api-key header (none without it: no call).
        route["route"]["rate_limits"] = [
            {"actions": [{"request_headers": {"header_name": "x-api-key", "descriptor_key": "api_key"}}]}]
    if a.kind == "ext_authz":
        route["typed_per_filter_config"] = authz_per_route(a.api)
    routes = [route]
    if a.kind == "genai":
        # No route timeout on the streaming routes, as in envoy/llm.yaml.
        on = {"match": {"prefix": "/llm/on/"}, "route": {"cluster": "upstream", "timeout": "0s"},
              "typed_per_filter_config": authz_per_route(a.api)}
        # Turns the ext_proc filter on for this route with the listener's settings (an empty config).
        on["typed_per_filter_config"]["envoy.filters.http.ext_proc"] = {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}
        off = {"match": {"prefix": "/llm/off/"}, "route": {"cluster": "upstream", "timeout": "0s"},
               "typed_per_filter_config": authz_per_route(a.api)}
        plain = {"match": {"prefix": "/plain/"},
                 "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
                 "typed_per_filter_config": authz_per_route(a.plain_api)}
        routes = ([on] if a.ext_proc else []) + [off, plain]
        routes_nofilter = [off, plain]

    filters = []
    if a.kind in ("ext_authz", "genai"):
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
    if a.ratelimit_port:
        # As ../shared/reference/envoy/authz-ratelimit.yaml: after ext_authz, fail closed, V3, no x-ratelimit-*
        # headers (Limitador's default answers carry none).
        filters.append({
            "name": "envoy.filters.http.ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                "domain": a.ratelimit_domain,
                "failure_mode_deny": True,
                "timeout": "0.5s",
                "rate_limit_service": {
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit"}},
                },
            },
        })
        if not a.upstream_port:
            filters.append({
                "name": "envoy.filters.http.fault",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                    "abort": {"http_status": 200, "percentage": {"numerator": 100, "denominator": "HUNDRED"}},
                },
            })
    filters_nofilter = list(filters)
    if a.kind == "genai" and a.ext_proc:
        # envoy/llm.yaml's ext_proc filter: off unless a route turns it on, response headers and the streamed
        # response body only, the ext_authz metadata forwarded, tollgate.usage accepted back.
        filters.append({
            "name": "envoy.filters.http.ext_proc",
            "disabled": True,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}},
                "failure_mode_allow": True,
                "message_timeout": "1s",
                "allow_mode_override": True,
                "processing_mode": {
                    "request_header_mode": "SKIP",
                    "response_header_mode": "SEND",
                    "request_body_mode": "NONE",
                    "response_body_mode": "STREAMED",
                    "request_trailer_mode": "SKIP",
                    "response_trailer_mode": "SKIP",
                },
                "metadata_options": {
                    "forwarding_namespaces": {"untyped": ["envoy.filters.http.ext_authz"]},
                    "receiving_namespaces": {"untyped": ["tollgate.usage"]},
                },
            },
        })
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    filters.append(router)
    filters_nofilter.append(router)

    hcm = {
        "@type": HCM,
        "stat_prefix": "ingress_http",
        "normalize_path": False,
        "merge_slashes": False,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "route_config": {
            "name": "bench",
            "virtual_hosts": [{"name": "bench", "domains": ["*"], "routes": routes}],
        },
        "http_filters": filters,
    }
    log_cluster = "authz_log" if a.access_log_connection == "own" else "authz"
    if a.access_log:
        hcm["access_log"] = [{
            "name": "envoy.access_loggers.http_grpc",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                "common_config": {
                    "log_name": "bench",
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": log_cluster}},
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
        if a.kind == "genai":
            # As envoy/llm.yaml: every streamed response holds an ext_proc stream as long as it lasts.
            clusters[-1]["circuit_breakers"] = {"thresholds": [
                {"max_connections": 8192, "max_pending_requests": 8192, "max_requests": 8192}]}
        if a.access_log and log_cluster != "authz":
            clusters.append(cluster(log_cluster, a.authz_port, True))
    if a.upstream_port:
        clusters.append(cluster("upstream", a.upstream_port, False))
    if a.ratelimit_port:
        clusters.append(cluster("ratelimit", a.ratelimit_port, True))
        if not a.upstream_port:
            clusters.append({"name": "local_reply", "type": "STATIC", "connect_timeout": "1s",
                             "load_assignment": {"cluster_name": "local_reply"}})
    def listener(name, port, typed_config):
        return {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": typed_config,
            }]}],
        }

    listeners = [listener("ingress", a.listen_port, hcm)]
    if a.kind == "genai" and a.nofilter_listen_port:
        # The same connection manager without the ext_proc filter (and its route), its own stats prefix.
        bare = dict(hcm, stat_prefix="ingress_nofilter", http_filters=filters_nofilter,
                    route_config={"name": "bench", "virtual_hosts": [
                        {"name": "bench", "domains": ["*"], "routes": routes_nofilter}]})
        listeners.append(listener("ingress_nofilter", a.nofilter_listen_port, bare))
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": a.admin_port}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters,
        },
    }
    # JSON is YAML: Envoy reads it with -c file.yaml.
    json.dump(bootstrap, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
