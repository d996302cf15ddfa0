//! Reading a token's header and `iss` before any key is tried: only to route it, never to trust it.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::error::JwtRejection;

/// The unverified facts needed to pick a provider and a key.
#[derive(Debug)]
pub(crate) struct Peeked {
    pub(crate) alg: Algorithm,
    pub(crate) kid: Option<String>,
    pub(crate) typ: Option<String>,
    pub(crate) iss: String,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
    typ: Option<String>,
    crit: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct RawIssuer {
    iss: Option<String>,
}

/// Splits a compact JWS, reads `alg`/`kid`/`typ`/`crit` from its header (key-carrying headers such as `jku`,
/// `x5u`, `jwk` and `x5c` are never read: keys come from the provider's configuration alone) and `iss` from its payload; the caller has
/// already capped the size.
pub(crate) fn peek(token: &str) -> Result<Peeked, JwtRejection> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtRejection::Malformed);
    };
    let header: RawHeader =
        serde_json::from_slice(&decode(header)?).map_err(|_| JwtRejection::Malformed)?;
    let alg = header.alg.ok_or(JwtRejection::Malformed)?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(JwtRejection::AlgNone);
    }
    let alg = alg
        .parse::<Algorithm>()
        .map_err(|_| JwtRejection::UnsupportedAlgorithm)?;
    if header.crit.is_some() {
        return Err(JwtRejection::UnsupportedCritical);
    }
    let claims: RawIssuer =
        serde_json::from_slice(&decode(payload)?).map_err(|_| JwtRejection::Malformed)?;
    let iss = claims.iss.ok_or(JwtRejection::MissingIssuer)?;
    Ok(Peeked {
        alg,
        kid: header.kid,
        typ: header.typ,
        iss,
    })
}

fn decode(part: &str) -> Result<Vec<u8>, JwtRejection> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtRejection::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    fn token(header: &str, payload: &str) -> String {
        format!("{}.{}.c2ln", seg(header), seg(payload))
    }

    #[test]
    fn reads_alg_kid_and_iss() {
        let p = peek(&token(
            r#"{"alg":"RS256","kid":"k1"}"#,
            r#"{"iss":"https://i","exp":1}"#,
        ))
        .unwrap();
        assert_eq!(p.alg, Algorithm::RS256);
        assert_eq!(p.kid.as_deref(), Some("k1"));
        assert_eq!(p.iss, "https://i");
    }

    #[test]
    fn refusals() {
        use JwtRejection::*;
        for (header, payload, want) in [
            (r#"{"alg":"none"}"#, r#"{"iss":"i"}"#, AlgNone),
            (r#"{"alg":"NoNe"}"#, r#"{"iss":"i"}"#, AlgNone),
            (r#"{"alg":"HS1"}"#, r#"{"iss":"i"}"#, UnsupportedAlgorithm),
            (r#"{"alg":"ES512"}"#, r#"{"iss":"i"}"#, UnsupportedAlgorithm),
            (r#"{"typ":"JWT"}"#, r#"{"iss":"i"}"#, Malformed),
            (
                r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
                r#"{"iss":"i"}"#,
                UnsupportedCritical,
            ),
            (r#"{"alg":"HS256"}"#, r#"{"sub":"s"}"#, MissingIssuer),
            (r#"{"alg":"HS256"}"#, r#"{"iss":["a","b"]}"#, Malformed),
            (r#"{"alg":"HS256"}"#, r#"{"iss":"a","iss":"b"}"#, Malformed),
            (r#"{"alg":"HS256"}"#, r#"not json"#, Malformed),
            (r#"{"alg":"HS256","kid":7}"#, r#"{"iss":"i"}"#, Malformed),
        ] {
            assert_eq!(
                peek(&token(header, payload)).unwrap_err(),
                want,
                "{header} {payload}"
            );
        }
        assert_eq!(peek("a.b").unwrap_err(), Malformed);
        assert_eq!(peek("a.b.c.d.e").unwrap_err(), Malformed);
        assert_eq!(peek("").unwrap_err(), Malformed);
        assert_eq!(peek("!!.??.x").unwrap_err(), Malformed);
    }
}
