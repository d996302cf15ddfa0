//! The `Stripe-Signature` header: `t=<unix seconds>,v1=<hex>[,v1=<hex>…]`, where each `v1` is an
//! HMAC-SHA256 keyed with an endpoint secret over `<t>.<raw body>` (several during a secret rotation).

use ring::hmac;
use subtle::ConstantTimeEq;

/// How far the signed time may lie from now (Stripe's libraries use 300 s).
pub const TOLERANCE_SECS: i64 = 300;
/// Most `v1` values a header may carry: Stripe sends one per active secret (two during a rotation). The bound
/// keeps an unsigned request from buying unbounded work.
pub const MAX_SIGNATURES: usize = 8;

/// Why a webhook's signature is refused; none of them says anything about the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Stripe-Signature` header.
    #[error("no Stripe-Signature header")]
    Missing,
    /// The header is not `t=…,v1=…`.
    #[error("the Stripe-Signature header is malformed: {0}")]
    Malformed(&'static str),
    /// The signed time is outside the tolerance: a replay, or a clock far off.
    #[error("the Stripe-Signature timestamp is {0} s away from now (at most {TOLERANCE_SECS} s)")]
    Stale(i64),
    /// No `v1` signature matches the endpoint secret.
    #[error("no v1 signature matches the endpoint secret")]
    Mismatch,
}

/// Checks `header` against `body` and `secret` at `now`; returns the signed time.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secret: &str,
    now: i64,
) -> Result<i64, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp: Option<&str> = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed("an entry without ="))?;
        match key {
            "t" if timestamp.is_none() => timestamp = Some(value),
            "t" => return Err(SignatureError::Malformed("t given twice")),
            "v1" if signatures.len() < MAX_SIGNATURES => signatures.push(value),
            "v1" => return Err(SignatureError::Malformed("too many v1 signatures")),
            // v0 (test-mode legacy) and future schemes are not trusted.
            _ => {}
        }
    }
    let t_text = timestamp.ok_or(SignatureError::Malformed("no t="))?;
    let t: i64 = t_text
        .parse()
        .map_err(|_| SignatureError::Malformed("t is not a whole number"))?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed("no v1="));
    }
    let age = now.saturating_sub(t);
    if age.abs() > TOLERANCE_SECS {
        return Err(SignatureError::Stale(age));
    }
    // One HMAC per request, whatever the header holds; each v1 is then compared in constant time, and every
    // one is compared so the time taken does not say which matched.
    let expected = hex::encode(sign_raw(secret, t_text, body).as_ref());
    let mut matched = false;
    for signature in signatures {
        matched |= bool::from(signature.as_bytes().ct_eq(expected.as_bytes()));
    }
    if matched {
        Ok(t)
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The `v1` signature of `body` at `t` with `secret` (what Stripe sends; for tests and local tools).
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    hex::encode(sign_raw(secret, &t.to_string(), body).as_ref())
}

/// HMAC-SHA256 of `<t>.<body>`, `t` as written in the header.
fn sign_raw(secret: &str, t: &str, body: &[u8]) -> hmac::Tag {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut context = hmac::Context::with_key(&key);
    context.update(t.as_bytes());
    context.update(b".");
    context.update(body);
    context.sign()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";
    const BODY: &[u8] = br#"{"id":"evt_1"}"#;

    fn header(t: i64, sigs: &[String]) -> String {
        let mut h = format!("t={t}");
        for s in sigs {
            h.push_str(",v1=");
            h.push_str(s);
        }
        h
    }

    #[test]
    fn a_good_signature_passes_even_beside_others() {
        let now = 1_700_000_000;
        let good = sign(SECRET, now, BODY);
        let other = sign("whsec_old", now, BODY);
        assert_eq!(
            verify(
                Some(&header(now, std::slice::from_ref(&good))),
                BODY,
                SECRET,
                now
            ),
            Ok(now)
        );
        assert_eq!(
            verify(
                Some(&header(now, &[other.clone(), good])),
                BODY,
                SECRET,
                now + 10
            ),
            Ok(now),
            "during a rotation Stripe signs with both secrets"
        );
        assert_eq!(
            verify(
                Some(&format!(
                    "{},v0=abc",
                    header(now, &[sign(SECRET, now, BODY)])
                )),
                BODY,
                SECRET,
                now
            ),
            Ok(now)
        );
        assert_eq!(
            verify(Some(&header(now, &[other])), BODY, SECRET, now),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn tampering_staleness_and_garbage_are_refused() {
        let now = 1_700_000_000;
        let sig = sign(SECRET, now, BODY);
        assert_eq!(
            verify(
                Some(&header(now, std::slice::from_ref(&sig))),
                br#"{"id":"evt_2"}"#,
                SECRET,
                now
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(
                Some(&header(now, std::slice::from_ref(&sig))),
                BODY,
                SECRET,
                now + 301
            ),
            Err(SignatureError::Stale(301))
        );
        assert_eq!(
            verify(
                Some(&header(now, std::slice::from_ref(&sig))),
                BODY,
                SECRET,
                now - 301
            ),
            Err(SignatureError::Stale(-301))
        );
        // The signed time cannot be moved without breaking the signature.
        assert_eq!(
            verify(Some(&header(now + 100, &[sig])), BODY, SECRET, now + 100),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(None, BODY, SECRET, now),
            Err(SignatureError::Missing)
        );
        let many = format!("t=1{}", ",v1=00".repeat(MAX_SIGNATURES + 1));
        for bad in [
            "",
            "t=1",
            "v1=ab",
            "t=x,v1=ab",
            "t=1,t=2,v1=ab",
            "garbage",
            many.as_str(),
        ] {
            assert!(
                matches!(
                    verify(Some(bad), BODY, SECRET, 1),
                    Err(SignatureError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            verify(Some("t=1,v1=zz"), BODY, SECRET, 1),
            Err(SignatureError::Mismatch)
        );
    }
}
