//! How tollgate reads its YAML/JSON files (the config and the catalog) so that every error names
//! `file:line:column: message`, with the position in the file as written.
//!
//! Choices worth knowing:
//! - Lines and columns are 1-based; a column counts characters (not bytes), a tab counts as one.
//!   Line breaks are the ones libyaml (behind serde_yaml_ng) knows: `\n`, `\r\n`, `\r`, U+0085,
//!   U+2028 and U+2029, so serde's positions and ours always agree.
//! - `${VAR}` expansion is textual and line by line: a reference must close on its own line, and a
//!   variable whose value holds a line break is refused (it would shift every later line), so the
//!   expanded text has exactly the lines of the original.
//! - A value is inserted as a value, never as YAML text: inside `"…"` it is escaped, inside `'…'` its
//!   quotes are doubled, and as a whole unquoted scalar it is pasted as is only when YAML reads it back
//!   as the same text (numbers and booleans keep their type); otherwise (`null`, `~`, ` #`, `: `, a
//!   leading indicator such as `*` or `[`, …) it is inserted double-quoted, so `TOKEN=null` is the
//!   string "null" and never turns a setting off. Inside a longer unquoted scalar such a value is
//!   refused: quote that scalar in the file. An empty value stays empty (an unset optional setting).
//! - Lines that are comments as a whole (first non-blank character `#`) are not expanded, so a
//!   commented-out `# secret: ${UNSET}` is no error. A trailing comment after a value is expanded,
//!   and so is nothing else special: a `#` line inside a block scalar (`|`) stays unexpanded.
//! - `${VAR:-default}` uses the default when VAR is unset or empty (as the shell does); the
//!   default runs to the first `}`. `$${` is a literal `${`; any other `$` is kept as is. Values
//!   are not expanded again.
//! - Error messages never carry a value that came from the environment: such values are replaced
//!   by `<value of ${VAR}>` wherever a message would echo them (values of the error's own line
//!   whatever their length, values of other lines of 4 characters or more).
//! - `error_at` walks yaml-rust2's marked events. Its markers count lines from 1 but columns from
//!   0, and its index counts characters: positions are computed from that index, so both parsers
//!   share one notion of lines and columns.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use yaml_rust2::Event;
use yaml_rust2::parser::Parser;
use yaml_rust2::scanner::TScalarStyle;

/// A position in a source file, 1-based line and column (in the file as written, before ${VAR} expansion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line number, starting at 1.
    pub line: usize,
    /// Column number in characters, starting at 1.
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One error in a source file, displayed as `file:line:column: message` (or `file: message` when no position).
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {}", .file.display(), PositionSuffix(.position), .message)]
pub struct SourceError {
    /// The file as its path was given.
    pub file: PathBuf,
    /// Where in the file, when known.
    pub position: Option<Position>,
    /// What is wrong; never holds a value that came from the environment.
    pub message: String,
}

/// Renders `:line:column` after the file name, or nothing without a position.
struct PositionSuffix<'a>(&'a Option<Position>);

impl fmt::Display for PositionSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(position) => write!(f, ":{position}"),
            None => Ok(()),
        }
    }
}

/// One step of a path into a YAML document.
#[derive(Debug, Clone, Copy)]
pub enum PathSeg<'a> {
    /// The value under this key of a mapping.
    Key(&'a str),
    /// The item at this 0-based index of a sequence.
    Index(usize),
}

/// A file's text, kept so that semantic errors found after parsing can be located.
pub struct Source {
    path: PathBuf,
    original: String,
    expanded: String,
    /// Every place where expansion changed the text, in order of line then column; a line without
    /// a segment reads the same before and after expansion.
    segments: Vec<Segment>,
}

/// A stretch of one line whose expanded text differs from the original.
struct Segment {
    /// 0-based line, the same in both texts because values never hold line breaks.
    line: usize,
    /// 0-based character column where the stretch starts in the expanded line.
    expanded_start: usize,
    /// Length in characters in the expanded line.
    expanded_len: usize,
    /// 0-based character column of the `$` that starts the reference or escape in the original line.
    original_start: usize,
    /// Length in characters in the original line.
    original_len: usize,
    kind: SegmentKind,
}

enum SegmentKind {
    /// `$${` written as `${`.
    Escape,
    /// A `${NAME}` reference; `secret` holds the value when it came from the environment (a default
    /// is written in the file, so it is no secret).
    Variable {
        name: String,
        secret: Option<String>,
        /// Whether the value was escaped or quoted on insertion, so the text differs from the value.
        escaped: bool,
    },
}

/// What looking a variable up in the environment found.
enum Lookup {
    Set(String),
    Unset,
    NotUnicode,
}

/// Line breaks as libyaml counts them.
const LINE_BREAKS: [char; 5] = ['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'];

/// An environment value from another line than the error's is hidden only from this length on, so
/// that a tiny value (`1`, `on`) does not mangle unrelated parts of a message by coincidence.
const MIN_HIDDEN_LEN_ELSEWHERE: usize = 4;

impl fmt::Debug for Source {
    // Hand-written so that the text, which may hold expanded secrets, never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("path", &self.path)
            .field("len", &self.original.len())
            .finish_non_exhaustive()
    }
}

impl Source {
    /// Reads a file (error: `file: cannot read: <io error>`).
    pub fn read(path: &Path) -> Result<Source, SourceError> {
        let bytes = std::fs::read(path).map_err(|e| SourceError {
            file: path.to_path_buf(),
            position: None,
            message: format!("cannot read: {e}"),
        })?;
        match String::from_utf8(bytes) {
            Ok(text) => Ok(Source::from_text(path, text)),
            Err(e) => {
                let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                // Everything before valid_up_to is UTF-8 by definition; lossy only guards that.
                let before = String::from_utf8_lossy(valid);
                let (line, column) = end_position(&before);
                Err(SourceError {
                    file: path.to_path_buf(),
                    position: Some(Position { line, column }),
                    message: "cannot read: the file is not valid UTF-8".to_string(),
                })
            }
        }
    }

    /// From text (tests, stdin).
    pub fn from_text(path: impl Into<PathBuf>, text: String) -> Source {
        // Editors do not count a byte order mark as a column, so neither do we.
        let original = match text.strip_prefix('\u{feff}') {
            Some(rest) => rest.to_string(),
            None => text,
        };
        Source {
            path: path.into(),
            expanded: original.clone(),
            original,
            segments: Vec::new(),
        }
    }

    /// Expands `${VAR}` and `${VAR:-default}` from the process environment; `$${` is a literal `${`; an unset VAR without default is an error naming it.
    pub fn expand_env(self) -> Result<Source, SourceError> {
        self.expand(&|name: &str| match std::env::var(name) {
            Ok(value) => Lookup::Set(value),
            Err(std::env::VarError::NotPresent) => Lookup::Unset,
            Err(std::env::VarError::NotUnicode(_)) => Lookup::NotUnicode,
        })
    }

