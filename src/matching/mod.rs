//! Which product and operation cover a request: the API, the method and the path against an app's products.

pub mod path;

use crate::catalog::{Operation, Product, ProductId, Subscription, SubscriptionStatus};
use path::SafePath;

/// What a request asks for, as matching sees it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'r> {
    /// The API id (route context extension, else the `:authority` host).
    pub api: &'r str,
    /// The HTTP method, uppercase.
    pub method: &'r str,
    /// The checked, decoded path.
    pub path: &'r SafePath<'r>,
}

/// The result of matching a request against an app's products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// The first approved product offered in this environment that covers the request.
    Covered {
        /// The winning product.
        product: ProductId,
        /// Index of the first matching operation in that product.
        operation: usize,
    },
    /// No approved product covers the request, but a product that is not approved for the app would.
    NotApproved {
        /// That product.
        product: ProductId,
        /// Its subscription state.
        status: SubscriptionStatus,
    },
    /// A product would cover the request, but the caller's token has none of the product's scopes.
    MissingScope {
        /// That product.
        product: ProductId,
    },
    /// No approved product offered here covers it, but one offered in another environment would.
    NotOffered {
        /// That product.
        product: ProductId,
    },
    /// Nothing the app subscribes to covers the request.
    Uncovered,
}

/// Tries the subscriptions in order; the first approved one offered in `environment`, allowed by the caller's
/// `scopes` (JWT callers; `None` for API keys, which are not scope-checked) and with a matching operation wins
/// (CONTRACT §3). Refusals name the most useful reason for the 403 message: an unapproved subscription first,
/// then a missing scope, then another environment.
pub fn select(
    products: &[Product],
    subscriptions: &[Subscription],
    scopes: Option<&[String]>,
    environment: Option<&str>,
    target: &Target<'_>,
) -> Match {
    let mut fallback = Match::Uncovered;
    let mut refuse = |refusal: Match| {
        if rank(refusal) > rank(fallback) {
            fallback = refusal;
        }
    };
    for sub in subscriptions {
        let Some(product) = products.get(sub.product) else {
            continue;
        };
        let Some(operation) = product.operations.iter().position(|op| covers(op, target)) else {
            continue;
        };
        if !product.offered_in(environment) {
            refuse(Match::NotOffered {
                product: sub.product,
            });
            continue;
        }
        if let Some(scopes) = scopes
            && !product.scopes.is_empty()
            && !product.scopes.iter().any(|s| scopes.contains(s))
        {
            refuse(Match::MissingScope {
                product: sub.product,
            });
            continue;
        }
        if sub.status != SubscriptionStatus::Approved {
            refuse(Match::NotApproved {
                product: sub.product,
                status: sub.status,
            });
            continue;
        }
        return Match::Covered {
            product: sub.product,
            operation,
        };
    }
    fallback
}

/// Which refusal the 403 names when several products would cover the request; the first of the highest rank
/// wins. "No subscription" to a product sold through Stripe says least: every app is offered every such
/// product, so any refusal of the app's own products is what the caller can act on.
fn rank(refusal: Match) -> u8 {
    match refusal {
        Match::Uncovered | Match::Covered { .. } => 0,
        Match::NotApproved {
            status: SubscriptionStatus::Unsubscribed,
            ..
        } => 1,
        Match::NotOffered { .. } => 2,
        Match::MissingScope { .. } => 3,
        Match::NotApproved { .. } => 4,
    }
}

/// Whether an operation covers the API, method and path.
pub fn covers(op: &Operation, target: &Target<'_>) -> bool {
    op.api == target.api
        && (op.methods.is_empty() || op.methods.iter().any(|m| m == target.method))
        && op.paths.iter().any(|p| p.matches(target.path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::parse;
    use crate::source::Source;

    const CATALOG: &str = "\
products:
  - name: free
    environments: [prod]
    operations: [{api: weather, paths: [/forecast], methods: [GET]}]
  - name: gold
    scopes: [read, admin]
    operations:
      - {api: weather, paths: [/forecast/**, /forecast]}
      - {api: weather, name: admin, paths: [/admin/*], methods: [POST]}
  - name: staging
    environments: [staging]
    operations: [{api: weather, paths: [/beta]}]
  - name: secret
    operations: [{api: weather, paths: [/secret]}]
developers:
  - email: d@x
    apps:
      - name: app
        products: [{name: free}, {name: gold}, {name: staging}, {name: secret, status: pending}]
";

    fn run(method: &str, path: &str, api: &str, env: Option<&str>) -> Match {
        run_scoped(method, path, api, env, None)
    }

    fn run_scoped(
        method: &str,
        path: &str,
        api: &str,
        env: Option<&str>,
        scopes: Option<&[String]>,
    ) -> Match {
        let catalog = parse(&Source::from_text("c.yaml", CATALOG.to_owned())).unwrap();
        let path = path::sanitize(path).unwrap();
        let target = Target {
            api,
            method,
            path: &path,
        };
        select(
            catalog.products(),
            &catalog.app(0).unwrap().products,
            scopes,
            env,
            &target,
        )
    }

    #[test]
    fn the_first_approved_product_in_order_wins() {
        assert_eq!(
            run("GET", "/forecast", "weather", Some("prod")),
            Match::Covered {
                product: 0,
                operation: 0
            }
        );
        // Same request in another environment: `free` is not offered, `gold` (everywhere) wins.
        assert_eq!(
            run("GET", "/forecast", "weather", Some("test")),
            Match::Covered {
                product: 1,
                operation: 0
            }
        );
        // A method `free` does not allow falls through to `gold`.
        assert_eq!(
            run("PUT", "/forecast", "weather", Some("prod")),
            Match::Covered {
                product: 1,
                operation: 0
            }
        );
        assert_eq!(
            run("POST", "/admin/users", "weather", None),
            Match::Covered {
                product: 1,
                operation: 1
            }
        );
    }

    #[test]
    fn token_callers_need_one_of_the_product_scopes() {
        let read = vec!["read".to_owned()];
        let other = vec!["write".to_owned()];
        assert_eq!(
            run_scoped("PUT", "/forecast", "weather", None, Some(&read)),
            Match::Covered {
                product: 1,
                operation: 0
            }
        );
        assert_eq!(
            run_scoped("PUT", "/forecast", "weather", None, Some(&other)),
            Match::MissingScope { product: 1 }
        );
        assert_eq!(
            run_scoped("PUT", "/forecast", "weather", None, Some(&[])),
            Match::MissingScope { product: 1 }
        );
        // Products without scopes take any token.
        assert_eq!(
            run_scoped("GET", "/forecast", "weather", Some("prod"), Some(&other)),
            Match::Covered {
                product: 0,
                operation: 0
            }
        );
    }

    #[test]
    fn refusals_say_why() {
        assert_eq!(
            run("GET", "/admin/users", "weather", None),
            Match::Uncovered
        );
        assert_eq!(run("GET", "/forecast", "other", None), Match::Uncovered);
        assert_eq!(
            run("GET", "/beta", "weather", Some("prod")),
            Match::NotOffered { product: 2 }
        );
        assert_eq!(
            run("GET", "/beta", "weather", None),
            Match::NotOffered { product: 2 }
        );
        assert_eq!(
            run("GET", "/beta", "weather", Some("staging")),
            Match::Covered {
                product: 2,
                operation: 0
            }
        );
        assert_eq!(
            run("GET", "/secret", "weather", None),
            Match::NotApproved {
                product: 3,
                status: SubscriptionStatus::Pending
            }
        );
    }
}
