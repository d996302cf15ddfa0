//! The request a Check decides, as plain values: the adapter fills it from Envoy's CheckRequest.

use std::collections::HashMap;

/// A request as Envoy describes it, with no protobuf in sight. No `Debug`: its headers carry credentials.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// HTTP method, uppercase.
    pub method: &'a str,
    /// `:path`, including the query string.
    pub path: &'a str,
    /// `:authority` (host, maybe with a port).
    pub authority: &'a str,
    /// Request headers, lowercase names.
    pub headers: &'a dyn Pairs,
    /// The route's ext_authz context extensions.
    pub context_extensions: &'a dyn Pairs,
}

/// Names and values read by name: a request's headers or a route's context extensions.
///
/// A trait, not a map type, so the adapter lends the core the pairs it decoded as they are (Envoy's maps
/// arrive as lists of entries; hashing them into a map cost about 9 % of a direct Check) while tests and other
/// callers pass a `HashMap`. `Sync` because a `Request` is held across the Check's awaits, in a future that
/// must be `Send`.
pub trait Pairs: Sync {
    /// The value of `name`, compared exactly (header names arrive lowercase; context-extension names are the
    /// operator's); with a name given twice, the last one, as a map decoded from the same entries would keep.
    fn get(&self, name: &str) -> Option<&str>;

    /// Calls `f` with every name and value, in no particular order.
    fn for_each(&self, f: &mut dyn FnMut(&str, &str));

    /// Whether `name` is present.
    fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

impl Pairs for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        HashMap::get(self, name).map(String::as_str)
    }

    fn for_each(&self, f: &mut dyn FnMut(&str, &str)) {
        for (name, value) in self {
            f(name, value);
        }
    }
}

impl Pairs for Vec<(&str, &str)> {
    fn get(&self, name: &str) -> Option<&str> {
        self.iter().rev().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    fn for_each(&self, f: &mut dyn FnMut(&str, &str)) {
        for (name, value) in self {
            f(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_reads_like_the_map_decoded_from_it() {
        let list = vec![("a", "1"), ("b", "2"), ("a", "3")];
        let map: HashMap<String, String> = list
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        for name in ["a", "b", "c"] {
            assert_eq!(Pairs::get(&list, name), Pairs::get(&map, name), "{name}");
        }
        assert!(list.contains("b"));
        assert!(!list.contains("c"));
        let mut seen = Vec::new();
        list.for_each(&mut |n, v| seen.push(format!("{n}={v}")));
        assert_eq!(seen, ["a=1", "b=2", "a=3"]);
    }
}