    /// Like [`Source::expand_env`], with variables looked up by `lookup` instead of the process environment.
    pub fn expand_with(
        self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Source, SourceError> {
        self.expand(&|name: &str| match lookup(name) {
            Some(value) => Lookup::Set(value),
            None => Lookup::Unset,
        })
    }

    /// Deserializes YAML (JSON is accepted too, since it is YAML) into T, with serde's errors located in the original text.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, SourceError> {
        if holds_no_document(&self.expanded) {
            return Err(SourceError {
                file: self.path.clone(),
                position: None,
                message: "file is empty: it holds no YAML document, only blank lines or comments"
                    .to_string(),
            });
        }
        serde_yaml_ng::from_str(&self.expanded).map_err(|e| self.serde_error(&e))
    }

    /// Builds a SourceError at the value found by `path` from the document root, or at its deepest existing ancestor.
    pub fn error_at(&self, path: &[PathSeg], message: impl Into<String>) -> SourceError {
        let at = Tree::build(&self.expanded)
            .locate(path)
            .map(|char_index| expanded_position_of_char(&self.expanded, char_index));
        let message = self.hide_secrets(message.into(), at.map(|(line, _)| line));
        SourceError {
            file: self.path.clone(),
            position: at.map(|(line, column)| self.original_position(line, column)),
            message,
        }
    }

    /// The text as read (before expansion, without a byte order mark).
    pub fn text(&self) -> &str {
        &self.original
    }

