//! Field checks for management API input; each error names the field it is about.

use crate::state::api::error::ApiError;
use crate::state::model::Attributes;

/// Longest name of an app, a client id, a key label or an attribute.
pub const MAX_NAME: usize = 128;
/// Longest e-mail (RFC 5321's path limit).
pub const MAX_EMAIL: usize = 254;
/// Most attributes on one entity.
pub const MAX_ATTRIBUTES: usize = 100;
/// Longest attribute value.
pub const MAX_ATTRIBUTE_VALUE: usize = 1024;
/// Largest page of a list.
pub const MAX_PAGE: u32 = 1000;
/// Page size of a list that does not say.
pub const DEFAULT_PAGE: u32 = 100;

/// An e-mail: one `@` with text on both sides, no spaces or control characters.
pub fn email(field: &str, value: &str) -> Result<(), ApiError> {
    let ok = value.len() <= MAX_EMAIL
        && value.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@')
        })
        && value.chars().all(|c| !c.is_whitespace() && !c.is_control());
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("{value:?} is not an e-mail address"),
        ))
    }
}

/// A name that travels in metadata, headers and URLs: 1 to 128 of letters, digits and `._~-@+`.
pub fn name(field: &str, value: &str) -> Result<(), ApiError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~-@+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("must be 1 to {MAX_NAME} letters, digits or ._~-@+"),
        ))
    }
}

/// Free text: trimmed, not empty when present, no control characters, at most `max` bytes.
pub fn text(field: &str, value: Option<String>, max: usize) -> Result<Option<String>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let value = value.trim().to_owned();
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > max || value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {max} bytes without control characters"),
        ));
    }
    Ok(Some(value))
}

/// Attributes: at most 100, names as [`name`], values as [`text`].
pub fn attributes(field: &str, attributes: Attributes) -> Result<Attributes, ApiError> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_ATTRIBUTES} attributes"),
        ));
    }
    let mut out = Attributes::new();
    for (k, v) in attributes {
        name(&format!("{field}.{k}"), &k)?;
        let v = text(&format!("{field}.{k}"), Some(v), MAX_ATTRIBUTE_VALUE)?.unwrap_or_default();
        out.insert(k, v);
    }
    Ok(out)
}

/// A list's page size: 1 to 1000, default 100.
pub fn limit(value: Option<u32>) -> Result<u32, ApiError> {
    match value {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {MAX_PAGE}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_names_and_texts() {
        assert!(email("email", "a@b.example").is_ok());
        for bad in ["", "a", "@b", "a@", "a b@c", "a@b@c"] {
            assert!(email("email", bad).is_err(), "{bad}");
        }
        assert!(name("name", "weather-app_1.2").is_ok());
        for bad in ["", "a/b", "a b", "ä", &"x".repeat(129)] {
            assert!(name("name", bad).is_err(), "{bad}");
        }
        assert_eq!(text("t", Some("  x ".into()), 5).unwrap(), Some("x".into()));
        assert_eq!(text("t", Some("  ".into()), 5).unwrap(), None);
        assert!(text("t", Some("a\nb".into()), 5).is_err());
        let e = limit(Some(0)).unwrap_err();
        assert!(e.message.starts_with("limit:"));
    }
}
