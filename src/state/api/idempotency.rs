//! `Idempotency-Key` on writes: the same key with the same request answers the first answer again, for 24
//! hours; the same key with another request is a 409, and so is a second request while the first runs (the
//! key is claimed in the store before the write, so two racing retries never both write).
//!
//! The stored answer may hold an API key (key creation shows it once), and the store must never hold a key
//! in readable form. So the answer is sealed (ChaCha20-Poly1305) under a key derived (HKDF-SHA256) from the
//! `Idempotency-Key` itself, which only the caller has; the store indexes it by a hash of the caller's
//! token id and the `Idempotency-Key`. A random `Idempotency-Key` (a UUID v4) is as strong as the seal.

use std::future::Future;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use rand::RngCore;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use sha2::{Digest, Sha256};

use crate::state::api::ManagementState;
use crate::state::api::body::{Answer, respond};
use crate::state::api::error::ApiError;
use crate::state::model::{Claim, Remembered};
use crate::util::clock::unix_now;

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// The header a replayed answer carries.
pub const REPLAYED: &str = "idempotent-replayed";
/// A claim this old belongs to a request that died (handlers answer within 30 s): another may take it.
const STALE_CLAIM_SECS: i64 = 60;
/// Longest `Idempotency-Key` accepted.
const MAX_KEY_LEN: usize = 255;

/// Runs `write` once per `Idempotency-Key` (or every time without one) and answers.
pub async fn once<F, Fut>(
    state: &ManagementState,
    headers: &HeaderMap,
    method: &str,
    path: &str,
    body: &Bytes,
    write: F,
) -> Response
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Answer>,
{
    let Some(key) = headers.get(HEADER) else {
        return respond(write().await);
    };
    let key = match key.to_str() {
        Ok(k)
            if !k.is_empty()
                && k.len() <= MAX_KEY_LEN
                && k.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            k
        }
        _ => {
            return respond(Err(ApiError::invalid(
                "Idempotency-Key",
                format!("must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
            )));
        }
    };
    let index = index(&state.actor.0, key);
    let request = request_hash(method, path, body);
    let now = unix_now();
    match state
        .store
        .claim(&index, &request, now, now.saturating_sub(STALE_CLAIM_SECS))
        .await
    {
        Ok(Claim::Claimed) => {}
        Ok(Claim::Taken(first)) if first.status == Remembered::IN_PROGRESS => {
            return respond(Err(if first.request == request {
                ApiError::conflict(
                    "a request with this Idempotency-Key is still running: retry it in a moment",
                )
            } else {
                different_request()
            }));
        }
        Ok(Claim::Taken(first)) => return replay(key, &request, &first),
        Err(e) => return respond(Err(e.into())),
    }
    let answer = write().await;
    let (status, body) = match &answer {
        Ok((status, body)) => (*status, body.clone()),
        Err(e) => (e.status, e.body()),
    };
    // A 5xx is not kept: the caller retries it, and the retry runs.
    let kept = if status.is_server_error() {
        None
    } else {
        seal(key, &request, body.to_string().into_bytes()).map(|sealed| Remembered {
            request,
            status: status.as_u16(),
            sealed,
        })
    };
    if let Err(error) = state.store.settle(&index, kept.as_ref()).await {
        // The write is done; only its replay is lost (the claim goes stale and a retry runs again).
        tracing::warn!(%error, "idempotent answer not stored");
    }
    respond(answer)
}

fn different_request() -> ApiError {
    ApiError::conflict("this Idempotency-Key was used with a different request")
}

fn replay(key: &str, request: &[u8; 32], first: &Remembered) -> Response {
    if &first.request != request {
        return respond(Err(different_request()));
    }
    let body = unseal(key, request, first.sealed.clone())
        .and_then(|plain| serde_json::from_slice::<serde_json::Value>(&plain).ok());
    let (Some(body), Ok(status)) = (body, StatusCode::from_u16(first.status)) else {
        tracing::warn!("a stored idempotent answer does not open; refusing to replay it");
        return respond(Err(ApiError::unavailable()));
    };
    let mut response = respond(Ok((status, body)));
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

/// The ledger source of a grant to `owner` with `Idempotency-Key` `key`: one per key and owner, whoever sends
/// it and however its JSON is spelled, so a retry grants once even after its stored answer expired or the
/// admin token rotated (and the same key with another amount is refused).
pub(crate) fn grant_source(key: &str, owner: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"tollgate credit grant\0");
    h.update(key.as_bytes());
    h.update(b"\0");
    h.update(owner.as_bytes());
    format!("api:{}", hex::encode(&h.finalize()[..16]))
}

/// The store's index of an `Idempotency-Key`: scoped to the caller's token.
fn index(actor: &str, key: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tollgate idempotency index\0");
    h.update(actor.as_bytes());
    h.update(b"\0");
    h.update(key.as_bytes());
    h.finalize().into()
}

fn request_hash(method: &str, path: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b"\0");
    h.update(path.as_bytes());
    h.update(b"\0");
    h.update(body);
    h.finalize().into()
}

fn sealing_key(key: &str, request: &[u8; 32]) -> Option<LessSafeKey> {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"tollgate idempotency seal");
    let info = [request.as_slice()];
    let prk = salt.extract(key.as_bytes());
    let okm = prk.expand(&info, &aead::CHACHA20_POLY1305).ok()?;
    Some(LessSafeKey::new(UnboundKey::from(okm)))
}

/// `nonce || ciphertext || tag`.
fn seal(key: &str, request: &[u8; 32], mut plain: Vec<u8>) -> Option<Vec<u8>> {
    let sealing = sealing_key(key, request)?;
    let mut nonce = [0u8; aead::NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    sealing
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut plain,
        )
        .ok()?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&plain);
    Some(out)
}

fn unseal(key: &str, request: &[u8; 32], sealed: Vec<u8>) -> Option<Vec<u8>> {
    if sealed.len() < aead::NONCE_LEN {
        return None;
    }
    let (nonce, rest) = sealed.split_at(aead::NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut rest = rest.to_vec();
    let plain = sealing_key(key, request)?
        .open_in_place(nonce, Aad::empty(), &mut rest)
        .ok()?;
    Some(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_answer_opens_only_with_its_key_and_request() {
        let request = request_hash("POST", "/v1/apps/a/keys", b"{}");
        let sealed = seal("k-1", &request, b"{\"key\":\"tg_live_x\"}".to_vec()).unwrap();
        assert!(!sealed.windows(9).any(|w| w == b"tg_live_x"));
        assert_eq!(
            unseal("k-1", &request, sealed.clone()).unwrap(),
            b"{\"key\":\"tg_live_x\"}"
        );
        assert!(unseal("k-2", &request, sealed.clone()).is_none());
        let other = request_hash("POST", "/v1/apps/b/keys", b"{}");
        assert!(unseal("k-1", &other, sealed).is_none());
    }

    #[test]
    fn indexes_are_scoped_to_the_caller() {
        assert_ne!(index("admin:aaaa", "k"), index("admin:bbbb", "k"));
    }
}
