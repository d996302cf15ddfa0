//! What an import could not map, or mapped in a way worth knowing: one line each, naming its entity.

use std::collections::HashSet;
use std::fmt;

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// Mapped, but differently than one might assume (a rename, a split, a base path assumption).
    Note,
    /// Not mapped: something Apigee has is missing from the catalog, or was narrowed.
    Warning,
}

/// One report line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Finding {
    /// Note or warning.
    pub level: Level,
    /// The Apigee entity it came from, like `product weather_free` or `app weatherapp (developer a@x)`.
    pub entity: String,
    /// What happened, one sentence without a final period. Never holds a key or a secret.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Note => "note",
            Level::Warning => "warning",
        };
        write!(f, "{level}: {}: {}", self.entity, self.message)
    }
}

/// The findings of one import, in the order they were made (deterministic for one input).
#[derive(Debug, Default, Clone)]
pub struct Report {
    findings: Vec<Finding>,
    /// The findings again, to say each fact once without a quadratic scan on large exports.
    seen: HashSet<Finding>,
}

impl Report {
    /// Records something mapped in a way worth knowing.
    pub fn note(&mut self, entity: impl Into<String>, message: impl Into<String>) {
        self.push(Level::Note, entity.into(), message.into());
    }

    /// Records something that could not be mapped.
    pub fn warn(&mut self, entity: impl Into<String>, message: impl Into<String>) {
        self.push(Level::Warning, entity.into(), message.into());
    }

    fn push(&mut self, level: Level, entity: String, message: String) {
        let finding = Finding {
            level,
            entity,
            message,
        };
        // The same fact found twice (a product named by many credentials of one app) is said once.
        if self.seen.insert(finding.clone()) {
            self.findings.push(finding);
        }
    }

    /// Every finding, in order.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// How many findings have this level.
    pub fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            writeln!(f, "{finding}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_level_and_entity_and_repeat_facts_once() {
        let mut r = Report::default();
        r.warn(
            "product p",
            "quota time unit \"fortnight\" is not supported",
        );
        r.note("app a (developer d@x)", "renamed to d@x/a");
        r.warn(
            "product p",
            "quota time unit \"fortnight\" is not supported",
        );
        assert_eq!(
            r.to_string(),
            "warning: product p: quota time unit \"fortnight\" is not supported\n\
             note: app a (developer d@x): renamed to d@x/a\n"
        );
        assert_eq!((r.count(Level::Warning), r.count(Level::Note)), (1, 1));
    }
}
