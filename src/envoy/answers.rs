//! The ext_authz dynamic metadata of an answer, encoded once and copied into every answer that carries it.
//!
//! An allowed call's metadata (CONTRACT §4: decision, reason, app, developer, company, customer, product,
//! operation, api, environment, the listed attributes, a token quota's reserve) is the same for every call of
//! one app through one operation. Building it is a `Struct` of ten entries and its encoding, on every Check;
//! here each worker thread keeps the encoded bytes under their content, so a Check hashes the values and
//! copies a reference-counted buffer.
//!
//! Keyed by the content itself ([`metadata::key`]), the cache can never answer stale metadata after a catalog
//! change or a state-store update: a changed identity is another key. It fills on first use rather than at
//! catalog load, so a catalog of a million keys costs memory only for the identities in use. Each thread holds
//! at most [`CAPACITY`] answers and starts over when full: a deployment with more identities in active use
//! than that pays, on a miss, what every Check paid before. Thread-local: no lock and no shared cache line on
//! the Check path.

use std::cell::RefCell;
use std::collections::HashMap;

use prost::Message;
use prost::bytes::Bytes;

use crate::check::Verdict;
use crate::envoy::metadata;

/// Most encoded answers one worker thread keeps: about 600 bytes each (key, bytes, table), 2.4 MB a thread.
pub const CAPACITY: usize = 4_096;

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

/// One thread's encoded metadata, and the buffer a Check's key is written into.
#[derive(Default)]
struct Cache {
    key: Vec<u8>,
    encoded: HashMap<Box<[u8]>, Bytes>,
}

/// The encoded metadata `Struct` of `verdict` (the bytes of [`metadata::write`]'s answer).
pub fn encoded_metadata(verdict: &Verdict) -> Bytes {
    CACHE.with(|cache| {
        // Nothing on this path calls back in, so the cache is always free; if it ever were not, encode anew.
        let Ok(mut cache) = cache.try_borrow_mut() else {
            return encode(verdict);
        };
        let Cache { key, encoded } = &mut *cache;
        key.clear();
        metadata::key(verdict, key);
        if let Some(bytes) = encoded.get(key.as_slice()) {
            return bytes.clone();
        }
        let bytes = encode(verdict);
        if encoded.len() >= CAPACITY {
            encoded.clear();
        }
        encoded.insert(key.as_slice().into(), bytes.clone());
        bytes
    })
}

fn encode(verdict: &Verdict) -> Bytes {
    Bytes::from(metadata::write(verdict).encode_to_vec())
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::Struct;

    use super::*;
    use crate::check::{Identified, Reason, Upstream};

    fn allowed(app: &str) -> Verdict {
        Verdict {
            identity: Identified {
                app: Some(app.into()),
                product: Some("gold".into()),
                ..Default::default()
            },
            api: Some("weather".into()),
            environment: Some("test".into()),
            reason: Reason::Allowed,
            message: String::new(),
            ratelimit: None,
            retry_after: None,
            credits_remaining: None,
            challenge: None,
            attributes: Vec::new(),
            quota_reserved: 0,
            upstream: Upstream::default(),
            answer: None,
        }
    }

    fn decoded(bytes: &Bytes) -> Struct {
        Struct::decode(bytes.as_ref()).expect("the cache holds an encoded Struct")
    }

    #[test]
    fn the_cached_bytes_are_the_built_metadata() {
        let verdict = allowed("weatherapp");
        let first = encoded_metadata(&verdict);
        let again = encoded_metadata(&verdict);
        assert_eq!(decoded(&first), metadata::write(&verdict));
        assert_eq!(
            first.as_ptr(),
            again.as_ptr(),
            "the second Check copies the first's bytes"
        );
    }

    #[test]
    fn every_field_that_changes_the_metadata_changes_the_answer() {
        let base = allowed("weatherapp");
        let mut variants = vec![
            allowed("otherapp"),
            Verdict {
                reason: Reason::QuotaExceeded,
                ..allowed("weatherapp")
            },
            Verdict {
                quota_reserved: 500,
                ..allowed("weatherapp")
            },
            Verdict {
                attributes: vec![("tier".into(), "gold".into())],
                ..allowed("weatherapp")
            },
            Verdict {
                environment: Some("prod".into()),
                ..allowed("weatherapp")
            },
        ];
        // A value moved from one field to the next is another answer, not the same bytes.
        let mut shifted = allowed("");
        shifted.identity.app = None;
        shifted.identity.developer = Some(String::new());
        variants.push(shifted);
        let mut attribute_split = allowed("weatherapp");
        attribute_split.attributes = vec![("tie".into(), "rgold".into())];
        variants.push(attribute_split);
        encoded_metadata(&base);
        for variant in &variants {
            assert_eq!(
                decoded(&encoded_metadata(variant)),
                metadata::write(variant),
                "{variant:?}"
            );
        }
        assert_eq!(decoded(&encoded_metadata(&base)), metadata::write(&base));
    }

    #[test]
    fn a_full_cache_starts_over_and_still_answers_right() {
        for n in 0..=CAPACITY + 1 {
            let verdict = allowed(&format!("app{n}"));
            let bytes = encoded_metadata(&verdict);
            if n % 1024 == 0 || n > CAPACITY {
                assert_eq!(decoded(&bytes), metadata::write(&verdict));
            }
        }
        let held = CACHE.with(|cache| cache.borrow().encoded.len());
        assert!(held <= CAPACITY, "{held} answers held");
    }
}
