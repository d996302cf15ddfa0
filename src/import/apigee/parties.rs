//! Developers, companies and apps → catalog developers, their apps and keys.
//!
//! Apigee keeps a product's status per credential; a catalog keeps it per app. An app whose credentials all
//! carry the same products keeps its name; otherwise it is split in one catalog app per set of products, so
//! each key gets exactly what Apigee gives it. App names are unique per owner in Apigee but in the whole
//! catalog: a name two owners share becomes `<owner>+<name>`. Generated parts use only characters of names
//! that travel in metadata, headers and URLs (`~`, `+`). Every rename and split is reported.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, SecondsFormat};
use serde_json::Value;

use super::model::{App, Attribute, Company, Credential, Developer};
use super::output::{self, Key, Subscription};
use super::products::{Products, is_monetization};
use super::report::Report;
use crate::identity::api_key::KeyHash;

/// Developer fields that only describe the person or record changes.
const DEVELOPER_BOOKKEEPING: &[&str] = &[
    "firstName",
    "lastName",
    "userName",
    "organizationName",
    "createdAt",
    "createdBy",
    "lastModifiedAt",
    "lastModifiedBy",
    "apps",
    "appFamily",
    "accessType",
];
/// Company fields that only describe it or record changes.
const COMPANY_BOOKKEEPING: &[&str] = &[
    "displayName",
    "organization",
    "createdAt",
    "createdBy",
    "lastModifiedAt",
    "lastModifiedBy",
    "apps",
];
/// App fields without a meaning for access (the products are per credential).
const APP_BOOKKEEPING: &[&str] = &[
    "appId",
    "createdAt",
    "createdBy",
    "lastModifiedAt",
    "lastModifiedBy",
    "callbackUrl",
    "appFamily",
    "keyExpiresIn",
    "displayName",
    "description",
    "accessType",
    "apiProducts",
];
/// Credential fields without a meaning for access.
const CREDENTIAL_BOOKKEEPING: &[&str] = &["issuedAt"];

/// Which input files were given (a missing one changes what a report line says).
#[derive(Debug, Clone, Copy, Default)]
pub struct Given {
    /// `--developers`.
    pub developers: bool,
    /// `--companies`.
    pub companies: bool,
}

/// The catalog's developers, with counts for the summary.
#[derive(Debug, Default)]
pub struct Parties {
    /// Developers (and app-owning companies and app groups), by email.
    pub developers: Vec<output::Developer>,
    /// Catalog apps written.
    pub apps: usize,
    /// Keys written.
    pub keys: usize,
}

/// Who owns apps: a developer, or a company or app group standing in as one.
struct Owner {
    email: String,
    company: Option<String>,
    /// `developer a@x`, `company acme`, `app group g`.
    label: String,
    /// Why its apps are refused, when they are (an inactive developer or company).
    inactive: Option<String>,
    /// Listed as a developer (kept without apps) rather than created for a company's apps.
    listed: bool,
}

/// One catalog app before names are final.
struct Draft {
    owner: usize,
    /// The Apigee app's name, plus `~n` when it was split.
    base: String,
    entity: String,
    status: &'static str,
    products: Vec<Subscription>,
    keys: Vec<Key>,
}

/// Converts developers, companies and apps; products come from the product conversion.
pub fn convert(
    developers: Vec<Developer>,
    companies: Vec<Company>,
    apps: Vec<App>,
    products: &Products,
    given: Given,
    report: &mut Report,
) -> Parties {
    let mut b = Builder {
        report,
        products,
        given,
        owners: Vec::new(),
        by_id: HashMap::new(),
        by_email: HashMap::new(),
        by_org: HashMap::new(),
        companies: HashMap::new(),
        hashes: HashSet::new(),
        app_names: HashSet::new(),
        drafts: Vec::new(),
    };
    for d in developers {
        b.developer(d);
    }
    for c in companies {
        b.company(c);
    }
    for a in apps {
        b.app(a);
    }
    b.finish()
}

struct Builder<'a> {
    report: &'a mut Report,
    products: &'a Products,
    given: Given,
    owners: Vec<Owner>,
    by_id: HashMap<String, usize>,
    /// Lower-cased emails, so `A@x` and `a@x` are one developer (Apigee compares them so).
    by_email: HashMap<String, usize>,
    /// Company and app group owners, by (`company` | `app group`, name).
    by_org: HashMap<(&'static str, String), usize>,
    /// Company name → why it is inactive (None: active).
    companies: HashMap<String, Option<String>>,
    hashes: HashSet<String>,
    /// (owner, app name): Apigee keeps app names unique per owner.
    app_names: HashSet<(usize, String)>,
    drafts: Vec<Draft>,
}

