//! Reading the input files in every shape Apigee and apigeecli write them, with errors that name the file and
//! the entity and never echo a value (a consumer key may be among them).

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::model::{ApiProduct, App, Company, Developer};
use super::parties::Given;
use super::{ImportError, Options};

/// Which listing a file holds: its wrapper key and how to name it.
#[derive(Debug, Clone, Copy)]
struct Kind {
    /// The key of the management API's listing, like `apiProduct`.
    key: &'static str,
    /// The entity's name in messages.
    noun: &'static str,
    /// The flag that takes such files.
    flag: &'static str,
    /// The field every entity has.
    id_field: &'static str,
}

const PRODUCTS: Kind = Kind {
    key: "apiProduct",
    noun: "product",
    flag: "--products",
    id_field: "name",
};
const DEVELOPERS: Kind = Kind {
    key: "developer",
    noun: "developer",
    flag: "--developers",
    id_field: "email",
};
const APPS: Kind = Kind {
    key: "app",
    noun: "app",
    flag: "--apps",
    id_field: "name",
};
const COMPANIES: Kind = Kind {
    key: "company",
    noun: "company",
    flag: "--companies",
    id_field: "name",
};
const KINDS: [Kind; 4] = [PRODUCTS, DEVELOPERS, APPS, COMPANIES];

/// Everything read from the input files.
#[derive(Debug, Default)]
pub struct Inputs {
    /// API products.
    pub products: Vec<ApiProduct>,
    /// Developers.
    pub developers: Vec<Developer>,
    /// Companies.
    pub companies: Vec<Company>,
    /// Apps.
    pub apps: Vec<App>,
    /// Which of the optional files were given.
    pub given: Given,
}

impl Inputs {
    /// Reads the files the options name.
    pub fn read(options: &Options) -> Result<Inputs, ImportError> {
        Ok(Inputs {
            products: read_listing(&options.products, PRODUCTS)?,
            developers: read_optional(options.developers.as_deref(), DEVELOPERS)?,
            companies: read_optional(options.companies.as_deref(), COMPANIES)?,
            apps: read_optional(options.apps.as_deref(), APPS)?,
            given: Given {
                developers: options.developers.is_some(),
                companies: options.companies.is_some(),
            },
        })
    }
}

fn read_optional<T: DeserializeOwned>(
    path: Option<&Path>,
    kind: Kind,
) -> Result<Vec<T>, ImportError> {
    match path {
        Some(p) => read_listing(p, kind),
        None => Ok(Vec::new()),
    }
}

/// Reads a listing in any of the shapes Apigee and apigeecli write.
fn read_listing<T: DeserializeOwned>(path: &Path, kind: Kind) -> Result<Vec<T>, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|error| ImportError::Read {
        path: path.to_owned(),
        error,
    })?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| ImportError::Json {
        path: path.to_owned(),
        line: e.line(),
        column: e.column(),
        message: without_position(&e.to_string()),
    })?;
    parse_listing(path, doc, kind)
}

/// The entities of a listing: `{"<key>": [...]}`, a bare list, a list of such pages, or one entity.
fn parse_listing<T: DeserializeOwned>(
    path: &Path,
    doc: Value,
    kind: Kind,
) -> Result<Vec<T>, ImportError> {
    let shape = |message: String| ImportError::Shape {
        path: path.to_owned(),
        message,
    };
    let mut entities: Vec<Value> = Vec::new();
    let push_item = |item: Value, entities: &mut Vec<Value>| -> Result<(), ImportError> {
        match item {
            Value::Object(mut map) => {
                if let Some(page) = map.remove(kind.key) {
                    match page {
                        Value::Array(items) => {
                            for entity in items {
                                if !entity.is_object() {
                                    return Err(shape(names_only(kind)));
                                }
                                entities.push(entity);
                            }
                            Ok(())
                        }
                        Value::Null => Ok(()),
                        _ => Err(shape(format!("\"{}\" is not a list", kind.key))),
                    }
                } else if let Some(other) = KINDS
                    .iter()
                    .find(|k| k.key != kind.key && map.contains_key(k.key))
                {
                    Err(shape(format!(
                        "this is a listing of {}s, not of {}s: check {} and {}",
                        other.noun, kind.noun, kind.flag, other.flag
                    )))
                } else if map.contains_key(kind.id_field) {
                    entities.push(Value::Object(map));
                    Ok(())
                } else if map.is_empty() {
                    // The management API answers an empty listing with `{}`.
                    Ok(())
                } else {
                    Err(shape(format!(
                        "neither a \"{}\" listing nor a {} (no \"{}\" field)",
                        kind.key, kind.noun, kind.id_field
                    )))
                }
            }
            Value::String(_) => Err(shape(names_only(kind))),
            _ => Err(shape(format!(
                "expected a \"{}\" listing, a list of {}s or a list of listings",
                kind.key, kind.noun
            ))),
        }
    };
    match doc {
        Value::Array(items) => {
            for item in items {
                push_item(item, &mut entities)?;
            }
        }
        other => push_item(other, &mut entities)?,
    }
    entities
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            let named = value
                .get(kind.id_field)
                .and_then(Value::as_str)
                .map(|n| format!(" ({n:?})"))
                .unwrap_or_default();
            serde_json::from_value(value).map_err(|e| ImportError::Entity {
                path: path.to_owned(),
                entity: format!("{} {}{named}", kind.noun, i + 1),
                message: redact_strings(&e.to_string()),
            })
        })
        .collect()
}

