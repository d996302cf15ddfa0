//! `tollgate import apigee`: Apigee Edge / Apigee X exports → a tollgate catalog, and a report of what
//! could not be mapped.
//!
//! | file | its job |
//! |---|---|
//! | [`model`] | serde types of Apigee's JSON, lenient where Edge and X differ |
//! | [`products`] | API products → catalog products (operations, quotas, attributes) |
//! | [`read`] | the input files in every shape Apigee and apigeecli write them |
//! | [`parties`] | developers, companies and apps → catalog developers, apps and key hashes |
//! | [`output`] | the catalog as written |
//! | [`report`] | the report lines |

pub mod model;
pub mod output;
pub mod parties;
pub mod products;
pub mod read;
pub mod report;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

pub use read::Inputs;
use report::{Level, Report};

/// The command line of `tollgate import apigee`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// API products: the JSON of `apiproducts?expand=true`, or an apigeecli export.
    #[arg(long, value_name = "FILE")]
    pub products: PathBuf,
    /// Developers: the JSON of `developers?expand=true`, or an apigeecli export.
    #[arg(long, value_name = "FILE")]
    pub developers: Option<PathBuf>,
    /// Apps with their credentials: the JSON of `apps?expand=true`, or an apigeecli export.
    #[arg(long, value_name = "FILE")]
    pub apps: Option<PathBuf>,
    /// Edge companies (`companies?expand=true`): the status of company-owned apps' companies.
    #[arg(long, value_name = "FILE")]
    pub companies: Option<PathBuf>,
    /// The base path of a proxy, which Apigee resources are relative to, like `weatherapi=/v1/weather`
    /// (repeatable). Without it an API's resources are request paths, as Apigee's Envoy adapter reads them.
    #[arg(long = "base-path", value_name = "API=PATH", value_parser = parse_pair)]
    pub base_paths: Vec<(String, String)>,
    /// Import only the products bound to this Apigee environment.
    #[arg(long, value_name = "ENV")]
    pub environment: Option<String>,
    /// Rename an Apigee environment in the catalog, like `prod=production` (repeatable).
    #[arg(long = "environment-map", value_name = "APIGEE=TOLLGATE", value_parser = parse_pair)]
    pub environment_map: Vec<(String, String)>,
    /// Write the catalog to this file instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// `NAME=VALUE`, both sides non-empty.
fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => {
            Ok((k.trim().to_owned(), v.trim().to_owned()))
        }
        _ => Err(format!("{text:?} is not NAME=VALUE")),
    }
}

/// The mapping choices the command line makes.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// API → base path (no trailing '/'; empty for `/`).
    pub base_paths: BTreeMap<String, String>,
    /// Only products bound to this Apigee environment.
    pub environment: Option<String>,
    /// Apigee environment → catalog environment.
    pub environment_map: BTreeMap<String, String>,
}

impl Settings {
    /// Checks the options' mapping flags (base paths must be plain paths, each flag once per name).
    pub fn from_options(options: &Options) -> Result<Settings, ImportError> {
        let mut settings = Settings {
            environment: options
                .environment
                .as_ref()
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty()),
            ..Settings::default()
        };
        for (api, path) in &options.base_paths {
            let base = products::normalize_base_path(path)
                .map_err(|e| ImportError::Usage(format!("--base-path {api}: {e}")))?;
            if settings.base_paths.insert(api.clone(), base).is_some() {
                return Err(ImportError::Usage(format!(
                    "--base-path {api} is given twice"
                )));
            }
        }
        for (from, to) in &options.environment_map {
            if settings
                .environment_map
                .insert(from.clone(), to.clone())
                .is_some()
            {
                return Err(ImportError::Usage(format!(
                    "--environment-map {from} is given twice"
                )));
            }
        }
        Ok(settings)
    }
}

