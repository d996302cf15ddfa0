//! `JwtVerifier::verify` (peek, provider routing, HS256 verification, claim rules) on hostile tokens.
//!
//! One provider (HS256, fixed secret) and one valid token minted with `mint_hs256`. The first input byte
//! picks how the rest becomes a token: as is; the valid token with bytes overwritten; the valid
//! header.payload with the rest as signature; three base64url-encoded parts from the rest split on NUL
//! (reaches the JSON of header and claims); the valid claims under a header whose `alg` is the rest.
//! Oracle: no panic, and nothing but the valid token itself ever verifies (0 false allows).
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use tollgate::identity::jwt::JwtVerifier;
use tollgate_fuzz::jwt;

struct Rig {
    runtime: tokio::runtime::Runtime,
    verifier: JwtVerifier,
    valid: String,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let verifier = runtime.block_on(jwt::verifier());
        let valid = jwt::valid_token();
        // The oracle is only meaningful if the valid token does verify.
        assert!(
            runtime.block_on(verifier.verify(&valid)).is_ok(),
            "the minted token must verify"
        );
        Rig {
            runtime,
            verifier,
            valid,
        }
    })
}

fn token(valid: &str, mode: u8, rest: &[u8]) -> Option<String> {
    // `signed` is header.payload, the part the signature covers.
    let (signed, signature) = valid.rsplit_once('.')?;
    match mode % 5 {
        0 => std::str::from_utf8(rest).ok().map(str::to_owned),
        1 => {
            let mut bytes = valid.as_bytes().to_vec();
            for pair in rest.chunks_exact(3) {
                let at = usize::from(u16::from_le_bytes([pair[0], pair[1]])) % bytes.len();
                bytes[at] = pair[2];
            }
            String::from_utf8(bytes).ok()
        }
        2 => Some(format!("{signed}.{}", String::from_utf8_lossy(rest))),
        3 => {
            let mut parts = rest.splitn(3, |&b| b == 0);
            let mut next = || URL_SAFE_NO_PAD.encode(parts.next().unwrap_or_default());
            Some(format!("{}.{}.{}", next(), next(), next()))
        }
        _ => {
            let payload = signed.split('.').nth(1)?;
            let alg = serde_json::Value::from(String::from_utf8_lossy(rest).into_owned());
            let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":{alg},"typ":"JWT"}}"#));
            Some(format!("{header}.{payload}.{signature}"))
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let rig = rig();
    let Some(token) = token(&rig.valid, mode, rest) else {
        return;
    };
    let verified = rig.runtime.block_on(rig.verifier.verify(&token));
    if verified.is_ok() {
        assert_eq!(
            token, rig.valid,
            "a token other than the minted one verified"
        );
    }
});
