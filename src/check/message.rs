//! The `message` of a denial: what the caller should fix, never a secret, client text cut short.

use crate::check::Settings;
use crate::check::buckets::Owner;
use crate::matching::Target;
use crate::quota::{Limit, LimitState};

/// Where the caller could have put a credential, from the accepted schemes and key locations.
pub(crate) fn missing_credential_message(settings: &Settings) -> String {
    let config = &settings.api_key;
    let mut places = Vec::new();
    if settings.bearer {
        places.push("a bearer token in the authorization header".to_owned());
    }
    places.extend(
        config
            .headers
            .iter()
            .map(|h| format!("an API key in the {h} header")),
    );
    places.extend(
        config
            .query_params
            .iter()
            .map(|q| format!("an API key in the {q} query parameter")),
    );
    if places.is_empty() {
        return "no credential presented".into();
    }
    format!("no credential: send {}", places.join(" or "))
}

/// Client-supplied text echoed in a message (path, API id from `:authority`) is cut at this many characters.
const MAX_ECHOED: usize = 200;

/// No product of `owner` covers the request: says which method, path and API were looked for.
pub(crate) fn no_product_message(owner: Owner<'_>, target: &Target<'_>) -> String {
    let mut message = format!("{} has no product for {} ", owner.label(), target.method);
    push_capped(&mut message, target.path.as_str());
    message.push_str(" on API ");
    push_capped(&mut message, target.api);
    message
}

/// Appends `text`, cut at [`MAX_ECHOED`] characters (marked with an ellipsis).
fn push_capped(message: &mut String, text: &str) {
    match text.char_indices().nth(MAX_ECHOED) {
        Some((cut, _)) => {
            message.push_str(&text[..cut]);
            message.push('…');
        }
        None => message.push_str(text),
    }
}

/// Which quota of which product is spent and when it refills.
pub(crate) fn quota_message(product: &str, limit: Option<Limit>, state: LimitState) -> String {
    let per = match limit {
        Some(l) if l.interval == 1 => format!(" per {}", l.unit.as_str()),
        Some(l) => format!(" per {} {}s", l.interval, l.unit.as_str()),
        None => String::new(),
    };
    format!(
        "quota of {}{per} for product {product} is exhausted, retry in {} s",
        state.limit, state.reset_secs
    )
}
