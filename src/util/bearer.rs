//! Shared-secret bearer tokens for tollgate's own endpoints (`/v1/...`, the access-log service).

use subtle::ConstantTimeEq;

/// Whether an `Authorization` header value is `Bearer <expected>`; the token is compared in constant time.
pub fn matches(authorization: Option<&str>, expected: &str) -> bool {
    let presented = authorization
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn only_the_exact_token_after_a_bearer_scheme_matches() {
        assert!(matches(Some("Bearer s3cret"), "s3cret"));
        assert!(matches(Some("bearer  s3cret "), "s3cret"));
        for wrong in [
            None,
            Some(""),
            Some("s3cret"),
            Some("Basic s3cret"),
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("Bearer "),
        ] {
            assert!(!matches(wrong, "s3cret"), "{wrong:?}");
        }
    }
}