/// Why an import failed: unreadable input or a bad flag. Messages never hold a key or a secret.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file could not be read.
    #[error("cannot read {}: {error}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (in the message, not a source: `tollgate: {e:#}` would print it twice).
        error: std::io::Error,
    },
    /// A file is not JSON.
    #[error("{}:{line}:{column}: {message} (the file is not valid JSON)", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// serde_json's description.
        message: String,
    },
    /// A file is JSON but not the listing the flag expects.
    #[error("{}: {message}", .path.display())]
    Shape {
        /// The file.
        path: PathBuf,
        /// What is wrong, and how to export it right.
        message: String,
    },
    /// One entity of a file does not have the shape Apigee gives it.
    #[error("{}: {entity}: {message}", .path.display())]
    Entity {
        /// The file.
        path: PathBuf,
        /// Which entity, like `product 3 ("weather_free")`.
        entity: String,
        /// serde's description, string values redacted.
        message: String,
    },
    /// A command-line value is wrong.
    #[error("{0}")]
    Usage(String),
    /// The catalog could not be serialized.
    #[error("cannot write the catalog as YAML: {0}")]
    Yaml(serde_yaml_ng::Error),
    /// The output could not be written.
    #[error("cannot write {}: {error}", .path.display())]
    Write {
        /// The file (`-` for stdout).
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

/// The catalog an import made, its report and its counts.
#[derive(Debug)]
pub struct Imported {
    /// The catalog.
    pub catalog: output::Catalog,
    /// What could not be mapped, or was mapped in a way worth knowing.
    pub report: Report,
    /// Catalog apps written.
    pub apps: usize,
    /// Keys written.
    pub keys: usize,
}

impl Imported {
    /// The catalog as YAML, with a header saying where it came from; the same input gives the same bytes.
    pub fn to_yaml(&self) -> Result<String, ImportError> {
        let body = serde_yaml_ng::to_string(&self.catalog).map_err(ImportError::Yaml)?;
        Ok(format!(
            "# Imported from Apigee by `tollgate import apigee`; what it could not map was listed on its stderr.\n{body}"
        ))
    }

    /// One line with the counts, for stderr.
    pub fn summary(&self) -> String {
        format!(
            "imported {} products, {} developers, {} apps, {} keys; {} warnings, {} notes",
            self.catalog.products.len(),
            self.catalog.developers.len(),
            self.apps,
            self.keys,
            self.report.count(Level::Warning),
            self.report.count(Level::Note),
        )
    }
}

/// Converts what was read into a catalog (no I/O).
pub fn convert(inputs: Inputs, settings: &Settings) -> Imported {
    let mut report = Report::default();
    let products = products::convert(inputs.products, settings, &mut report);
    let parties = parties::convert(
        inputs.developers,
        inputs.companies,
        inputs.apps,
        &products,
        inputs.given,
        &mut report,
    );
    Imported {
        catalog: output::Catalog {
            products: products.list,
            developers: parties.developers,
        },
        report,
        apps: parties.apps,
        keys: parties.keys,
    }
}

/// The whole command: reads, converts, writes the catalog (to `--output` or stdout) and the report (stderr).
pub fn run(options: &Options) -> Result<(), ImportError> {
    let settings = Settings::from_options(options)?;
    let inputs = Inputs::read(options)?;
    let imported = convert(inputs, &settings);
    let yaml = imported.to_yaml()?;
    match &options.output {
        Some(path) => write_whole(path, yaml.as_bytes())?,
        None => {
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(yaml.as_bytes())
                .and_then(|()| stdout.flush())
            {
                // `tollgate import apigee … | head` is no error.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(ImportError::Write {
                        path: PathBuf::from("-"),
                        error: e,
                    });
                }
                _ => {}
            }
        }
    }
    let mut stderr = std::io::stderr().lock();
    // The report is best effort: a closed stderr must not turn a written catalog into a failure.
    let _ = write!(stderr, "{}", imported.report);
    let _ = writeln!(stderr, "{}", imported.summary());
    Ok(())
}

/// Writes `--output` through a temporary file and a rename: a `tollgate serve` watching that file never
/// reads half a catalog (a cut-off list of keys can still be valid YAML).
fn write_whole(path: &Path, bytes: &[u8]) -> Result<(), ImportError> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Err(ImportError::Usage(format!(
            "--output {} does not name a file",
            path.display()
        )));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    crate::util::durable::replace_file(dir, name, bytes)
        .map_err(|(path, error)| ImportError::Write { path, error })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_inputs(set: &str, reverse: bool) -> Inputs {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/apigee")
            .join(set);
        let companies = dir.join("companies.json");
        let options = Options {
            products: dir.join("products.json"),
            developers: Some(dir.join("developers.json")),
            apps: Some(dir.join("apps.json")),
            companies: companies.exists().then_some(companies),
            base_paths: vec![],
            environment: None,
            environment_map: vec![],
            output: None,
        };
        let mut inputs = Inputs::read(&options).unwrap();
        if reverse {
            inputs.products.reverse();
            inputs.developers.reverse();
            inputs.companies.reverse();
            inputs.apps.reverse();
            for app in &mut inputs.apps {
                app.credentials.reverse();
            }
        }
        inputs
    }

    #[test]
    fn the_catalog_does_not_depend_on_the_order_of_the_export() {
        // apigeecli exports with parallel requests: the same organization comes back in any order.
        let settings = Settings::default();
        for set in ["edge", "x"] {
            let forward = convert(fixture_inputs(set, false), &settings);
            let backward = convert(fixture_inputs(set, true), &settings);
            assert_eq!(
                forward.to_yaml().unwrap(),
                backward.to_yaml().unwrap(),
                "{set}"
            );
            assert_eq!(
                forward.report.findings().len(),
                backward.report.findings().len(),
                "{set}"
            );
        }
    }

    #[test]
    fn base_paths_are_checked_and_given_once() {
        let mut options = Options {
            products: "p.json".into(),
            developers: None,
            apps: None,
            companies: None,
            base_paths: vec![("w".into(), "/v1/".into())],
            environment: None,
            environment_map: vec![],
            output: None,
        };
        assert_eq!(
            Settings::from_options(&options).unwrap().base_paths["w"],
            "/v1"
        );
        options.base_paths.push(("w".into(), "/v2".into()));
        assert!(Settings::from_options(&options).is_err());
        options.base_paths = vec![("w".into(), "v1".into())];
        assert!(
            Settings::from_options(&options)
                .unwrap_err()
                .to_string()
                .contains("must start with '/'")
        );
        assert_eq!(parse_pair("a=b"), Ok(("a".into(), "b".into())));
        assert!(parse_pair("a=").is_err());
    }
}