impl Builder<'_> {
    fn developer(&mut self, d: Developer) {
        let email = d.email.trim().to_owned();
        if email.is_empty() {
            self.report.warn(
                "developer (no email)",
                "a developer without an email: not imported",
            );
            return;
        }
        let entity = format!("developer {email}");
        if self.by_email.contains_key(&email.to_lowercase()) {
            self.report.warn(
                entity,
                "listed twice in the developers file: the first one is imported",
            );
            return;
        }
        let inactive = inactive(&entity, d.status.as_deref(), "developer", self.report);
        let mut companies: Vec<&str> = Vec::new();
        for c in d
            .company_name
            .iter()
            .chain(d.companies.iter())
            .map(|c| c.trim())
            .filter(|c| !c.is_empty())
        {
            if !companies.contains(&c) {
                companies.push(c);
            }
        }
        if companies.len() > 1 {
            self.report.note(
                &entity,
                format!(
                    "belongs to companies {}: a catalog developer has one company: {}",
                    companies.join(", "),
                    companies[0]
                ),
            );
        }
        monetization_attributes(&entity, &d.attributes, self.report);
        other_fields(&entity, &d.other, DEVELOPER_BOOKKEEPING, self.report);
        let index = self.owners.len();
        self.owners.push(Owner {
            email: email.clone(),
            company: companies.first().map(|c| (*c).to_owned()),
            label: entity,
            inactive,
            listed: true,
        });
        self.by_email.insert(email.to_lowercase(), index);
        if let Some(id) = d.developer_id.map(|i| i.trim().to_owned())
            && !id.is_empty()
        {
            self.by_id.insert(id, index);
        }
    }

    fn company(&mut self, c: Company) {
        let name = c.name.trim().to_owned();
        if name.is_empty() {
            self.report.warn(
                "company (no name)",
                "a company without a name: not imported",
            );
            return;
        }
        let entity = format!("company {name}");
        if self.companies.contains_key(&name) {
            self.report.warn(
                entity,
                "listed twice in the companies file: the first one is imported",
            );
            return;
        }
        let inactive = inactive(&entity, c.status.as_deref(), "company", self.report);
        monetization_attributes(&entity, &c.attributes, self.report);
        other_fields(&entity, &c.other, COMPANY_BOOKKEEPING, self.report);
        self.companies.insert(name, inactive);
    }

    /// The owner of an app, or why there is none (reported by the caller).
    fn owner(&mut self, app: &App) -> Result<usize, String> {
        let id = app.developer_id.as_deref().map(str::trim).unwrap_or("");
        let email = app.developer_email.as_deref().map(str::trim).unwrap_or("");
        if !id.is_empty() || !email.is_empty() {
            if let Some(&i) = self.by_id.get(id) {
                return Ok(i);
            }
            if let Some(&i) = self.by_email.get(&email.to_lowercase()) {
                return Ok(i);
            }
            let who = if id.is_empty() {
                format!("developer {email}")
            } else {
                format!("developer id {id}")
            };
            return Err(if self.given.developers {
                format!("its {who} is not in the developers file")
            } else {
                format!("its {who} is unknown: no --developers file was given")
            });
        }
        let company = app.company_name.as_deref().map(str::trim).unwrap_or("");
        let group = app.app_group.as_deref().map(str::trim).unwrap_or("");
        let (kind, name) = if !company.is_empty() {
            ("company", company)
        } else if !group.is_empty() {
            ("app group", group)
        } else {
            return Err("it names no developer, company or app group".into());
        };
        if let Some(&i) = self.by_org.get(&(kind, name.to_owned())) {
            return Ok(i);
        }
        if self.by_email.contains_key(&name.to_lowercase()) {
            return Err(format!(
                "its {kind} {name} has the email of a developer, and companies stand in the catalog as developers named by the company"
            ));
        }
        let label = format!("{kind} {name}");
        let inactive = if kind == "company" {
            match self.companies.get(name) {
                Some(state) => state.clone(),
                None => {
                    self.report.note(
                        &label,
                        if self.given.companies {
                            "not in the companies file, so its status is unknown: its apps are imported as if it were active"
                        } else {
                            "no --companies file was given, so its status is unknown: its apps are imported as if it were active"
                        },
                    );
                    None
                }
            }
        } else {
            self.report.note(
                &label,
                "the status of app groups is not read: its apps are imported as if it were active",
            );
            None
        };
        let index = self.owners.len();
        self.owners.push(Owner {
            email: name.to_owned(),
            company: Some(name.to_owned()),
            label,
            inactive,
            listed: false,
        });
        self.by_org.insert((kind, name.to_owned()), index);
        self.by_email.insert(name.to_lowercase(), index);
        Ok(index)
    }

    fn app(&mut self, app: App) {
        let name = app.name.trim().to_owned();
        if name.is_empty() {
            self.report
                .warn("app (no name)", "an app without a name: not imported");
            return;
        }
        let owner = match self.owner(&app) {
            Ok(o) => o,
            Err(why) => {
                self.report
                    .warn(format!("app {name}"), format!("{why}: not imported"));
                return;
            }
        };
        let entity = format!("app {name} ({})", self.owners[owner].label);
        if !self.app_names.insert((owner, name.clone())) {
            self.report.warn(
                entity,
                "listed twice for its owner: the first one is imported",
            );
            return;
        }
        let mut status = match app.status.as_deref().map(str::trim) {
            None | Some("") => "approved",
            Some(s) if s.eq_ignore_ascii_case("approved") => "approved",
            Some(s) if s.eq_ignore_ascii_case("revoked") => "revoked",
            Some(other) => {
                self.report.warn(
                    &entity,
                    format!("status {other:?} is neither approved nor revoked: imported revoked"),
                );
                "revoked"
            }
        };
        if let Some(why) = &self.owners[owner].inactive
            && status == "approved"
        {
            self.report.note(
                &entity,
                format!("{why}, so Apigee refuses its keys: imported revoked"),
            );
            status = "revoked";
        }
        if app.scopes.iter().any(|s| !s.trim().is_empty()) {
            self.report.note(
                &entity,
                "its scopes are not mapped: API-key callers are not checked for scopes, and JWT callers get the products' scopes",
            );
        }
        monetization_attributes(&entity, &app.attributes, self.report);
        other_fields(&entity, &app.other, APP_BOOKKEEPING, self.report);

        let mut pieces: BTreeMap<Vec<Subscription>, Vec<Key>> = BTreeMap::new();
        for (c, cred) in app.credentials.iter().enumerate() {
            if let Some((products, key)) = self.credential(&entity, c + 1, cred) {
                pieces.entry(products).or_default().push(key);
            }
        }
        if pieces.is_empty() {
            pieces.insert(Vec::new(), Vec::new());
        }
        let total = pieces.len();
        if total > 1 {
            self.report_split(&entity, &name, &pieces);
        }
        for (n, (products, mut keys)) in pieces.into_iter().enumerate() {
            keys.sort();
            self.drafts.push(Draft {
                owner,
                base: if total > 1 {
                    format!("{name}~{}", n + 1)
                } else {
                    name.clone()
                },
                entity: entity.clone(),
                status,
                products,
                keys,
            });
        }
    }

    fn report_split(
        &mut self,
        entity: &str,
        name: &str,
        pieces: &BTreeMap<Vec<Subscription>, Vec<Key>>,
    ) {
        let described: Vec<String> = pieces
            .keys()
            .enumerate()
            .map(|(n, products)| {
                let list = if products.is_empty() {
                    "no products".to_owned()
                } else {
                    products
                        .iter()
                        .map(|s| format!("{} {}", s.name, s.status))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                format!("{name}~{} ({list})", n + 1)
            })
            .collect();
        let mut shared: BTreeSet<&str> = BTreeSet::new();
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        for s in pieces.keys().flatten().filter(|s| s.status == "approved") {
            if !seen.insert(&s.name) {
                shared.insert(&s.name);
            }
        }
        let mut message = format!(
            "its credentials hold different products, so it is split in {} apps that give each key exactly its own products: {}",
            pieces.len(),
            described.join("; ")
        );
        if !shared.is_empty() {
            message.push_str(&format!(
                "; Apigee counts a product's quota per app, the pieces count {} each on their own",
                shared.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        self.report.note(entity, message);
    }

    /// One credential: its products (sorted) and its key; `None` when it cannot be imported.
    fn credential(
        &mut self,
        app_entity: &str,
        number: usize,
        cred: &Credential,
    ) -> Option<(Vec<Subscription>, Key)> {
        // Credentials are named by position: the consumer key is a secret.
        let entity = format!("{app_entity}, credential {number}");
        let Some(secret) = cred
            .consumer_key
            .as_ref()
            .filter(|k| !k.expose().is_empty())
        else {
            self.report
                .warn(entity, "it has no consumerKey: not imported");
            return None;
        };
        let hash = KeyHash::of(secret.expose()).to_string();
        if !self.hashes.insert(hash.clone()) {
            self.report.warn(
                entity,
                "its consumer key was already imported for an app above (Apigee keeps consumer keys unique): not imported",
            );
            return None;
        }
        let mut status = match cred.status.as_deref().map(str::trim) {
            None | Some("") => "approved",
            Some(s) if s.eq_ignore_ascii_case("approved") => "approved",
            Some(s) if s.eq_ignore_ascii_case("revoked") => "revoked",
            Some(other) => {
                self.report.warn(
                    &entity,
                    format!("status {other:?} is neither approved nor revoked: imported revoked"),
                );
                "revoked"
            }
        };
        let expires_at = match cred.expires_at.text() {
            None => None,
            Some(text) => match expiry(text) {
                Ok(t) => t,
                Err(()) => {
                    self.report.warn(
                        &entity,
                        format!(
                            "expiresAt {text:?} is not a time in milliseconds: imported revoked"
                        ),
                    );
                    status = "revoked";
                    None
                }
            },
        };
        let mut products: Vec<Subscription> = Vec::new();
        for cp in &cred.api_products {
            let product = cp.apiproduct.trim();
            if product.is_empty() {
                self.report
                    .warn(&entity, "a product without a name is not mapped");
                continue;
            }
            if !self.products.has(product) {
                // Said once per app: every credential of an app usually names the same products.
                let why = match self.products.skipped.get(product) {
                    Some(reason) => format!("product {product} was not imported ({reason})"),
                    None => format!("product {product} is not in the products file"),
                };
                self.report
                    .warn(app_entity, format!("{why}: its keys do not get it"));
                continue;
            }
            let product_status = match cp.status.as_deref().map(str::trim) {
                Some(s) if s.eq_ignore_ascii_case("approved") => "approved",
                Some(s) if s.eq_ignore_ascii_case("pending") => "pending",
                Some(s) if s.eq_ignore_ascii_case("revoked") => "revoked",
                None | Some("") => {
                    // Apigee always writes a status; without one the product is not known to be approved.
                    self.report.warn(
                        &entity,
                        format!("product {product} has no status: imported pending"),
                    );
                    "pending"
                }
                Some(other) => {
                    self.report.warn(
                        &entity,
                        format!(
                            "product {product} has status {other:?}, neither approved, pending nor revoked: imported revoked"
                        ),
                    );
                    "revoked"
                }
            };
            if products.iter().any(|s| s.name == product) {
                self.report.warn(
                    &entity,
                    format!("product {product} is listed twice: the first status is kept"),
                );
                continue;
            }
            products.push(Subscription {
                name: product.to_owned(),
                status: product_status,
            });
        }
        products.sort();
        if cred.scopes.iter().any(|s| !s.trim().is_empty()) {
            self.report.note(
                &entity,
                "its scopes are not mapped: API-key callers are not checked for scopes, and JWT callers get the products' scopes",
            );
        }
        monetization_attributes(&entity, &cred.attributes, self.report);
        other_fields(&entity, &cred.other, CREDENTIAL_BOOKKEEPING, self.report);
        Some((
            products,
            Key {
                hash,
                status,
                expires_at,
            },
        ))
    }

    fn finish(self) -> Parties {
        let Builder {
            report,
            owners,
            drafts,
            ..
        } = self;
        let mut count: HashMap<&str, usize> = HashMap::new();
        for d in &drafts {
            *count.entry(d.base.as_str()).or_default() += 1;
        }
        let mut taken: HashSet<String> = HashSet::new();
        let mut named: Vec<(usize, String, &Draft)> = Vec::new();
        for d in &drafts {
            let mut name = if count.get(d.base.as_str()).copied().unwrap_or(0) > 1 {
                let renamed = format!("{}+{}", owners[d.owner].email, d.base);
                report.note(
                    &d.entity,
                    format!(
                        "renamed {} to {renamed}: another owner has an app of that name, and app names are unique in a catalog",
                        d.base
                    ),
                );
                renamed
            } else {
                d.base.clone()
            };
            if taken.contains(&name) {
                // Only names Apigee itself would refuse (a '+' or '~' in an app name) get here.
                let mut n = 2;
                while taken.contains(&format!("{name}-{n}")) {
                    n += 1;
                }
                let unique = format!("{name}-{n}");
                report.warn(
                    &d.entity,
                    format!("{name} is taken by another app: renamed to {unique}"),
                );
                name = unique;
            }
            taken.insert(name.clone());
            named.push((d.owner, name, d));
        }
        let mut by_owner: Vec<Vec<output::App>> = owners.iter().map(|_| Vec::new()).collect();
        for (owner, name, d) in named {
            by_owner[owner].push(output::App {
                name,
                status: d.status,
                products: d.products.clone(),
                keys: d.keys.clone(),
            });
        }
        let mut apps = 0;
        let mut keys = 0;
        let mut developers: Vec<output::Developer> = Vec::new();
        for (owner, mut owned) in owners.iter().zip(by_owner) {
            if owned.is_empty() && !owner.listed {
                continue;
            }
            owned.sort_by(|a, b| a.name.cmp(&b.name));
            apps += owned.len();
            keys += owned.iter().map(|a| a.keys.len()).sum::<usize>();
            developers.push(output::Developer {
                email: owner.email.clone(),
                company: owner.company.clone(),
                apps: owned,
            });
        }
        developers.sort_by(|a, b| a.email.cmp(&b.email));
        Parties {
            developers,
            apps,
            keys,
        }
    }
}

/// Why an owner's apps are refused: `None` when active.
fn inactive(entity: &str, status: Option<&str>, kind: &str, report: &mut Report) -> Option<String> {
    match status.map(str::trim) {
        None | Some("") => None,
        Some(s) if s.eq_ignore_ascii_case("active") => None,
        Some(s) if s.eq_ignore_ascii_case("inactive") => Some(format!("its {kind} is inactive")),
        Some(other) => {
            report.warn(
                entity,
                format!(
                    "status {other:?} is neither active nor inactive: its apps are imported revoked"
                ),
            );
            Some(format!("its {kind}'s status is {other:?}"))
        }
    }
}

/// Expiry from Apigee's milliseconds: `-1` (or any value not after the epoch) is never.
fn expiry(text: &str) -> Result<Option<String>, ()> {
    let ms = match text.parse::<i64>() {
        Ok(ms) => ms,
        // Some tools write 1.7e12; whole milliseconds only.
        Err(_) => match text.parse::<f64>() {
            Ok(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15 => f as i64,
            _ => return Err(()),
        },
    };
    if ms <= 0 {
        return Ok(None);
    }
    let t = DateTime::from_timestamp_millis(ms).ok_or(())?;
    Ok(Some(t.to_rfc3339_opts(SecondsFormat::Secs, true)))
}

fn monetization_attributes(entity: &str, attributes: &[Attribute], report: &mut Report) {
    for a in attributes {
        let name = a.name.trim();
        if is_monetization(name) {
            report.warn(
                entity,
                format!("attribute {name} (monetization) is not mapped"),
            );
        }
    }
}

/// Reports fields that carry a value and are neither read nor bookkeeping; values are never printed.
fn other_fields(
    entity: &str,
    other: &BTreeMap<String, Value>,
    bookkeeping: &[&str],
    report: &mut Report,
) {
    for (field, value) in other {
        let empty = match value {
            Value::Null => true,
            Value::String(s) => s.trim().is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::Bool(_) | Value::Number(_) => false,
        };
        if empty || bookkeeping.contains(&field.as_str()) {
            continue;
        }
        let lower = field.to_ascii_lowercase();
        if lower.contains("monetization") || lower.contains("rateplan") {
            report.warn(entity, format!("{field} (monetization) is not mapped"));
        } else {
            report.warn(entity, format!("field {field} is not mapped"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::apigee::Settings;
    use crate::import::apigee::products;

    fn products() -> Products {
        let input = serde_json::from_str(
            r#"[{"name": "free", "environments": ["prod"], "proxies": ["a"]},
                {"name": "gold", "environments": ["prod"], "proxies": ["a"]},
                {"name": "nowhere", "proxies": ["a"]}]"#,
        )
        .unwrap();
        products::convert(input, &Settings::default(), &mut Report::default())
    }

    fn run(devs: &str, companies: &str, apps: &str) -> (Parties, Report) {
        let mut report = Report::default();
        let parties = convert(
            serde_json::from_str(devs).unwrap(),
            serde_json::from_str(companies).unwrap(),
            serde_json::from_str(apps).unwrap(),
            &products(),
            Given {
                developers: true,
                companies: true,
            },
            &mut report,
        );
        (parties, report)
    }

    #[test]
    fn keys_are_hashed_statuses_and_expiry_mapped_and_secrets_never_reported() {
        let (p, report) = run(
            r#"[{"email": "a@x.test", "developerId": "d1", "status": "active"}]"#,
            "[]",
            r#"[{"name": "app", "developerId": "d1", "status": "approved", "credentials": [
                 {"consumerKey": "key-one", "consumerSecret": "s1", "expiresAt": "-1", "status": "approved",
                  "apiProducts": [{"apiproduct": "gold", "status": "pending"}, {"apiproduct": "free", "status": "approved"}]},
                 {"consumerKey": "key-two", "consumerSecret": "s2", "expiresAt": 1577836800000, "status": "revoked",
                  "apiProducts": [{"apiproduct": "free", "status": "approved"}, {"apiproduct": "gold", "status": "pending"},
                                  {"apiproduct": "nowhere", "status": "approved"}, {"apiproduct": "ghost", "status": "approved"}]}]}]"#,
        );
        assert_eq!((p.apps, p.keys), (1, 2));
        let app = &p.developers[0].apps[0];
        assert_eq!(app.name, "app");
        assert_eq!(
            app.products,
            vec![
                Subscription {
                    name: "free".into(),
                    status: "approved"
                },
                Subscription {
                    name: "gold".into(),
                    status: "pending"
                }
            ]
        );
        let one = KeyHash::of("key-one").to_string();
        let two = app.keys.iter().find(|k| k.hash != one).unwrap();
        assert_eq!(two.hash, KeyHash::of("key-two").to_string());
        assert_eq!(two.status, "revoked");
        assert_eq!(two.expires_at.as_deref(), Some("2020-01-01T00:00:00Z"));
        let lines = report.to_string();
        assert!(
            lines.contains("warning: app app (developer a@x.test): product nowhere was not imported (it is bound to no environment"),
            "{lines}"
        );
        assert!(
            lines.contains("product ghost is not in the products file: its keys do not get it"),
            "{lines}"
        );
        for secret in ["key-one", "key-two", "s1", "s2"] {
            assert!(!lines.contains(secret), "{lines}");
        }
    }

    #[test]
    fn differing_credentials_split_the_app_and_an_inactive_developer_revokes_its_apps() {
        let (p, report) = run(
            r#"[{"email": "a@x.test", "developerId": "d1"}, {"email": "b@x.test", "developerId": "d2", "status": "inactive",
                 "attributes": [{"name": "MINT_BILLING_TYPE", "value": "PREPAID"}, {"name": "nick", "value": "b"}]}]"#,
            "[]",
            r#"[{"name": "same", "developerId": "d1", "credentials": [
                   {"consumerKey": "k1", "apiProducts": [{"apiproduct": "free", "status": "approved"}]},
                   {"consumerKey": "k2", "apiProducts": [{"apiproduct": "free", "status": "approved"}, {"apiproduct": "gold", "status": "approved"}]}]},
                {"name": "same", "developerId": "d2", "status": "approved", "credentials": [
                   {"consumerKey": "k3", "apiProducts": [{"apiproduct": "free", "status": "approved"}]}]}]"#,
        );
        let names: Vec<&str> = p
            .developers
            .iter()
            .flat_map(|d| d.apps.iter().map(|a| a.name.as_str()))
            .collect();
        assert_eq!(names, vec!["same~1", "same~2", "same"]);
        let a = &p.developers[0].apps;
        assert_eq!(a[0].products.len(), 1);
        assert_eq!(a[0].keys[0].hash, KeyHash::of("k1").to_string());
        assert_eq!(a[1].products.len(), 2);
        assert_eq!(a[1].keys[0].hash, KeyHash::of("k2").to_string());
        // The inactive developer's app is refused.
        assert_eq!(p.developers[1].apps[0].status, "revoked");
        let lines = report.to_string();
        for want in [
            "note: app same (developer a@x.test): its credentials hold different products, so it is split in 2 apps",
            "the pieces count free each on their own",
            "note: app same (developer b@x.test): its developer is inactive, so Apigee refuses its keys: imported revoked",
            "warning: developer b@x.test: attribute MINT_BILLING_TYPE (monetization) is not mapped",
        ] {
            assert!(lines.contains(want), "missing {want:?} in\n{lines}");
        }
        assert!(!lines.contains("nick"), "{lines}");
    }

    #[test]
    fn a_name_two_owners_share_is_qualified_by_owner() {
        let (p, report) = run(
            r#"[{"email": "a@x.test", "developerId": "d1"}, {"email": "b@x.test", "developerId": "d2"}]"#,
            r#"[{"name": "acme", "status": "inactive"}]"#,
            r#"[{"name": "w", "developerId": "d1"}, {"name": "w", "developerId": "d2"},
                {"name": "c", "companyName": "acme", "credentials": [{"consumerKey": "kc", "apiProducts": [{"apiproduct": "free", "status": "approved"}]}]},
                {"name": "orphan", "developerId": "d9"}]"#,
        );
        let all: Vec<(&str, &str)> = p
            .developers
            .iter()
            .flat_map(|d| {
                d.apps
                    .iter()
                    .map(move |a| (d.email.as_str(), a.name.as_str()))
            })
            .collect();
        assert_eq!(
            all,
            vec![
                ("a@x.test", "a@x.test+w"),
                ("acme", "c"),
                ("b@x.test", "b@x.test+w")
            ]
        );
        let acme = &p.developers[1];
        assert_eq!(acme.company.as_deref(), Some("acme"));
        assert_eq!(acme.apps[0].status, "revoked");
        let lines = report.to_string();
        assert!(
            lines.contains("note: app w (developer a@x.test): renamed w to a@x.test+w"),
            "{lines}"
        );
        assert!(
            lines.contains("note: app c (company acme): its company is inactive"),
            "{lines}"
        );
        assert!(
            lines.contains("warning: app orphan: its developer id d9 is not in the developers file: not imported"),
            "{lines}"
        );
    }

    #[test]
    fn company_and_app_group_apps_get_an_owner_of_their_own_and_duplicates_are_said() {
        let mut report = Report::default();
        let p = convert(
            serde_json::from_str(r#"[{"email": "a@x.test", "developerId": "d1"}]"#).unwrap(),
            Vec::new(),
            serde_json::from_str(
                r#"[{"name": "dash", "companyName": "acme"}, {"name": "dash", "companyName": "acme"},
                    {"name": "feed", "appGroup": "partners", "credentials": [{"consumerKey": "kg"}, {"status": "approved"}]},
                    {"name": "dup", "developerId": "d1", "credentials": [{"consumerKey": "kg"}]},
                    {"name": "nobody"}]"#,
            )
            .unwrap(),
            &products(),
            Given::default(),
            &mut report,
        );
        let owners: Vec<(&str, Option<&str>, usize)> = p
            .developers
            .iter()
            .map(|d| (d.email.as_str(), d.company.as_deref(), d.apps.len()))
            .collect();
        assert_eq!(
            owners,
            vec![
                ("a@x.test", None, 1),
                ("acme", Some("acme"), 1),
                ("partners", Some("partners"), 1)
            ]
        );
        // The second credential has no key; the same key in another app is refused there.
        assert_eq!(p.keys, 1);
        let lines = report.to_string();
        for want in [
            "note: company acme: no --companies file was given, so its status is unknown",
            "warning: app dash (company acme): listed twice for its owner: the first one is imported",
            "note: app group partners: the status of app groups is not read",
            "warning: app feed (app group partners), credential 2: it has no consumerKey: not imported",
            "warning: app dup (developer a@x.test), credential 1: its consumer key was already imported for an app above",
            "warning: app nobody: it names no developer, company or app group: not imported",
        ] {
            assert!(lines.contains(want), "missing {want:?} in\n{lines}");
        }
    }

    #[test]
    fn expiry_reads_milliseconds_and_never() {
        assert_eq!(expiry("-1"), Ok(None));
        assert_eq!(
            expiry("1798761600000"),
            Ok(Some("2027-01-01T00:00:00Z".to_owned()))
        );
        assert_eq!(
            expiry("1.7987616e12"),
            Ok(Some("2027-01-01T00:00:00Z".to_owned()))
        );
        assert_eq!(expiry("soon"), Err(()));
    }
}