    /// The file's path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn expand(self, lookup: &dyn Fn(&str) -> Lookup) -> Result<Source, SourceError> {
        let mut expanded = String::with_capacity(self.original.len());
        let mut segments = Vec::new();
        for (line, (content, line_break)) in split_lines(&self.original).enumerate() {
            if content.trim_start_matches([' ', '\t']).starts_with('#') {
                expanded.push_str(content);
            } else {
                expand_line(content, line, lookup, &mut expanded, &mut segments).map_err(
                    |(column, message)| SourceError {
                        file: self.path.clone(),
                        position: Some(Position {
                            line: line + 1,
                            column: column + 1,
                        }),
                        message,
                    },
                )?;
            }
            expanded.push_str(line_break);
        }
        Ok(Source {
            path: self.path,
            original: self.original,
            expanded,
            segments,
        })
    }

    fn serde_error(&self, error: &serde_yaml_ng::Error) -> SourceError {
        let at = error
            .location()
            .map(|l| (l.line().saturating_sub(1), l.column().saturating_sub(1)));
        // The message's own marks are relocated as libyaml wrote them; only our prefix is clamped.
        let message = self.relocate_marks(&error.to_string(), at);
        let at = at.map(|at| self.within_text(at));
        let message = self.hide_secrets(message, at.map(|(line, _)| line));
        SourceError {
            file: self.path.clone(),
            position: at.map(|(line, column)| self.original_position(line, column)),
            message,
        }
    }

    /// libyaml places an error at the end of a file that lacks a final line break on the line after the
    /// last one (its scanner forces a line break before the stream end); no editor shows that line, so
    /// such a 0-based expanded position moves back to the end of the last line.
    fn within_text(&self, (line, column): (usize, usize)) -> (usize, usize) {
        let (last_line, end_column) = end_position(&self.expanded);
        if line >= last_line {
            (last_line - 1, end_column - 1)
        } else {
            (line, column)
        }
    }

    /// serde_yaml_ng ends its messages with ` at line L column C` in the expanded text (libyaml's
    /// also name a context position): drop the one our prefix already gives, map the others back.
    fn relocate_marks(&self, message: &str, at: Option<(usize, usize)>) -> String {
        const MARK: &str = " at line ";
        let mut out = String::with_capacity(message.len());
        let mut rest = message;
        while let Some(found) = rest.find(MARK) {
            out.push_str(&rest[..found]);
            let after = &rest[found + MARK.len()..];
            match parse_line_column(after) {
                Some((line, column, used)) if line > 0 && column > 0 => {
                    let here = (line - 1, column - 1);
                    if Some(here) != at {
                        let original = self.original_position(here.0, here.1);
                        out.push_str(" at line ");
                        out.push_str(&original.line.to_string());
                        out.push_str(" column ");
                        out.push_str(&original.column.to_string());
                    }
                    rest = &after[used..];
                }
                _ => {
                    out.push_str(MARK);
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// Replaces every environment value a message would echo by `<value of ${NAME}>`.
    ///
    /// Values of the error's own line are hidden whatever their length; values of other lines
    /// (which reach a message only through multi-line scalars, aliases or keys) from
    /// [`MIN_HIDDEN_LEN_ELSEWHERE`] characters on. In serde's own shapes only the echoed value can
    /// be data (the rest names types, fields and variants), so there only the long values are
    /// looked for outside the quotes, which keeps a value like `a` from mangling `invalid`.
    fn hide_secrets(&self, message: String, line: Option<usize>) -> String {
        let mut near = Vec::new();
        let mut long = Vec::new();
        for segment in &self.segments {
            let SegmentKind::Variable {
                name,
                secret: Some(value),
                escaped,
            } = &segment.kind
            else {
                continue;
            };
            if value.is_empty() {
                continue;
            }
            let is_long = value.chars().count() >= MIN_HIDDEN_LEN_ELSEWHERE;
            // serde quotes strings with Debug, which escapes `"`, `\` and control characters.
            let debug = format!("{value:?}");
            let debug_text = debug[1..debug.len() - 1].to_string(); // invariant: Debug of a str is quoted
            let mut needles = vec![value.clone(), debug_text];
            if *escaped {
                needles.push(yaml_double_quoted_body(value));
            }
            for needle in needles {
                if is_long || Some(segment.line) == line {
                    near.push((needle.clone(), name.as_str()));
                }
                if is_long {
                    long.push((needle, name.as_str()));
                }
            }
        }
        if near.is_empty() {
            return message;
        }
        match echoed_data(&message) {
            Some((start, end)) => {
                let mut out = replace_needles(&message[..start], &mut long);
                out.push_str(&replace_needles(&message[start..end], &mut near));
                out.push_str(&replace_needles(&message[end..], &mut long));
                out
            }
            None => replace_needles(&message, &mut near),
        }
    }

    /// Maps a 0-based position in the expanded text to a 1-based one in the original.
    fn original_position(&self, line: usize, column: usize) -> Position {
        // Where the last segment before `column` ends, in the expanded and the original line.
        let (mut expanded_end, mut original_end) = (0, 0);
        let mut mapped = None;
        for segment in self.segments.iter().filter(|s| s.line == line) {
            if column < segment.expanded_start {
                break;
            }
            if column < segment.expanded_start + segment.expanded_len {
                mapped = Some(match segment.kind {
                    // Inside `${` written as `$${`: the same character, one further right.
                    SegmentKind::Escape => {
                        segment.original_start + 1 + (column - segment.expanded_start)
                    }
                    // Inside an expanded value: the reference that produced it.
                    SegmentKind::Variable { .. } => segment.original_start,
                });
                break;
            }
            expanded_end = segment.expanded_start + segment.expanded_len;
            original_end = segment.original_start + segment.original_len;
        }
        let column = mapped.unwrap_or(column - expanded_end + original_end);
        Position {
            line: line + 1,
            column: column + 1,
        }
    }
}

/// Expands one line (without its break) into `out`; an error is (0-based column, message).
fn expand_line(
    content: &str,
    line: usize,
    lookup: &dyn Fn(&str) -> Lookup,
    out: &mut String,
    segments: &mut Vec<Segment>,
) -> Result<(), (usize, String)> {
    let chars: Vec<char> = content.chars().collect();
    let mut i = 0;
    let mut column = 0;
    let mut context = LineContext::default();
    while i < chars.len() {
        let at = |k: usize| chars.get(i + k).copied();
        if at(0) == Some('$') && at(1) == Some('$') && at(2) == Some('{') {
            out.push_str("${");
            segments.push(Segment {
                line,
                expanded_start: column,
                expanded_len: 2,
                original_start: i,
                original_len: 3,
                kind: SegmentKind::Escape,
            });
            column += 2;
            i += 3;
        } else if at(0) == Some('$') && at(1) == Some('{') {
            let Some(close) = chars[i + 2..].iter().position(|&c| c == '}') else {
                return Err((
                    i,
                    "unterminated `${`: no closing `}` on this line (write `$${` for a literal `${`)"
                        .to_string(),
                ));
            };
            let inner: String = chars[i + 2..i + 2 + close].iter().collect();
            let (name, default) = parse_reference(&inner).map_err(|message| (i, message))?;
            let (value, secret) = match (lookup(name), default) {
                (Lookup::Set(value), Some(default)) if value.is_empty() => {
                    (default.to_string(), false)
                }
                (Lookup::Set(value), _) => (value, true),
                (Lookup::Unset, Some(default)) => (default.to_string(), false),
                (Lookup::Unset, None) => {
                    return Err((
                        i,
                        format!(
                            "environment variable {name} is not set (write ${{{name}:-}} to make it optional)"
                        ),
                    ));
                }
                (Lookup::NotUnicode, _) => {
                    return Err((i, format!("environment variable {name} is not valid UTF-8")));
                }
            };
            if value.contains(LINE_BREAKS) {
                return Err((
                    i,
                    format!(
                        "environment variable {name} holds a line break; multi-line values are not supported"
                    ),
                ));
            }
            let whole = context.scalar_starts_before(&chars, i)
                && scalar_ends_after(&chars, i + close + 3, context.flow_depth);
            let inserted = context
                .insert(&value, whole)
                .map_err(|why| (i, format!("environment variable {name} {why}")))?;
            let escaped = inserted != value;
            let expanded_len = inserted.chars().count();
            out.push_str(&inserted);
            segments.push(Segment {
                line,
                expanded_start: column,
                expanded_len,
                original_start: i,
                original_len: close + 3,
                kind: SegmentKind::Variable {
                    name: name.to_string(),
                    secret: secret.then_some(value),
                    escaped,
                },
            });
            column += expanded_len;
            i += close + 3;
        } else {
            context.step(&chars, i);
            out.push(chars[i]);
            column += 1;
            i += 1;
        }
    }
    Ok(())
}

/// Where a line's scan stands: inside a quoted scalar or not, how deep in flow collections, and whether a
/// comment has begun. Tracks only what decides how a value may be inserted; the YAML parser judges the rest.
#[derive(Debug, Default, Clone, Copy)]
struct LineContext {
    quote: Quote,
    flow_depth: usize,
    comment: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Quote {
    #[default]
    None,
    Double,
    Single,
}

impl LineContext {
    /// Advances past `chars[i]` (a character copied as is).
    fn step(&mut self, chars: &[char], i: usize) {
        let c = chars[i];
        match self.quote {
            _ if self.comment => {}
            Quote::Double => {
                if c == '"' && !escaped_at(chars, i) {
                    self.quote = Quote::None;
                }
            }
            // `''` inside single quotes is one quote: the second `'` reopens what the first closed.
            Quote::Single => {
                if c == '\'' {
                    self.quote = Quote::None;
                }
            }
            Quote::None => match c {
                '"' if self.scalar_starts_before(chars, i) => self.quote = Quote::Double,
                '\'' if self.scalar_starts_before(chars, i) => self.quote = Quote::Single,
                '\'' if i > 0 && chars[i - 1] == '\'' => self.quote = Quote::Single,
                '[' | '{' => self.flow_depth += 1,
                ']' | '}' => self.flow_depth = self.flow_depth.saturating_sub(1),
                '#' if i == 0 || chars[i - 1].is_whitespace() => self.comment = true,
                _ => {}
            },
        }
    }

    /// Whether a scalar would start at `chars[i]`: only blanks since the line start or an indicator that
    /// precedes a value (`: `, `- `, `? `, `[`, `{`, `,`).
    fn scalar_starts_before(&self, chars: &[char], i: usize) -> bool {
        if self.quote != Quote::None {
            return false;
        }
        let before = chars[..i]
            .iter()
            .rev()
            .skip_while(|c| **c == ' ' || **c == '\t');
        let mut before = before.copied();
        match before.next() {
            None => true,
            Some('[' | '{' | ',') => true,
            Some(':' | '-' | '?') => i > 0 && (chars[i - 1] == ' ' || chars[i - 1] == '\t'),
            Some(_) => false,
        }
    }

    /// The text that stands for `value` here; `whole` when the reference is an entire unquoted scalar.
    fn insert(&self, value: &str, whole: bool) -> Result<String, &'static str> {
        if self.comment {
            return Ok(value.to_owned());
        }
        match self.quote {
            Quote::Double => Ok(yaml_double_quoted_body(value)),
            Quote::Single => Ok(value.replace('\'', "''")),
            Quote::None if value.is_empty() || plain_safe(value, self.flow_depth > 0) => {
                Ok(value.to_owned())
            }
            Quote::None if whole => Ok(format!("\"{}\"", yaml_double_quoted_body(value))),
            Quote::None => Err(
                "holds YAML syntax that would change the file where it is inserted: quote the value in the config (\"…${VAR}…\")",
            ),
        }
    }
}

/// Whether the `"` at `chars[i]` is escaped by an odd run of backslashes before it.
fn escaped_at(chars: &[char], i: usize) -> bool {
    chars[..i].iter().rev().take_while(|c| **c == '\\').count() % 2 == 1
}

/// Whether nothing but blanks, a comment, or (in a flow collection) a separator follows `chars[end..]`.
fn scalar_ends_after(chars: &[char], end: usize, flow_depth: usize) -> bool {
    let rest: String = chars[end..].iter().collect();
    let rest = rest.trim_start_matches([' ', '\t']);
    rest.is_empty()
        || (rest.starts_with('#') && end < chars.len() && chars[end].is_whitespace())
        || (flow_depth > 0 && rest.starts_with([',', ']', '}']))
}

/// Whether YAML reads `value`, pasted as an unquoted scalar, back as the same text (or as the number or
/// boolean it spells): no null spelling, no indicator up front, no `: ` or ` #`, no surrounding blanks, no
/// control characters, and in a flow collection none of `,[]{}`.
fn plain_safe(value: &str, in_flow: bool) -> bool {
    if matches!(value, "~" | "null" | "Null" | "NULL") {
        return false;
    }
    let Some(first) = value.chars().next() else {
        return false;
    };
    let second = value.chars().nth(1);
    let indicator = matches!(
        first,
        ',' | '['
            | ']'
            | '{'
            | '}'
            | '#'
            | '&'
            | '*'
            | '!'
            | '|'
            | '>'
            | '\''
            | '"'
            | '%'
            | '@'
            | '`'
    ) || (matches!(first, '-' | '?' | ':')
        && second.is_none_or(|c| c == ' ' || c == '\t'));
    !indicator
        && value.trim() == value
        && !value.contains(": ")
        && !value.contains(" #")
        && !value.contains('\t')
        && !value.ends_with(':')
        && !value.chars().any(char::is_control)
        && !(in_flow && value.contains([',', '[', ']', '{', '}']))
}

/// `value` escaped for the inside of a YAML double-quoted scalar.
fn yaml_double_quoted_body(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// Splits what stands between `${` and `}` into a name and an optional default.
fn parse_reference(inner: &str) -> Result<(&str, Option<&str>), String> {
    let name_end = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    let (name, rest) = inner.split_at(name_end);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        let shown = if name.is_empty() { inner } else { name };
        return Err(format!(
            "invalid variable name `{shown}` in `${{{inner}}}`: a name is ASCII letters, digits and `_`, not starting with a digit"
        ));
    }
    if rest.is_empty() {
        Ok((name, None))
    } else if let Some(default) = rest.strip_prefix(":-") {
        Ok((name, Some(default)))
    } else {
        Err(format!(
            "invalid variable reference `${{{inner}}}`: write ${{{name}}} or ${{{name}:-default}}"
        ))
    }
}

/// Splits text into (line content, line break) pairs, with libyaml's line breaks.
fn split_lines(text: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (content, line_break, next) = match rest.find(LINE_BREAKS) {
            Some(at) => {
                let break_len = if rest[at..].starts_with("\r\n") {
                    2
                } else {
                    rest[at..].chars().next().map_or(1, char::len_utf8)
                };
                (
                    &rest[..at],
                    &rest[at..at + break_len],
                    &rest[at + break_len..],
                )
            }
            None => (rest, "", ""),
        };
        rest = next;
        Some((content, line_break))
    })
}

/// Whether text is only blank lines, comments and document markers.
fn holds_no_document(text: &str) -> bool {
    split_lines(text).all(|(content, _)| {
        let trimmed = content.trim_matches([' ', '\t']);
        let rest = ["---", "..."]
            .iter()
            .find_map(|marker| {
                trimmed
                    .strip_prefix(marker)
                    .filter(|r| r.is_empty() || r.starts_with([' ', '\t']))
            })
            .unwrap_or(trimmed)
            .trim_start_matches([' ', '\t']);
        rest.is_empty() || rest.starts_with('#')
    })
}

/// 1-based line and column of the position just after `text`.
fn end_position(text: &str) -> (usize, usize) {
    let mut line = 1;
    let mut column = 1;
    for (content, line_break) in split_lines(text) {
        if line_break.is_empty() {
            column = content.chars().count() + 1;
        } else {
            line += 1;
            column = 1;
        }
    }
    (line, column)
}

/// 0-based (line, column) of a character index into text.
fn expanded_position_of_char(text: &str, char_index: usize) -> (usize, usize) {
    let mut line_start = 0;
    let mut line = 0;
    for (content, line_break) in split_lines(text) {
        let next = line_start + content.chars().count() + line_break.chars().count();
        if char_index < next {
            break;
        }
        line_start = next;
        line += 1;
    }
    (line, char_index.saturating_sub(line_start))
}

/// Reads `L column C` at the start of `text`: (L, C, bytes used).
fn parse_line_column(text: &str) -> Option<(usize, usize, usize)> {
    let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let line_len = digits(text);
    let line = text[..line_len].parse().ok()?;
    let after = text[line_len..].strip_prefix(" column ")?;
    let column_len = digits(after);
    let column = after[..column_len].parse().ok()?;
    Some((line, column, text.len() - after.len() + column_len))
}

/// The byte range of the data a message shaped like serde's invalid type/value or unknown
/// variant/field errors echoes: between the first quote (`"` or `` ` ``) after the shape's words and
/// the last one before `, expected …`; the whole stretch when it has no quotes. None for other messages.
fn echoed_data(message: &str) -> Option<(usize, usize)> {
    let start = [
        "invalid type: ",
        "invalid value: ",
        "unknown variant ",
        "unknown field ",
    ]
    .iter()
    .filter_map(|shape| message.find(shape).map(|at| at + shape.len()))
    .min()?;
    let end = [", expected ", ", there are no "]
        .iter()
        .filter_map(|tail| message[start..].rfind(tail).map(|at| start + at))
        .max()?;
    let echo = &message[start..end];
    let quoted = echo.find(['"', '`']).and_then(|open| {
        let quote = &echo[open..=open];
        let close = echo.rfind(quote).filter(|&close| close > open)?;
        Some((start + open + 1, start + close))
    });
    Some(quoted.unwrap_or((start, end)))
}

/// Replaces every needle in text by `<value of ${NAME}>`, longest needle first.
fn replace_needles(text: &str, needles: &mut [(String, &str)]) -> String {
    needles.sort_by_key(|(needle, _)| std::cmp::Reverse(needle.len()));
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'outer: while let Some(c) = rest.chars().next() {
        for (needle, name) in needles.iter() {
            if rest.starts_with(needle.as_str()) {
                out.push_str("<value of ${");
                out.push_str(name);
                out.push_str("}>");
                rest = &rest[needle.len()..];
                continue 'outer;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The first YAML document as a tree of nodes that know where they start, built from
/// yaml-rust2's marked events; enough to find a path's position, nothing more.
struct Tree {
    nodes: Vec<Node>,
    root: Option<usize>,
    anchors: HashMap<usize, usize>,
}

struct Node {
    /// Character index in the expanded text where the node starts.
    start: usize,
    kind: NodeKind,
}

enum NodeKind {
    /// A scalar; an implicit null (nothing written) has no position of its own.
    Scalar {
        value: String,
        implicit: bool,
    },
    Sequence(Vec<usize>),
    Mapping(Vec<(usize, usize)>),
    Alias(usize),
}

/// An open collection while building: its node, and for a mapping the key awaiting its value.
struct Open {
    node: usize,
    key: Option<usize>,
}

impl Tree {
    /// Builds the tree of the first document; on a syntax error, keeps what was read before it.
    fn build(text: &str) -> Tree {
        let mut tree = Tree {
            nodes: Vec::new(),
            root: None,
            anchors: HashMap::new(),
        };
        let mut open: Vec<Open> = Vec::new();
        let mut parser = Parser::new_from_str(text);
        while let Ok((event, marker)) = parser.next_token() {
            let start = marker.index();
            let completed = match event {
                Event::StreamEnd | Event::DocumentEnd => break,
                Event::Scalar(value, style, anchor, _) => {
                    let implicit = value.is_empty() && style == TScalarStyle::Plain;
                    Some(tree.push(start, anchor, NodeKind::Scalar { value, implicit }))
                }
                Event::Alias(anchor) => Some(tree.push(start, 0, NodeKind::Alias(anchor))),
                Event::SequenceStart(anchor, _) => {
                    let node = tree.push(start, anchor, NodeKind::Sequence(Vec::new()));
                    open.push(Open { node, key: None });
                    None
                }
                Event::MappingStart(anchor, _) => {
                    let node = tree.push(start, anchor, NodeKind::Mapping(Vec::new()));
                    open.push(Open { node, key: None });
                    None
                }
                Event::SequenceEnd | Event::MappingEnd => open.pop().map(|o| o.node),
                _ => None,
            };
            if let Some(node) = completed {
                tree.attach(&mut open, node);
            }
        }
        // After a syntax error, the collections still open hold what was read: keep them.
        while let Some(o) = open.pop() {
            tree.attach(&mut open, o.node);
        }
        tree
    }

    fn push(&mut self, start: usize, anchor: usize, kind: NodeKind) -> usize {
        self.nodes.push(Node { start, kind });
        let node = self.nodes.len() - 1;
        if anchor != 0 {
            self.anchors.insert(anchor, node);
        }
        node
    }

    /// Hangs a completed node under the innermost open collection, or makes it the root.
    fn attach(&mut self, open: &mut [Open], node: usize) {
        let Some(parent) = open.last_mut() else {
            self.root.get_or_insert(node);
            return;
        };
        let child_start = self.nodes[node].start;
        let parent_node = &mut self.nodes[parent.node];
        // yaml-rust2 marks a block mapping just after its first key (and a block sequence item's
        // mapping likewise): the first child's start is the collection's real start.
        let first_child = match &mut parent_node.kind {
            NodeKind::Sequence(items) => {
                items.push(node);
                items.len() == 1
            }
            NodeKind::Mapping(entries) => match parent.key.take() {
                Some(key) => {
                    entries.push((key, node));
                    false
                }
                None => {
                    parent.key = Some(node);
                    entries.is_empty()
                }
            },
            NodeKind::Scalar { .. } | NodeKind::Alias(_) => false,
        };
        if first_child {
            parent_node.start = parent_node.start.min(child_start);
        }
    }

    /// Follows aliases to the anchored node (bounded, since anchors only point backwards).
    fn resolve(&self, mut node: usize) -> usize {
        for _ in 0..self.nodes.len() {
            match self.nodes[node].kind {
                NodeKind::Alias(anchor) => match self.anchors.get(&anchor) {
                    Some(&target) if target != node => node = target,
                    _ => break,
                },
                _ => break,
            }
        }
        node
    }

    /// The start of the node at `path`, or of its deepest existing ancestor that has a position.
    fn locate(&self, path: &[PathSeg]) -> Option<usize> {
        let mut node = self.root?;
        let mut found = self.position_of(node);
        for seg in path {
            let container = self.resolve(node);
            let next = match (seg, &self.nodes[container].kind) {
                (PathSeg::Key(key), NodeKind::Mapping(entries)) => {
                    entries.iter().find_map(|&(k, v)| {
                        match &self.nodes[self.resolve(k)].kind {
                            NodeKind::Scalar { value, .. } if value == key => {
                                // A key written with no value points at the key itself.
                                Some((v, self.position_of(v).or(self.position_of(k))))
                            }
                            _ => None,
                        }
                    })
                }
                (PathSeg::Index(index), NodeKind::Sequence(items)) => items
                    .get(*index)
                    .map(|&item| (item, self.position_of(item))),
                _ => None,
            };
            let Some((child, position)) = next else {
                break;
            };
            node = child;
            found = position.or(found);
        }
        found
    }

    fn position_of(&self, node: usize) -> Option<usize> {
        match self.nodes[node].kind {
            NodeKind::Scalar { implicit: true, .. } => None,
            _ => Some(self.nodes[node].start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    fn expand(text: &str, vars: &[(&str, &str)]) -> Result<Source, SourceError> {
        Source::from_text("c.yaml", text.to_string()).expand_with(env(vars))
    }

    fn pos(line: usize, column: usize) -> Option<Position> {
        Some(Position { line, column })
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Config {
        #[serde(default)]
        host: String,
        #[serde(default)]
        port: u16,
        #[serde(default)]
        mode: Option<Mode>,
        #[serde(default)]
        tags: Vec<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Auto,
        Manual,
    }

    #[test]
    fn parses_yaml_and_json_into_the_type() {
        let yaml = "host: h\nport: 8080\nmode: manual\ntags: [a, \"b\"]\n";
        let c: Config = Source::from_text("c.yaml", yaml.to_string())
            .parse()
            .unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.mode, c.tags),
            (
                "h",
                8080,
                Some(Mode::Manual),
                vec!["a".to_string(), "b".to_string()]
            )
        );
        let json = "{\n\t\"host\": \"${H}\",\n\t\"port\": ${P:-9001}\n}\n";
        let c: Config = expand(json, &[("H", "example")]).unwrap().parse().unwrap();
        assert_eq!((c.host.as_str(), c.port, c.mode), ("example", 9001, None));
    }

    #[test]
    fn expands_set_unset_default_and_empty_default() {
        let vars = [("A", "alpha"), ("EMPTY", "")];
        let s = expand(
            "a: ${A}\nb: ${B:-bee}\nc: '${C:-}'\nd: ${A:-x}\ne: ${EMPTY:-dflt}\nf: '${EMPTY}'\n",
            &vars,
        )
        .unwrap();
        assert_eq!(
            s.expanded,
            "a: alpha\nb: bee\nc: ''\nd: alpha\ne: dflt\nf: ''\n"
        );
        assert!(s.text().starts_with("a: ${A}\n"), "text() is the original");
        let e = expand("a: 1\nb:  ${MISSING}\n", &vars).unwrap_err();
        assert_eq!(e.position, pos(2, 5));
        assert!(e.message.contains("MISSING is not set"), "{}", e.message);
        assert_eq!(
            e.to_string(),
            format!("c.yaml:2:5: {}", e.message),
            "display is file:line:column: message"
        );
    }

    /// The value YAML reads at `key` after expanding `text` with `vars`.
    fn value_of(text: &str, vars: &[(&str, &str)], key: &str) -> serde_yaml_ng::Value {
        let source = expand(text, vars).unwrap();
        let map: std::collections::BTreeMap<String, serde_yaml_ng::Value> = source.parse().unwrap();
        map.get(key).cloned().unwrap_or(serde_yaml_ng::Value::Null)
    }

    #[test]
    fn values_are_inserted_as_values_never_as_yaml() {
        use serde_yaml_ng::Value;
        let s = |v: &str| Value::String(v.to_owned());
        // Unquoted: what YAML would read as null, a comment, a mapping or an alias stays the text it is.
        for value in [
            "null", "~", "NULL", "abc #def", "a: b", "*alias", "[1]", "- x", "end:", " pad", "#x",
        ] {
            assert_eq!(
                value_of("t: ${T}\n", &[("T", value)], "t"),
                s(value),
                "{value:?}"
            );
        }
        assert_eq!(
            value_of("t: ${T} # note\n", &[("T", "x #y")], "t"),
            s("x #y")
        );
        // Numbers and booleans keep their type; plain text stays plain.
        assert_eq!(
            value_of("t: ${T}\n", &[("T", "8080")], "t"),
            Value::from(8080)
        );
        assert_eq!(
            value_of("t: ${T}\n", &[("T", "true")], "t"),
            Value::Bool(true)
        );
        assert_eq!(
            value_of("t: ${T}\n", &[("T", "redis://h:1/0")], "t"),
            s("redis://h:1/0")
        );
        // An empty value is still an unset optional setting.
        assert_eq!(value_of("t: ${T}\n", &[("T", "")], "t"), Value::Null);
        // Quoted scalars: escaped for their style.
        let tricky = "it's a \"quote\" and a \\ back\tslash";
        assert_eq!(
            value_of("t: \"<${T}>\"\n", &[("T", tricky)], "t"),
            s(&format!("<{tricky}>"))
        );
        assert_eq!(
            value_of("t: '<${T}>'\n", &[("T", tricky)], "t"),
            s(&format!("<{tricky}>"))
        );
        assert_eq!(
            value_of("t: 'a''b ${T}'\n", &[("T", "it's")], "t"),
            s("a'b it's")
        );
        // Flow collections: a value with a comma is one item.
        let list = value_of("t: [${A}, b]\n", &[("A", "c,d")], "t");
        assert_eq!(list, Value::Sequence(vec![s("c,d"), s("b")]));
        let list = value_of("t:\n  - ${A}\n", &[("A", "null")], "t");
        assert_eq!(list, Value::Sequence(vec![s("null")]));
        // Part of a longer unquoted scalar: a plain-safe value joins it, an unsafe one is refused unechoed.
        assert_eq!(value_of("t: pre-${T}\n", &[("T", "x")], "t"), s("pre-x"));
        let e = expand("t: pre-${T}\n", &[("T", "s3cret #x")]).unwrap_err();
        assert_eq!(e.position, pos(1, 8));
        assert!(e.message.contains("T holds YAML syntax"), "{}", e.message);
        assert!(!e.message.contains("s3cret"), "{}", e.message);
        // Defaults are values too.
        assert_eq!(value_of("t: ${T:-~}\n", &[], "t"), s("~"));
    }

    #[test]
    fn a_quoted_secret_is_hidden_in_errors_in_its_escaped_form_too() {
        let source = expand("n: ${N}\n", &[("N", "se\"cret#1 #x")]).unwrap();
        let err = source
            .parse::<std::collections::BTreeMap<String, u16>>()
            .unwrap_err();
        assert!(!err.message.contains("cret"), "{}", err.message);
    }

    #[test]
    fn dollar_dollar_brace_is_a_literal_and_other_dollars_stay() {
        let s = expand("a: $${A} $A $$ ${A}x$\n", &[("A", "v")]).unwrap();
        assert_eq!(s.expanded, "a: ${A} $A $$ vx$\n");
    }

    #[test]
    fn unterminated_reference_is_an_error_at_its_dollar() {
        let e = expand("a: 1\nb: x ${A\nc: }\n", &[("A", "v")]).unwrap_err();
        assert_eq!(e.position, pos(2, 6));
        assert!(e.message.starts_with("unterminated `${`"), "{}", e.message);
    }

    #[test]
    fn invalid_names_and_forms_are_errors() {
        for (text, column, needle) in [
            ("a: ${1A}", 4, "invalid variable name `1A`"),
            ("a: ${}", 4, "invalid variable name ``"),
            ("a:  ${ A }", 5, "invalid variable name ` A `"),
            ("a: ${A-b}", 4, "invalid variable reference `${A-b}`"),
            ("a: ${A.B}", 4, "invalid variable reference `${A.B}`"),
            ("a: ${A:?x}", 4, "invalid variable reference `${A:?x}`"),
        ] {
            let e = expand(text, &[("A", "v")]).unwrap_err();
            assert_eq!(e.position, pos(1, column), "{text}");
            assert!(e.message.contains(needle), "{text}: {}", e.message);
        }
    }

    #[test]
    fn multi_line_values_are_refused_without_echoing_them() {
        for value in ["one\ntwo", "one\rtwo", "one\u{2028}two"] {
            let e = expand("x: 1\ny: ${ML}\n", &[("ML", value)]).unwrap_err();
            assert_eq!(e.position, pos(2, 4));
            assert!(e.message.contains("ML holds a line break"), "{}", e.message);
            assert!(!e.message.contains("one"), "{}", e.message);
        }
    }

    #[test]
    fn whole_line_comments_are_not_expanded() {
        let s = expand(
            "# secret: ${UNSET}\n  # ${UNSET}\na: ${A} # ${A}\n",
            &[("A", "v")],
        )
        .unwrap();
        assert_eq!(s.expanded, "# secret: ${UNSET}\n  # ${UNSET}\na: v # v\n");
    }

    #[test]
    fn expand_env_reads_the_process_environment() {
        // PATH is set in every environment the tests run in; its value is not asserted.
        let s = Source::from_text(
            "c.yaml",
            "a: '${PATH}'\nb: ${TOLLGATE_SURELY_UNSET_VAR:-d}\n".to_string(),
        )
        .expand_env()
        .unwrap();
        assert!(s.expanded.ends_with("\nb: d\n"));
        assert!(!s.expanded.contains("${PATH}"));
        let e = Source::from_text("c.yaml", "a: ${TOLLGATE_SURELY_UNSET_VAR}".to_string())
            .expand_env()
            .unwrap_err();
        assert_eq!(e.position, pos(1, 4));
    }

    #[test]
    fn columns_after_expansion_map_back_to_the_original_line() {
        // `${LONG}` (7 chars) becomes 22 chars, `$${` (3) becomes 2; the bad port is after both.
        let text = "{host: ${LONG}, tags: [\"$${x}\"], port: nope}\n";
        let s = expand(text, &[("LONG", "a-much-longer-hostname")]).unwrap();
        let e = s.parse::<Config>().unwrap_err();
        assert_eq!(e.position, pos(1, text.find("nope").unwrap() + 1));
        assert!(
            e.message.contains("invalid type: string \"nope\""),
            "{}",
            e.message
        );
        // And shorter: the value is 1 char for a 7-char reference.
        let text = "{host: ${S}, port: nope}";
        let e = expand(text, &[("S", "h")])
            .unwrap()
            .parse::<Config>()
            .unwrap_err();
        assert_eq!(e.position, pos(1, 20));
    }

    #[test]
    fn error_inside_an_expanded_value_points_at_its_reference() {
        let text = "host: h\nport:   ${PORT}\n";
        let e = expand(text, &[("PORT", "70000")])
            .unwrap()
            .parse::<Config>()
            .unwrap_err();
        assert_eq!(e.position, pos(2, 9));
    }

    #[test]
    fn unknown_field_is_located_with_deny_unknown_fields() {
        let text = "host: h\nport: 80\ntags:\n  - a\nhots: typo\n";
        let e = Source::from_text("c.yaml", text.to_string())
            .parse::<Config>()
            .unwrap_err();
        assert_eq!(e.position, pos(5, 1));
        assert!(e.message.contains("unknown field `hots`"), "{}", e.message);
        assert!(
            !e.message.contains("at line"),
            "position only once: {}",
            e.message
        );
    }

    #[test]
    fn bad_enum_value_is_located() {
        let text = "host: h\nmode:   automatic\n";
        let e = Source::from_text("c.yaml", text.to_string())
            .parse::<Config>()
            .unwrap_err();
        assert_eq!(e.position, pos(2, 9));
        // serde_yaml_ng's path to the value stays in front of the message.
        assert_eq!(
            e.message,
            "mode: unknown variant `automatic`, expected `auto` or `manual`"
        );
    }

    #[test]
    fn wrong_type_is_located_and_columns_count_characters() {
        let text = "host: \"Café ☕\"\ntags: [é, {x: 1}]\n";
        let e = Source::from_text("c.yaml", text.to_string())
            .parse::<Config>()
            .unwrap_err();
        assert_eq!(e.position, pos(2, 11));
        assert!(e.message.contains("invalid type: map"), "{}", e.message);
    }

    #[test]
    fn syntax_errors_are_located_and_context_marks_mapped_back() {
        // `${KEY}` is two characters longer than `tags`: the context mark moves back by two.
        let text = "${KEY}: [a, b\nport: 1\n";
        let e = expand(text, &[("KEY", "tags")])
            .unwrap()
            .parse::<Config>()
            .unwrap_err();
        assert_eq!(e.position, pos(2, 5));
        assert_eq!(
            e.message,
            "did not find expected ',' or ']', while parsing a flow sequence at line 1 column 9"
        );
        let text = "a: [1, 2\n";
        let e = Source::from_text("c.yaml", text.to_string())
            .parse::<serde_yaml_ng::Value>()
            .unwrap_err();
        assert_eq!(e.position, pos(2, 1));
        assert!(
            e.message
                .contains("while parsing a flow sequence at line 1 column 4"),
            "{}",
            e.message
        );
    }

    #[test]
    fn an_error_at_the_end_of_a_file_without_a_final_break_stays_on_its_last_line() {
        // Found by fuzz/catalog: this was reported at 3:1, a line the two-line file does not have.
        let e = Source::from_text("c.yaml", "a: 1\nb: [x".to_string())
            .parse::<serde_yaml_ng::Value>()
            .unwrap_err();
        assert_eq!(e.position, pos(2, 6), "{e}");
        // With an expanded value on that line, the end maps back to the end of the line as written.
        let e = expand("a: 1\nb: [${V}", &[("V", "long-value")])
            .unwrap()
            .parse::<serde_yaml_ng::Value>()
            .unwrap_err();
        assert_eq!(e.position, pos(2, 9), "{e}");
        assert!(!e.message.contains("long-value"), "{e}");
    }

    #[test]
    fn secrets_are_never_echoed() {
        // Wrong type, whole value from the environment.
        let s = expand("port: ${PORT}\n", &[("PORT", "s3cret")]).unwrap();
        let e = s.parse::<Config>().unwrap_err();
        assert_eq!(e.position, pos(1, 7));
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(e.message.contains("<value of ${PORT}>"), "{}", e.message);
        assert!(e.message.contains("expected u16"), "{}", e.message);

        // Bad enum value, part of the value from the environment, quotes escaped by serde.
        let s = expand("mode: pre-${MODE}\n", &[("MODE", "hunter\"2")]).unwrap();
        let e = s.parse::<Config>().unwrap_err();
        assert_eq!(e.position, pos(1, 7));
        assert!(!e.message.contains("hunter"), "{}", e.message);
        assert!(e.message.contains("`auto` or `manual`"), "{}", e.message);

        // A short value on the error's own line is hidden too.
        let s = expand("port: ${P}x\n", &[("P", "9")]).unwrap();
        let e = s.parse::<Config>().unwrap_err();
        assert!(!e.message.contains('9'), "{}", e.message);

        // A one-letter value mangles neither serde's words nor the expected variants.
        let s = expand("mode: ${M}\n", &[("M", "a")]).unwrap();
        let e = s.parse::<Config>().unwrap_err();
        assert_eq!(
            e.message,
            "mode: unknown variant `<value of ${M}>`, expected `auto` or `manual`"
        );

        let s = expand("port: ${P}\n", &[("P", "t")]).unwrap();
        let e = s.parse::<Config>().unwrap_err();
        assert_eq!(
            e.message,
            "port: invalid type: string \"<value of ${P}>\", expected u16"
        );

        // A long value is hidden even when the error sits on another line (a multi-line scalar).
        let s = expand("port: first\n  ${T}\n", &[("T", "longsecret")]).unwrap();
        let e = s.parse::<Config>().unwrap_err();
        assert_eq!(e.position, pos(1, 7));
        assert!(!e.message.contains("longsecret"), "{}", e.message);
        assert!(e.message.contains("<value of ${T}>"), "{}", e.message);

        // A default is written in the file: it is shown.
        let s = expand("port: ${P:-eighty}\n", &[]).unwrap();
        let e = s.parse::<Config>().unwrap_err();
        assert!(e.message.contains("\"eighty\""), "{}", e.message);

        // error_at hides it from the caller's message as well.
        let s = expand("host: ${HOST}\n", &[("HOST", "topsecret.example")]).unwrap();
        let e = s.error_at(&[PathSeg::Key("host")], "cannot resolve topsecret.example");
        assert_eq!(e.position, pos(1, 7));
        assert_eq!(e.message, "cannot resolve <value of ${HOST}>");
    }

    #[test]
    fn an_empty_file_is_a_clear_error() {
        for text in [
            "",
            "\n\n",
            "# only\n  # comments\n",
            "---\n# c\n...\n",
            "\u{feff}",
        ] {
            let e = Source::from_text("c.yaml", text.to_string())
                .parse::<Config>()
                .unwrap_err();
            assert_eq!(e.position, None, "{text:?}");
            assert!(e.to_string().starts_with("c.yaml: file is empty"), "{e}");
        }
        let e = expand("${NOTHING:-}\n", &[])
            .unwrap()
            .parse::<Config>()
            .unwrap_err();
        assert!(e.message.starts_with("file is empty"), "{}", e.message);
    }

    const CATALOG_YAML: &str = "\
products:
  - name: weather_free
    quota: {limit: 10, unit: hour}
developers:
  - email: a@b.c
    apps:
      - name: one
        products: []
      - name: two
        keys:
        products:
          - {name: weather_free, status: approved}
          - name: missing
            status: pending
";

    #[test]
    fn error_at_finds_nested_keys_and_indices_in_block_yaml() {
        use PathSeg::{Index, Key};
        let s = Source::from_text("catalog.yaml", CATALOG_YAML.to_string());
        let cases: &[(&[PathSeg], Option<Position>)] = &[
            (&[], pos(1, 1)),
            (&[Key("products")], pos(2, 3)),
            (&[Key("products"), Index(0)], pos(2, 5)),
            (&[Key("products"), Index(0), Key("name")], pos(2, 11)),
            (
                &[Key("products"), Index(0), Key("quota"), Key("unit")],
                pos(3, 30),
            ),
            (
                &[Key("developers"), Index(0), Key("apps"), Index(1)],
                pos(9, 9),
            ),
            (
                &[
                    Key("developers"),
                    Index(0),
                    Key("apps"),
                    Index(1),
                    Key("keys"),
                ],
                pos(10, 9),
            ),
            (
                &[
                    Key("developers"),
                    Index(0),
                    Key("apps"),
                    Index(1),
                    Key("products"),
                    Index(0),
                ],
                pos(12, 13),
            ),
            (
                &[
                    Key("developers"),
                    Index(0),
                    Key("apps"),
                    Index(1),
                    Key("products"),
                    Index(1),
                    Key("name"),
                ],
                pos(13, 19),
            ),
            (
                &[
                    Key("developers"),
                    Index(0),
                    Key("apps"),
                    Index(1),
                    Key("products"),
                    Index(1),
                    Key("status"),
                ],
                pos(14, 21),
            ),
        ];
        for (path, want) in cases {
            let e = s.error_at(path, "m");
            assert_eq!(e.position, *want, "{path:?}");
        }
        let e = s.error_at(&[Key("developers"), Index(0), Key("email")], "bad email");
        assert_eq!(e.to_string(), "catalog.yaml:5:12: bad email");
    }

    #[test]
    fn error_at_finds_nested_keys_and_indices_in_json() {
        use PathSeg::{Index, Key};
        let json = "{\n\t\"developers\": [\n\t\t{\"email\": \"a@b.c\", \"apps\": [\n\t\t\t{\"name\": \"one\"},\n\t\t\t{\"name\": \"two\", \"products\": [{\"name\": \"x\"}, {\"name\": \"y\"}]}\n\t\t]}\n\t]\n}\n";
        let s = Source::from_text("catalog.json", json.to_string());
        let v: serde_yaml_ng::Value = s.parse().unwrap();
        assert!(v.get("developers").is_some());
        let path = [
            Key("developers"),
            Index(0),
            Key("apps"),
            Index(1),
            Key("products"),
            Index(1),
            Key("name"),
        ];
        assert_eq!(s.error_at(&path, "m").position, pos(5, 57));
        assert_eq!(s.error_at(&path[..6], "m").position, pos(5, 48));
        assert_eq!(s.error_at(&path[..4], "m").position, pos(5, 4));
        assert_eq!(s.error_at(&path[..1], "m").position, pos(2, 16));
    }

    #[test]
    fn error_at_falls_back_to_the_deepest_existing_ancestor() {
        use PathSeg::{Index, Key};
        let s = Source::from_text("catalog.yaml", CATALOG_YAML.to_string());
        // No third app: the apps sequence.
        let e = s.error_at(
            &[
                Key("developers"),
                Index(0),
                Key("apps"),
                Index(2),
                Key("name"),
            ],
            "m",
        );
        assert_eq!(e.position, pos(7, 7));
        // No such key: the mapping that lacks it.
        let e = s.error_at(&[Key("products"), Index(0), Key("nope")], "m");
        assert_eq!(e.position, pos(2, 5));
        // A key on a scalar: the scalar.
        let e = s.error_at(&[Key("products"), Index(0), Key("name"), Key("x")], "m");
        assert_eq!(e.position, pos(2, 11));
        // A key written without a value: the key itself.
        let e = s.error_at(
            &[
                Key("developers"),
                Index(0),
                Key("apps"),
                Index(1),
                Key("keys"),
            ],
            "m",
        );
        assert_eq!(e.position, pos(10, 9));
        // Nothing at all: no position.
        let empty = Source::from_text("e.yaml", "# nothing\n".to_string());
        assert_eq!(empty.error_at(&[Key("a")], "m").position, None);
        assert_eq!(empty.error_at(&[Key("a")], "m").to_string(), "e.yaml: m");
    }

    #[test]
    fn error_at_maps_expanded_positions_back_and_follows_aliases() {
        use PathSeg::{Index, Key};
        let text =
            "a: ${LONG}\nb: {c: ${LONG}, d: [x, ${LONG}, y]}\nbase: &base {k: v}\nuse: *base\n";
        let s = expand(text, &[("LONG", "0123456789abcdef")]).unwrap();
        assert_eq!(s.error_at(&[Key("a")], "m").position, pos(1, 4));
        assert_eq!(s.error_at(&[Key("b"), Key("c")], "m").position, pos(2, 8));
        assert_eq!(
            s.error_at(&[Key("b"), Key("d"), Index(1)], "m").position,
            pos(2, 24)
        );
        assert_eq!(
            s.error_at(&[Key("b"), Key("d"), Index(2)], "m").position,
            pos(2, 33)
        );
        assert_eq!(
            s.error_at(&[Key("use"), Key("k")], "m").position,
            pos(3, 17)
        );
        assert_eq!(s.error_at(&[Key("use")], "m").position, pos(4, 6));
        // Columns count characters, not bytes.
        let s = Source::from_text("c.yaml", "name: Café\nx: [é, ☕, y]\n".to_string());
        assert_eq!(s.error_at(&[Key("x"), Index(2)], "m").position, pos(2, 11));
    }

    #[test]
    fn read_reports_io_and_encoding_errors() {
        let dir = std::env::temp_dir().join(format!("tollgate-source-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.yaml");
        let e = Source::read(&missing).unwrap_err();
        assert_eq!(e.position, None);
        assert!(
            e.to_string()
                .starts_with(&format!("{}: cannot read: ", missing.display())),
            "{e}"
        );
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, b"a: 1\nb: \xff\n").unwrap();
        let e = Source::read(&bad).unwrap_err();
        assert_eq!(e.position, pos(2, 4));
        let good = dir.join("good.yaml");
        std::fs::write(&good, "\u{feff}port: x\n").unwrap();
        let s = Source::read(&good).unwrap();
        assert_eq!(s.path(), good.as_path());
        assert_eq!(s.parse::<Config>().unwrap_err().position, pos(1, 7));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn crlf_files_keep_their_positions() {
        let text = "host: h\r\nport: ${P}\r\nmode: x\r\n";
        let e = expand(text, &[("P", "1")])
            .unwrap()
            .parse::<Config>()
            .unwrap_err();
        assert_eq!(e.position, pos(3, 7));
    }
}
