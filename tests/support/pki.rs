//! A private CA in a temporary folder (rcgen), for tests of TLS listeners and HTTPS clients.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use std::path::PathBuf;
use tempfile::TempDir;

/// A private CA in a temporary folder, issuing server and client certificates.
pub struct Pki {
    dir: TempDir,
    /// The CA certificate (PEM).
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM, with the certificate's DER for comparisons.
pub struct Leaf {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// The certificate (DER).
    pub der: CertificateDer<'static>,
}

impl Pki {
    /// A new CA, its certificate written as `ca.crt`.
    pub fn new() -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "tollgate test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&key).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca_pem: ca.pem(),
            issuer: Issuer::new(params, key),
        };
        pki.write("ca.crt", &pki.ca_pem);
        pki
    }

    /// A certificate for `names` (DNS names or IP addresses) with serial `serial`, for a server or a client.
    pub fn leaf(&self, names: &[&str], serial: u64, client: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        params.distinguished_name.push(
            DnType::CommonName,
            if client { "envoy" } else { "tollgate" },
        );
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// Replaces `name` in the folder atomically (write beside it, rename over it), as Kubernetes does.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// The path of `name` in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `leaf` as `<stem>.crt` and `<stem>.key`.
    pub fn write_leaf(&self, stem: &str, leaf: &Leaf) {
        self.write(&format!("{stem}.key"), &leaf.key_pem);
        self.write(&format!("{stem}.crt"), &leaf.cert_pem);
    }
}
