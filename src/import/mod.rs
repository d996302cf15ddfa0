//! Importing other API managers' products, developers, apps and keys into a tollgate catalog.
//!
//! Only [`apigee`] so far: `tollgate import apigee` reads what Apigee Edge's and Apigee X's management APIs
//! (or apigeecli) export and writes a catalog that `tollgate check` accepts, so partners keep their keys.
//!
//! Design:
//! - **Mapped, not guessed.** Where Apigee's runtimes differ, the semantics are those of Apigee's Envoy
//!   adapter (apigee-remote-service-golib, `product/product.go`, v2.1.x), the Apigee runtime that, like
//!   tollgate, sits behind Envoy. Where a catalog cannot say what Apigee says, the import narrows (never
//!   widens) and reports it: a key never gets a product, path or method Apigee would not give it.
//! - **Secrets stay secret.** Consumer keys only ever become `sha256:` hashes
//!   ([`crate::identity::api_key::KeyHash`]); keys and consumer secrets are never written, printed or put
//!   in an error (serde's quoted values are redacted, credentials are named by position).
//! - **A report, not a failure.** Anything not mapped is one stderr line naming its entity
//!   (`warning: product p: …`), and the import still exits 0; only unreadable input (bad JSON with its
//!   `file:line:column`, a listing of the wrong kind) fails it.
//! - **Deterministic.** The same input gives the same bytes: products and developers sorted by name, apps
//!   by name, keys by hash, attributes by name; no clock, no randomness, no hash-map order.
//!
//! Choices worth knowing:
//! - Base paths. Apigee resources are relative to a proxy's base path, which the exports do not hold (it is
//!   in the proxy bundle). `--base-path api=/base` prefixes it; without it a resource is the request path,
//!   as the Envoy adapter matches it, and stderr says so once per API. Apigee's `/` is the base path and all
//!   below it, so under a base path it becomes `base` and `base/**`.
//! - Quotas. An operationConfig without a quota charges the product quota (one counter per product and
//!   app); one with a quota has its own counter for all its operations. Its operations with different
//!   method sets become several catalog operations with the same `quota` and `quota_group`. The Envoy
//!   adapter charges every product and operationConfig that matches a request; tollgate charges the first
//!   (CONTRACT §3): overlapping operationConfigs of one API are reported.
//! - Per-credential products. A catalog keeps product statuses per app: an app whose credentials differ in
//!   products is split into one catalog app per set, `name#1`, `name#2`… (sorted by their products).
//!   Apigee counts quotas per app; split pieces count on their own, and the report names the products
//!   concerned.
//! - Company apps. A catalog has no companies of their own: an Edge company that owns apps becomes a
//!   catalog developer whose email is the company's name and whose company is the company, so its apps'
//!   keys keep working and metering sees the company; an X app group is treated the same. An inactive
//!   developer or company turns its apps revoked, as Apigee refuses their keys.
//! - Names. Apigee app names are unique per owner, catalog names in the whole catalog: a name two owners
//!   share becomes `<owner email or company>+<name>` for each of them. The characters added (`~`, `+`) are
//!   among those of names that travel in URLs and headers, and Apigee app names hold neither.
//! - Environments. A product bound to no environment is granted nowhere by the Envoy adapter, while a
//!   catalog reads an empty list as every environment: such products are left out (reported).
//!   `--environment` keeps the products of one Apigee environment, `--environment-map` renames them.
//! - Not mapped, always reported: rate plans and monetization attributes (`MINT_*`, `*monetization*`),
//!   GraphQL and gRPC operation groups, `quotaCounterScope`, credential and app scopes, mid-segment
//!   wildcards (`/fore*`), unknown quota units, the adapter's own `remote-service` proxy, products listing
//!   no proxy (Edge grants them every proxy). Proxy bundles (flows, policies) are not read at all.

pub mod apigee;
