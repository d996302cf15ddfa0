//! Generates the slim Envoy messages (`proto/tollgate/slim/v1/`) and the two Envoy services that decode into
//! them (src/envoy/slim.rs includes the output).
//!
//! protox compiles the `.proto` files in Rust, so no system `protoc` is needed; prost-build writes the
//! messages; tonic-build writes the servers under Envoy's own package and service names, so the gRPC paths
//! Envoy calls stay `/envoy.service.auth.v3.Authorization/Check` and
//! `/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`.

use std::error::Error;

use tonic_build::manual::{Builder, Method, Service};

/// The proto files compiled, relative to `proto/`.
const PROTOS: [&str; 2] = [
    "tollgate/slim/v1/authz.proto",
    "tollgate/slim/v1/access_log.proto",
];

/// Where the generated messages live in the crate (src/envoy/slim.rs).
const SLIM: &str = "crate::envoy::slim";

/// The codec of both services: protobuf through prost, as envoy-types' own servers use.
const CODEC: &str = "::tonic_prost::ProstCodec";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");

    let files = protox::compile(PROTOS, ["proto"])?;
    prost_build::Config::new()
        // The well-known types are envoy-types' (pbjson) ones, as everywhere else in tollgate: the metadata
        // Struct reads through src/envoy/metadata.rs, and the timestamps and the status-code wrapper have
        // the very types envoy-types' full messages carry. Mapping the whole package needs prost-build's
        // own well-known-type defaults off (they would map `UInt32Value` to a bare `u32`).
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::envoy_types::pb::google::protobuf")
        .bytes([
            // Cloned per Check from the answer cache: a reference count, not a copy.
            ".tollgate.slim.v1.CheckResponse.dynamic_metadata",
            // A CheckRequest's strings, sliced from the received frame instead of copied into a String each.
            ".tollgate.slim.v1.AttributeContext.HttpRequest.method",
            ".tollgate.slim.v1.AttributeContext.HttpRequest.path",
            ".tollgate.slim.v1.AttributeContext.HttpRequest.host",
            ".tollgate.slim.v1.MapEntry",
        ])
        .compile_fds(files)?;

    let check = Method::builder()
        .name("check")
        .route_name("Check")
        .comment("Decides one request (a slim CheckRequest: only the fields tollgate reads).")
        .input_type(format!("{SLIM}::CheckRequest"))
        .output_type(format!("{SLIM}::CheckResponse"))
        .codec_path(CODEC)
        .build();
    let authorization = Service::builder()
        .name("Authorization")
        .package("envoy.service.auth.v3")
.comment("Envoy's ext_authz service, reading slim CheckRequests and answering slim CheckResponses.")
        .method(check)
        .build();
    let stream = Method::builder()
        .name("stream_access_logs")
        .route_name("StreamAccessLogs")
        .comment(
            "One access-log stream from Envoy (slim messages: only the fields tollgate reads).",
        )
        .input_type(format!("{SLIM}::StreamAccessLogsMessage"))
        .output_type("::envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsResponse")
        .codec_path(CODEC)
        .client_streaming()
        .build();
    let access_log = Service::builder()
        .name("AccessLogService")
        .package("envoy.service.accesslog.v3")
        .comment("Envoy's gRPC access-log service, reading slim StreamAccessLogsMessages.")
        .method(stream)
        .build();
    // Servers only: tollgate never calls these services (tests call them with envoy-types' clients).
    Builder::new()
        .build_client(false)
        .build_transport(false)
        .compile(&[authorization, access_log]);
    Ok(())
}
