//! The bearer token Envoy's own streams to tollgate carry (`access_log_token`): the access log (records become
//! billed usage) and ext_proc (each stream reads a response body, up to `genai.max_buffer_bytes` held, and
//! writes the counts that are billed). Envoy sends it as `authorization: Bearer <token>` from the
//! `grpc_service.initial_metadata` of each filter or logger; a stream without it is refused before a single
//! message is read. ext_authz's Check is not behind it: Envoy's ext_authz client is the one caller that must
//! never be turned away by a misconfigured token (fail closed would deny every request).

use std::sync::Arc;

use prometheus::IntCounter;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::util::bearer;

/// Refuses streams without the configured bearer token; lets all through when none is set.
#[derive(Clone)]
pub struct TokenCheck {
    token: Option<Arc<str>>,
    refused: IntCounter,
    /// The service's name in the refusal, e.g. "access-log".
    service: &'static str,
}

impl TokenCheck {
    /// A check for `service`'s streams, counting refusals in `refused`.
    pub fn new(token: Option<Arc<str>>, refused: IntCounter, service: &'static str) -> TokenCheck {
        TokenCheck {
            token,
            refused,
            service,
        }
    }
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if bearer::matches(presented, token) {
            return Ok(request);
        }
        self.refused.inc();
        tracing::warn!(
            service = self.service,
            "stream refused: it carries no valid access_log_token"
        );
        Err(Status::unauthenticated(format!(
            "{} streams need the access_log_token as a bearer token (grpc_service.initial_metadata)",
            self.service
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(token: Option<&str>) -> TokenCheck {
        TokenCheck::new(
            token.map(Arc::from),
            IntCounter::new("refused", "refused").unwrap(),
            "ext_proc",
        )
    }

    fn with(authorization: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn only_the_configured_bearer_passes() {
        let mut c = check(Some("s3cret"));
        assert!(c.call(with(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer guessed"),
            Some("s3cret"),
            Some("Basic s3cret"),
        ] {
            let status = c.call(with(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(status.message().starts_with("ext_proc streams"));
            assert!(!status.message().contains("s3cret"));
        }
        assert_eq!(c.refused.get(), 4);
    }

    #[test]
    fn without_a_token_every_stream_passes() {
        let mut c = check(None);
        assert!(c.call(with(None)).is_ok());
        assert_eq!(c.refused.get(), 0);
    }
}