fn names_only(kind: Kind) -> String {
    format!(
        "the {}s are listed by name only: export them with expand=true",
        kind.noun
    )
}

/// serde_json's message without its ` at line L column C` (the error names the position itself).
fn without_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// Replaces the string values serde quotes in type errors (`string "…"`): one might be a key.
fn redact_strings(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("string \"") {
        out.push_str(&rest[..i]);
        out.push_str("a string");
        let after = &rest[i + "string \"".len()..];
        // The quoted text is Debug-escaped: it ends at the first quote not preceded by a backslash.
        let mut end = after.len();
        let mut escaped = false;
        for (j, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = j + 1;
                    break;
                }
                _ => escaped = false,
            }
        }
        rest = &after[end.min(after.len())..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(json: &str, kind: Kind) -> Result<Vec<Value>, String> {
        parse_listing(
            Path::new("f.json"),
            serde_json::from_str(json).unwrap(),
            kind,
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn every_export_shape_reads() {
        let shapes = [
            r#"{"apiProduct": [{"name": "a"}, {"name": "b"}]}"#,
            r#"[{"name": "a"}, {"name": "b"}]"#,
            r#"[{"apiProduct": [{"name": "a"}]}, {"apiProduct": [{"name": "b"}]}]"#,
            r#"[{"apiProduct": [{"name": "a"}], "nextPageToken": "x"}, {"name": "b"}]"#,
        ];
        for shape in shapes {
            let got = listing(shape, PRODUCTS).unwrap();
            assert_eq!(got.len(), 2, "{shape}");
        }
        assert_eq!(listing(r#"{"name": "a"}"#, PRODUCTS).unwrap().len(), 1);
        assert_eq!(listing("{}", PRODUCTS).unwrap().len(), 0);
    }

    #[test]
    fn wrong_files_get_one_clear_sentence() {
        let e = listing(r#"{"developer": [{"email": "a@x"}]}"#, APPS).unwrap_err();
        assert_eq!(
            e,
            "f.json: this is a listing of developers, not of apps: check --apps and --developers"
        );
        let e = listing(r#"{"app": ["one", "two"]}"#, APPS).unwrap_err();
        assert!(
            e.contains("listed by name only: export them with expand=true"),
            "{e}"
        );
        let e = parse_listing::<ApiProduct>(
            Path::new("p.json"),
            serde_json::json!([{"name": "a", "proxies": {"x": 1}}]),
            PRODUCTS,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "p.json: product 1 (\"a\"): expected a list of names");
    }

    #[test]
    fn type_errors_never_echo_string_values() {
        let e = parse_listing::<App>(
            Path::new("a.json"),
            serde_json::json!([{"name": "app", "credentials": "SECRETKEY\"x"}]),
            APPS,
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("SECRETKEY"), "{e}");
        assert!(
            e.starts_with("a.json: app 1 (\"app\"): invalid type: a string"),
            "{e}"
        );
        assert_eq!(
            redact_strings(r#"invalid type: string "a\"b", expected x; string "c""#),
            "invalid type: a string, expected x; a string"
        );
    }

    #[test]
    fn json_syntax_errors_name_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("apps.json");
        std::fs::write(&path, "{\"app\": [\n  {\"name\": \"a\",}\n]}").unwrap();
        let e = read_listing::<App>(&path, APPS).unwrap_err().to_string();
        assert!(
            e.ends_with("apps.json:2:16: trailing comma (the file is not valid JSON)"),
            "{e}"
        );
    }
}
