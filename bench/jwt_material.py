#!/usr/bin/env python3
"""Makes the RS256 material for the JWT variants (5 and 6) with the openssl CLI: a 2048-bit key pair
(`jwt_private.pem`, `jwt_public.pem`), the public key as a JWKS (`jwks.json`, for Envoy's jwt_authn) and one
signed token (`token`) that both tollgate and Envoy accept. Bench-only material, written to --dir.
"""
import argparse
import base64
import json
import os
import subprocess
import sys
import time


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--issuer", default="https://issuer.bench.example")
    ap.add_argument("--audience", default="https://api.bench.example")
    ap.add_argument("--app", required=True, help="the app's client_id (the token's client_id claim)")
    ap.add_argument("--subject", default="dev0@bench.example")
    a = ap.parse_args()
    priv = os.path.join(a.dir, "jwt_private.pem")
    pub = os.path.join(a.dir, "jwt_public.pem")
    run = lambda *cmd, **kw: subprocess.run(cmd, check=True, capture_output=True, **kw).stdout
    run("openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", priv)
    run("openssl", "pkey", "-in", priv, "-pubout", "-out", pub)
    modulus = run("openssl", "rsa", "-in", priv, "-noout", "-modulus").decode().strip().split("=", 1)[1]
    n = bytes.fromhex(modulus)
    jwks = {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "bench",
                      "n": b64url(n), "e": b64url((65537).to_bytes(3, "big"))}]}
    with open(os.path.join(a.dir, "jwks.json"), "w") as f:
        json.dump(jwks, f)
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": "bench"}
    claims = {"iss": a.issuer, "aud": a.audience, "sub": a.subject, "client_id": a.app,
              "scope": "read", "iat": now, "nbf": now - 60, "exp": now + 86400}
    signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                     b64url(json.dumps(claims, separators=(",", ":")).encode()))
    signature = run("openssl", "dgst", "-sha256", "-sign", priv, input=signing_input.encode())
    with open(os.path.join(a.dir, "token"), "w") as f:
        f.write(signing_input + "." + b64url(signature) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
