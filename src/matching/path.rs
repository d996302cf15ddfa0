//! Apigee-style path patterns, and the request-path checks that run before any matching (contract §3).
//!
//! Requests are matched on their path percent-decoded once, without the query string. There is no proxy
//! basepath: "the base" of a pattern is its part before the wildcard.
//!
//! | pattern    | `/`  | `/a` | `/a/b` | `/a/b/c` |
//! |------------|------|------|--------|----------|
//! | `/`        | yes  | yes  | yes    | yes      |
//! | `/*`       | no   | yes  | no     | no       |
//! | `/**`      | no   | yes  | yes    | yes      |
//! | `/a`       | no   | yes  | no     | no       |
//! | `/a/**`    | no   | no   | yes    | yes      |
//! | `/*/b/*`   | no   | no   | no     | yes      |
//! | `/*/b/**`  | no   | no   | no     | yes (and deeper) |
//!
//! `*` is one non-empty segment; `**` (last segment only) is one or more further segments, at least one of
//! them non-empty. One trailing slash is insignificant on both sides.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

/// A compiled Apigee-style path pattern from a catalog operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    raw: String,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// `/`: every path, the root included.
    Everything,
    /// No `**`: exactly these segments.
    Exact(Vec<Segment>),
    /// Ends in `**`: these segments, then at least one more that is not empty.
    Prefix(Vec<Segment>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Compared byte for byte with the decoded request segment.
    Literal(Box<str>),
    /// `*`: any one non-empty segment.
    Star,
}

impl Segment {
    fn accepts(&self, got: &str) -> bool {
        match self {
            Segment::Literal(want) => **want == *got,
            Segment::Star => !got.is_empty(),
        }
    }
}

/// Why a path pattern was refused; Display is one sentence (the catalog adds the position).
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum PatternError {
    /// The pattern is the empty string.
    #[error("path pattern is empty; write \"/\" to match every path")]
    Empty,
    /// The pattern does not start with `/`.
    #[error("path pattern must start with '/'")]
    NotAbsolute,
    /// The pattern holds `?` or `#`.
    #[error(
        "path pattern cannot hold '?' or '#' because patterns match the path without its query string"
    )]
    QueryOrFragment,
    /// The pattern holds `//` (an empty segment).
    #[error("path pattern cannot hold an empty segment ('//')")]
    EmptySegment,
    /// The pattern holds a `.` or `..` segment, which every request would be refused for.
    #[error("path pattern cannot hold a '.' or '..' segment")]
    DotSegment,
    /// `**` appears before the last segment.
    #[error("'**' may only be the last segment of a path pattern")]
    DoubleStarNotLast,
    /// A segment mixes `*` with other characters, like `/fore*`.
    #[error(
        "path pattern segment '{segment}' mixes a wildcard with other characters; '*' and '**' must stand alone between slashes"
    )]
    MixedWildcard {
        /// The offending segment as written.
        segment: String,
    },
    /// The pattern holds a backslash, raw or encoded.
    #[error("path pattern cannot hold a backslash")]
    Backslash,
    /// The pattern holds NUL, raw or encoded.
    #[error("path pattern cannot hold a NUL character")]
    Nul,
    /// The pattern holds a control character, raw or encoded.
    #[error("path pattern cannot hold a control character")]
    ControlCharacter,
    /// The pattern holds `%2F`.
    #[error("path pattern cannot hold an encoded slash (%2F)")]
    EncodedSlash,
    /// The pattern holds a malformed percent escape or does not decode to UTF-8.
    #[error("path pattern has a malformed percent escape or does not decode to UTF-8")]
    BadEncoding,
    /// The pattern holds double percent-encoding that requests are refused for.
    #[error("path pattern cannot hold double percent-encoding such as %252E")]
    DoubleEncoding,
}

impl PatternError {
    /// A pattern must be a path a request could carry, so it is refused for what a request would be.
    fn from_unsafe(unsafe_path: UnsafePath) -> PatternError {
        match unsafe_path {
            UnsafePath::NotAbsolute => PatternError::NotAbsolute,
            UnsafePath::DotSegment => PatternError::DotSegment,
            UnsafePath::EncodedSlash => PatternError::EncodedSlash,
            UnsafePath::Backslash => PatternError::Backslash,
            UnsafePath::Nul => PatternError::Nul,
            UnsafePath::BadEncoding => PatternError::BadEncoding,
            UnsafePath::ControlCharacter => PatternError::ControlCharacter,
            UnsafePath::DoubleEncoding => PatternError::DoubleEncoding,
            UnsafePath::Fragment => PatternError::QueryOrFragment,
        }
    }
}

impl PathPattern {
    /// Compiles a pattern; errors say what is wrong in one sentence (they become catalog errors with positions).
    ///
    /// Percent escapes in a pattern are decoded once, like request paths, so `/fore%63astrss` is
    /// `/forecastrss` and `/a/%2A` is a literal `*` segment rather than a wildcard. One trailing slash is
    /// dropped (`/forecastrss/` is `/forecastrss`), mirroring the request side.
    pub fn parse(pattern: &str) -> Result<PathPattern, PatternError> {
        if pattern.is_empty() {
            return Err(PatternError::Empty);
        }
        let Some(body) = pattern.strip_prefix('/') else {
            return Err(PatternError::NotAbsolute);
        };
        if pattern.contains(['?', '#']) {
            return Err(PatternError::QueryOrFragment);
        }
        let decoded = sanitize(pattern).map_err(PatternError::from_unsafe)?;
        let kind = if pattern == "/" {
            Kind::Everything
        } else {
            compile(body.strip_suffix('/').unwrap_or(body), &decoded)?
        };
        Ok(PathPattern {
            raw: pattern.to_owned(),
            kind,
        })
    }

    /// True when `path` (a SafePath's decoded path, no query) matches; never allocates.
    ///
    /// A single trailing slash on the request is insignificant: `/forecastrss/` matches `/forecastrss`, and
    /// `/weather/` is the base of `/weather/**` (so it does not match it). Apigee and most upstream routers
    /// treat the two spellings as one resource, and operators write patterns without the slash. Only one
    /// slash is dropped, so `/a//` still ends in an empty segment, which `*` and `**` never accept alone.
    pub fn matches(&self, path: &SafePath<'_>) -> bool {
        match &self.kind {
            Kind::Everything => true,
            Kind::Exact(want) => {
                path.segment_count() == want.len() && accepts_prefix(want, &mut path.segments())
            }
            Kind::Prefix(want) => {
                let mut rest = path.segments();
                path.segment_count() > want.len()
                    && accepts_prefix(want, &mut rest)
                    && rest.any(|segment| !segment.is_empty())
            }
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

/// Consumes one request segment per pattern segment, so the caller can look at what is left.
fn accepts_prefix<'p>(want: &[Segment], got: &mut impl Iterator<Item = &'p str>) -> bool {
    want.iter()
        .all(|segment| got.next().is_some_and(|g| segment.accepts(g)))
}

/// Builds the segments of a pattern other than `/` from its raw body (no leading slash, one trailing slash
/// dropped) and its decoded form; the two split alike because encoded slashes were refused.
fn compile(raw_body: &str, decoded: &SafePath<'_>) -> Result<Kind, PatternError> {
    let count = decoded.segment_count();
    if count == 0 {
        // Only `//` gets here: a typo that must not silently become "every path".
        return Err(PatternError::EmptySegment);
    }
    let mut segments = Vec::with_capacity(count);
    let mut double_star = false;
    for (index, (raw, segment)) in raw_body.split('/').zip(decoded.segments()).enumerate() {
        if segment.is_empty() {
            return Err(PatternError::EmptySegment);
        }
        match raw {
            "*" => segments.push(Segment::Star),
            "**" if index + 1 == count => double_star = true,
            "**" => return Err(PatternError::DoubleStarNotLast),
            _ if raw.contains('*') => {
                return Err(PatternError::MixedWildcard {
                    segment: raw.to_owned(),
                });
            }
            _ => segments.push(Segment::Literal(segment.into())),
        }
    }
    Ok(if double_star {
        Kind::Prefix(segments)
    } else {
        Kind::Exact(segments)
    })
}

/// Segments kept inline; deeper paths spill to the heap (rare, and still correct).
const INLINE_SEGMENTS: usize = 16;

/// A request path that passed the dangerous-path checks: percent-decoded once, query removed.
///
/// It borrows the raw path when nothing needed decoding; segment boundaries are computed once so matching
/// many patterns never re-splits. Segments ignore one trailing slash (see [`PathPattern::matches`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafePath<'a> {
    path: Cow<'a, str>,
    ends: SegmentEnds,
}

impl SafePath<'_> {
    /// The decoded path, without the query string, trailing slash kept as sent.
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// How many segments the path has (`/` has none, `/a/` has one, `/a//b` has three).
    pub fn segment_count(&self) -> usize {
        self.ends.as_slice().len()
    }

    /// The decoded segments in order, without allocating.
    pub fn segments(&self) -> impl Iterator<Item = &str> + '_ {
        let mut start = 1;
        self.ends.as_slice().iter().map(move |&end| {
            let segment = &self.path[start..end]; // invariant: ends sit on '/' bytes or the end of a path that starts with '/'
            start = end + 1;
            segment
        })
    }
}

/// Exclusive end offsets of each segment in the path; segment `i` starts one byte after end `i - 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SegmentEnds {
    Inline {
        len: usize,
        ends: [usize; INLINE_SEGMENTS],
    },
    Spilled(Vec<usize>),
}

impl SegmentEnds {
    /// Splits a path that starts with '/', ignoring one trailing slash.
    fn of(path: &str) -> SegmentEnds {
        let bytes = path.as_bytes();
        let body_end = match bytes {
            [_, .., b'/'] => bytes.len() - 1,
            _ => bytes.len(),
        };
        let mut ends = SegmentEnds::Inline {
            len: 0,
            ends: [0; INLINE_SEGMENTS],
        };
        if body_end > 1 {
            for (index, &byte) in bytes.iter().enumerate().take(body_end).skip(1) {
                if byte == b'/' {
                    ends.push(index);
                }
            }
            ends.push(body_end);
        }
        ends
    }

    fn push(&mut self, end: usize) {
        match self {
            SegmentEnds::Inline { len, ends } => {
                if let Some(slot) = ends.get_mut(*len) {
                    *slot = end;
                    *len += 1;
                } else {
                    let mut spilled = Vec::with_capacity(2 * INLINE_SEGMENTS);
                    spilled.extend_from_slice(ends);
                    spilled.push(end);
                    *self = SegmentEnds::Spilled(spilled);
                }
            }
            SegmentEnds::Spilled(ends) => ends.push(end),
        }
    }

    fn as_slice(&self) -> &[usize] {
        match self {
            SegmentEnds::Inline { len, ends } => &ends[..*len], // invariant: push never lets len exceed the array
            SegmentEnds::Spilled(ends) => ends,
        }
    }
}

/// Why a path was refused (400 bad_request); Display is a short user-facing sentence that never echoes the path.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum UnsafePath {
    /// Not origin-form: empty, `*`, an absolute-form URL, or anything else not starting with `/`.
    #[error("request path must start with '/'")]
    NotAbsolute,
    /// A `.` or `..` segment, raw or percent-encoded, also with a `;` parameter (`..;x`).
    #[error("request path must not contain '.' or '..' segments")]
    DotSegment,
    /// `%2F` or `%2f`.
    #[error("request path must not contain an encoded slash")]
    EncodedSlash,
    /// `\`, raw or `%5C`.
    #[error("request path must not contain a backslash")]
    Backslash,
    /// NUL, raw or `%00`.
    #[error("request path must not contain a NUL character")]
    Nul,
    /// A malformed percent escape, or decoded bytes that are not UTF-8.
    #[error("request path has a malformed percent escape or is not UTF-8 once decoded")]
    BadEncoding,
    /// A control character, raw or encoded.
    #[error("request path must not contain control characters")]
    ControlCharacter,
    /// Encoding that a second decode would turn into a dot segment, slash, backslash, NUL, control or `%`.
    #[error("request path must not contain double percent-encoding")]
    DoubleEncoding,
    /// A raw `#`: a fragment has no place in a request path.
    #[error("request path must not contain a fragment ('#')")]
    Fragment,
}

/// Splits off the query string (Envoy's `:path` includes it) and checks the path.
///
/// Allocates only when the path holds percent escapes (once, for the decoded copy) or more than
/// 16 segments. A `;` is an ordinary character, except that `.;x` and `..;x` count as dot segments:
/// servlet containers drop path parameters, so `/public/..;/admin` reaches `/admin` behind them.
/// A raw `#` is refused because an upstream that drops it as a fragment would see a shorter path than the
/// one matched (`/a/#` would reach the base `/a` through `/a/**`).
pub fn sanitize(raw_path_with_query: &str) -> Result<SafePath<'_>, UnsafePath> {
    let raw = raw_path_with_query
        .split_once('?')
        .map_or(raw_path_with_query, |(path, _query)| path);
    if !raw.starts_with('/') {
        return Err(UnsafePath::NotAbsolute);
    }
    let path = decode_once(raw)?;
    let decoded = matches!(path, Cow::Owned(_));
    let ends = SegmentEnds::of(&path);
    let safe = SafePath { path, ends };
    for segment in safe.segments() {
        if is_dot_segment(segment.bytes()) {
            return Err(UnsafePath::DotSegment);
        }
        if decoded && segment.contains('%') && is_dot_segment(percent_decode_str(segment)) {
            return Err(UnsafePath::DoubleEncoding);
        }
    }
    Ok(safe)
}

/// Validates every byte and escape, then decodes once; borrows when there is nothing to decode.
fn decode_once(raw: &str) -> Result<Cow<'_, str>, UnsafePath> {
    let bytes = raw.as_bytes();
    let mut escaped = false;
    let mut index = 0;
    while let Some(&byte) = bytes.get(index) {
        if byte == b'%' {
            let value = escape_at(bytes, index).ok_or(UnsafePath::BadEncoding)?;
            if value == b'/' {
                return Err(UnsafePath::EncodedSlash);
            }
            refuse_byte(value)?;
            escaped = true;
            index += 3;
        } else {
            if byte == b'#' {
                return Err(UnsafePath::Fragment);
            }
            refuse_byte(byte)?;
            index += 1;
        }
    }
    let path = if escaped {
        let mut out = Vec::with_capacity(bytes.len());
        let mut index = 0;
        while let Some(&byte) = bytes.get(index) {
            match (byte, escape_at(bytes, index)) {
                (b'%', Some(value)) => {
                    out.push(value);
                    index += 3;
                }
                _ => {
                    out.push(byte);
                    index += 1;
                }
            }
        }
        let path = String::from_utf8(out).map_err(|_| UnsafePath::BadEncoding)?;
        refuse_double_encoding(&path)?;
        Cow::Owned(path)
    } else {
        Cow::Borrowed(raw)
    };
    // C1 controls (U+0080..U+009F) only exist beyond ASCII; the byte checks above caught the rest.
    if !path.is_ascii() && path.chars().any(char::is_control) {
        return Err(UnsafePath::ControlCharacter);
    }
    Ok(path)
}

/// Refuses bytes that are dangerous whether they arrive raw or encoded.
fn refuse_byte(byte: u8) -> Result<(), UnsafePath> {
    match byte {
        b'\\' => Err(UnsafePath::Backslash),
        0 => Err(UnsafePath::Nul),
        _ if byte.is_ascii_control() => Err(UnsafePath::ControlCharacter),
        _ => Ok(()),
    }
}

/// Refuses escapes left after one decode that an upstream decoding again would turn into something refused
/// above; `%25` counts too, since it only survives to be decoded a third time. Dot segments are checked per
/// segment in `sanitize`.
fn refuse_double_encoding(decoded: &str) -> Result<(), UnsafePath> {
    let bytes = decoded.as_bytes();
    let dangerous = bytes.iter().enumerate().any(|(index, &byte)| {
        byte == b'%'
            && escape_at(bytes, index).is_some_and(|value| {
                matches!(value, b'/' | b'\\' | b'%') || value.is_ascii_control()
            })
    });
    if dangerous {
        Err(UnsafePath::DoubleEncoding)
    } else {
        Ok(())
    }
}

/// The byte a `%XX` escape at `index` stands for, if both digits are hex.
fn escape_at(bytes: &[u8], index: usize) -> Option<u8> {
    let high = hex_value(*bytes.get(index + 1)?)?;
    let low = hex_value(*bytes.get(index + 2)?)?;
    Some(high << 4 | low)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// `.` or `..`, alone or before a `;` path parameter (servlet containers read `..;x` as `..`).
fn is_dot_segment(mut bytes: impl Iterator<Item = u8>) -> bool {
    if bytes.next() != Some(b'.') {
        return false;
    }
    match bytes.next() {
        None | Some(b';') => true,
        Some(b'.') => matches!(bytes.next(), None | Some(b';')),
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safe(raw: &str) -> SafePath<'_> {
        sanitize(raw).unwrap_or_else(|e| panic!("{raw:?} should be safe, got {e:?}"))
    }

    fn pattern(raw: &str) -> PathPattern {
        PathPattern::parse(raw).unwrap_or_else(|e| panic!("{raw:?} should parse, got {e:?}"))
    }

    /// The semantics at a glance: each pattern against the base, one level, two levels, three and four.
    #[test]
    fn pattern_kinds_by_depth() {
        const PATHS: [&str; 5] = ["/", "/a", "/a/b", "/a/b/c", "/a/b/c/d"];
        #[rustfmt::skip]
        let table: &[(&str, [bool; 5])] = &[
            //                "/"    "/a"   "/a/b" "/a/b/c" "/a/b/c/d"
            ("/",           [true,  true,  true,  true,   true ]),
            ("/*",          [false, true,  false, false,  false]),
            ("/**",         [false, true,  true,  true,   true ]),
            ("/a",          [false, true,  false, false,  false]),
            ("/a/**",       [false, false, true,  true,   true ]),
            ("/a/b",        [false, false, true,  false,  false]),
            ("/*/b/*",      [false, false, false, true,   false]),
            ("/*/b/**",     [false, false, false, true,   true ]),
            ("/*/*",        [false, false, true,  false,  false]),
            ("/*/**",       [false, false, true,  true,   true ]),
            ("/x",          [false, false, false, false,  false]),
            ("/x/**",       [false, false, false, false,  false]),
        ];
        for (raw_pattern, expected) in table {
            let compiled = pattern(raw_pattern);
            for (path, want) in PATHS.iter().zip(expected) {
                assert_eq!(
                    compiled.matches(&safe(path)),
                    *want,
                    "pattern {raw_pattern} against {path}"
                );
                // The trailing slash never changes the answer at any depth.
                let slashed = format!("{path}/");
                assert_eq!(
                    compiled.matches(&safe(&slashed)),
                    *want,
                    "pattern {raw_pattern} against {slashed}"
                );
            }
        }
    }

    /// Edge cases per pattern: requests that match, and requests that do not.
    #[test]
    fn pattern_edge_cases() {
        #[rustfmt::skip]
        let table: &[(&str, &[&str], &[&str])] = &[
            // pattern        matches                                        does not match
            ("/",             &["/", "//", "/a", "/a/", "/a//b", "/a/b/c/d/e", "/a?q=1"], &[]),
            ("/*",            &["/a", "/a/", "/*", "/a;b", "/%61", "/a?x=/b/c"],
                              &["/", "//", "///", "/a/b", "/a//", "//a", "/a/b/c"]),
            ("/**",           &["/a", "/a/", "/a/b", "/a/b/c/d", "//a", "/a//b", "/a//"],
                              &["/", "//", "///", "/?x=/a"]),
            ("/forecastrss",  &["/forecastrss", "/forecastrss/", "/fore%63astrss", "/%66orecastrss",
                                "/forecastrss?x=1"],
                              &["/", "/forecastrss/extra", "/Forecastrss", "/forecastrss//",
                                "/forecast", "/forecastrssx", "/a/forecastrss", "//forecastrss",
                                "/forecastrss;a"]),
            ("/weather/**",   &["/weather/x", "/weather/x/", "/weather/x/y/z", "/weather//x",
                                "/weather/%2A"],
                              &["/weather", "/weather/", "/weather//", "/weather///", "/", "/weatherx/y",
                                "/Weather/x", "/other/x", "/x/weather/y"]),
            ("/*/2/**",       &["/1/2/3", "/1/2/3/", "/1/2/3/4/5", "/x/2/y/z", "/1/2//3"],
                              &["/1/2", "/1/2/", "/1/2//", "/1/3/4", "/1", "/", "//2/3", "/1/22/3",
                                "/2/3"]),
            ("/*/2/*",        &["/1/2/3", "/1/2/3/", "/a/2/b"],
                              &["/1/2", "/1/2/", "/1/2//", "/1/2/3/4", "/1/3/3", "//2/3", "/1//3", "/"]),
            ("/v1/*/items",   &["/v1/x/items", "/v1/x/items/"],
                              &["/v1//items", "/v1/items", "/v1/x/y/items", "/v1/x/items/1"]),
            ("/forecastrss/", &["/forecastrss", "/forecastrss/"], &["/forecastrss/x", "/"]),
            ("/**/",          &["/a", "/a/b"], &["/"]),
            ("/a%20b",        &["/a%20b", "/a b"], &["/a", "/a%2520b"]),
            ("/caf%C3%A9",    &["/caf%c3%a9", "/café"], &["/cafe", "/caf"]),
            ("/a/%2A",        &["/a/*", "/a/%2a"], &["/a/b", "/a"]),
            ("/a;b",          &["/a;b", "/a%3Bb"], &["/a", "/a;c"]),
        ];
        for (raw_pattern, yes, no) in table {
            let compiled = pattern(raw_pattern);
            for path in *yes {
                assert!(
                    compiled.matches(&safe(path)),
                    "{raw_pattern} should match {path}"
                );
            }
            for path in *no {
                assert!(
                    !compiled.matches(&safe(path)),
                    "{raw_pattern} should not match {path}"
                );
            }
        }
    }

    #[test]
    fn dangerous_paths_are_refused() {
        use UnsafePath::*;
        #[rustfmt::skip]
        let table: &[(&str, UnsafePath)] = &[
            // not origin-form
            ("", NotAbsolute), ("*", NotAbsolute), ("a/b", NotAbsolute), (" /a", NotAbsolute),
            ("http://example.com/a", NotAbsolute), ("?x=/a", NotAbsolute), ("%2fa", NotAbsolute),
            // dot segments, raw
            ("/.", DotSegment), ("/..", DotSegment), ("/./", DotSegment), ("/../", DotSegment),
            ("/a/.", DotSegment), ("/a/..", DotSegment), ("/a/./b", DotSegment), ("/a/../b", DotSegment),
            ("/../a", DotSegment), ("/a/../", DotSegment), ("/a/..?x=1", DotSegment),
            // dot segments, percent-encoded in any mix
            ("/%2e", DotSegment), ("/%2E", DotSegment), ("/%2e%2e", DotSegment), ("/%2E%2E", DotSegment),
            ("/%2e%2E", DotSegment), ("/.%2e", DotSegment), ("/%2e.", DotSegment),
            ("/a/%2e%2e/b", DotSegment), ("/a/%2E./b", DotSegment), ("/a/.%2E/", DotSegment),
            // dot segments with a path parameter (servlet containers drop `;...`)
            ("/..;/admin", DotSegment), ("/.;x/a", DotSegment), ("/a/..;jsessionid=1", DotSegment),
            ("/a/%2e%2e;x/b", DotSegment), ("/..%3b/admin", DotSegment), ("/..%3B", DotSegment),
            // encoded slashes
            ("/a%2fb", EncodedSlash), ("/a%2Fb", EncodedSlash), ("/%2f", EncodedSlash),
            ("/..%2fadmin", EncodedSlash), ("/a/%2F..%2F", EncodedSlash),
            // backslashes
            ("/a\\b", Backslash), ("/a%5cb", Backslash), ("/a%5Cb", Backslash), ("/..\\admin", Backslash),
            ("\\", NotAbsolute),
            // NUL
            ("/a\0b", Nul), ("/a%00b", Nul), ("/a%00", Nul),
            // double encoding
            ("/%252e", DoubleEncoding), ("/%252E", DoubleEncoding), ("/%252e%252e", DoubleEncoding),
            ("/%252E%252E/admin", DoubleEncoding), ("/a/%252e%252e/b", DoubleEncoding),
            ("/%252e.", DoubleEncoding), ("/.%252e", DoubleEncoding), ("/%2e%252e", DoubleEncoding),
            ("/a%252fb", DoubleEncoding), ("/a%252Fb", DoubleEncoding), ("/a%255cb", DoubleEncoding),
            ("/a%255Cb", DoubleEncoding), ("/a%2500", DoubleEncoding), ("/a%250a", DoubleEncoding),
            ("/a%25252e", DoubleEncoding), ("/a%2525", DoubleEncoding), ("/..%253b/admin", DoubleEncoding),
            // malformed escapes and non-UTF-8
            ("/%", BadEncoding), ("/a%", BadEncoding), ("/a%2", BadEncoding), ("/%zz", BadEncoding),
            ("/%g0", BadEncoding), ("/%0g", BadEncoding), ("/%%32%65", BadEncoding), ("/%u002e", BadEncoding),
            ("/%c0%ae%c0%ae", BadEncoding), ("/%c0%af", BadEncoding), ("/%ff", BadEncoding),
            ("/%e2%82", BadEncoding), ("/%80", BadEncoding),
            // control characters, raw and encoded, C0, DEL and C1
            ("/a\nb", ControlCharacter), ("/a\rb", ControlCharacter), ("/a\tb", ControlCharacter),
            ("/a\x7fb", ControlCharacter), ("/a%0ab", ControlCharacter), ("/a%0Db", ControlCharacter),
            ("/a%7f", ControlCharacter), ("/a%1F", ControlCharacter), ("/a\u{85}b", ControlCharacter),
            ("/a%c2%85b", ControlCharacter), ("/a%C2%9F", ControlCharacter),
            // fragments
            ("/a#b", Fragment), ("/#", Fragment), ("/a/#/b", Fragment),
        ];
        for (raw, want) in table {
            assert_eq!(sanitize(raw), Err(*want), "{raw:?}");
        }
    }

    #[test]
    fn refusal_messages_never_echo_the_path() {
        let raws = [
            "/secret%2fpath",
            "/secret/../path",
            "/secret%zz",
            "/secret/%252e%252e",
            "/secret\\path",
            "/secret#frag",
            "secret/path",
        ];
        for raw in raws {
            let message = sanitize(raw).map(|_| ()).expect_err(raw).to_string();
            assert!(!message.contains("secret"), "{message}");
            assert!(!message.contains('\n') && !message.is_empty(), "{message}");
        }
    }

    #[test]
    fn safe_paths_decode_once_and_split() {
        #[rustfmt::skip]
        let table: &[(&str, &str, &[&str])] = &[
            // raw                  decoded path      segments
            ("/",                    "/",              &[]),
            ("//",                   "//",             &[]),
            ("///",                  "///",            &["", ""]),
            ("/a",                   "/a",             &["a"]),
            ("/a/",                  "/a/",            &["a"]),
            ("/a//",                 "/a//",           &["a", ""]),
            ("/a/b",                 "/a/b",           &["a", "b"]),
            ("/a//b",                "/a//b",          &["a", "", "b"]),
            ("//a",                  "//a",            &["", "a"]),
            ("/a?x=../..",           "/a",             &["a"]),
            ("/a?",                  "/a",             &["a"]),
            ("/?",                   "/",              &[]),
            ("/a?x=%zz#f\\",         "/a",             &["a"]),
            ("/a;b",                 "/a;b",           &["a;b"]),
            ("/a;b/c;d=1",           "/a;b/c;d=1",     &["a;b", "c;d=1"]),
            ("/fore%63astrss",       "/forecastrss",   &["forecastrss"]),
            ("/a%20b",               "/a b",           &["a b"]),
            ("/a b",                 "/a b",           &["a b"]),
            ("/caf%C3%A9",           "/café",          &["café"]),
            ("/café",                "/café",          &["café"]),
            ("/a%3Fb%23c",           "/a?b#c",         &["a?b#c"]),
            ("/%25zz",               "/%zz",           &["%zz"]),
            ("/a%252eb",             "/a%2eb",         &["a%2eb"]),
            ("/%252e%252e%252e",     "/%2e%2e%2e",     &["%2e%2e%2e"]),
            ("/...",                 "/...",           &["..."]),
            ("/%2e%2e%2e",           "/...",           &["..."]),
            ("/.a/a./..b/b..",       "/.a/a./..b/b..", &[".a", "a.", "..b", "b.."]),
            ("/.well-known/x",       "/.well-known/x", &[".well-known", "x"]),
            ("/*/**",                "/*/**",          &["*", "**"]),
            ("/%2A",                 "/*",             &["*"]),
            ("/a;.",                 "/a;.",           &["a;."]),
        ];
        for (raw, decoded, segments) in table {
            let path = safe(raw);
            assert_eq!(path.as_str(), *decoded, "{raw:?}");
            assert_eq!(path.segments().collect::<Vec<_>>(), *segments, "{raw:?}");
            assert_eq!(path.segment_count(), segments.len(), "{raw:?}");
        }
    }

    #[test]
    fn sanitize_borrows_unless_it_decodes() {
        assert!(matches!(safe("/a/b?x=%41").path, Cow::Borrowed("/a/b")));
        assert!(matches!(safe("/a/%41").path, Cow::Owned(ref s) if s == "/a/A"));
    }

    #[test]
    fn deep_paths_spill_past_the_inline_segments() {
        for depth in [
            INLINE_SEGMENTS - 1,
            INLINE_SEGMENTS,
            INLINE_SEGMENTS + 1,
            3 * INLINE_SEGMENTS,
        ] {
            let names: Vec<String> = (0..depth).map(|i| format!("s{i}")).collect();
            let raw = format!("/{}/", names.join("/"));
            let path = safe(&raw);
            assert_eq!(path.segments().collect::<Vec<_>>(), names, "depth {depth}");
            assert_eq!(path.segment_count(), depth);

            let stars = vec!["*"; depth].join("/");
            assert!(
                pattern(&format!("/{stars}")).matches(&path),
                "depth {depth}"
            );
            assert!(
                !pattern(&format!("/{stars}/*")).matches(&path),
                "depth {depth}"
            );
            assert!(
                !pattern(&format!("/{stars}/**")).matches(&path),
                "depth {depth}"
            );
            assert!(pattern("/**").matches(&path));
            assert!(pattern("/s0/**").matches(&path));
            let last = format!("/{}", names.join("/"));
            assert!(pattern(&last).matches(&path), "depth {depth}");
            assert!(
                !pattern(&format!("{last}x")).matches(&path),
                "depth {depth}"
            );
        }
        // A dot segment deep past the inline segments is still found.
        let deep = format!("{}/../admin", "/x".repeat(3 * INLINE_SEGMENTS));
        assert_eq!(sanitize(&deep), Err(UnsafePath::DotSegment));
    }

    #[test]
    fn pattern_errors() {
        use PatternError::*;
        let mixed = |segment: &str| MixedWildcard {
            segment: segment.to_owned(),
        };
        #[rustfmt::skip]
        let table: Vec<(&str, PatternError)> = vec![
            ("", Empty),
            ("a", NotAbsolute), ("*", NotAbsolute), ("**", NotAbsolute), ("forecastrss", NotAbsolute),
            (" /a", NotAbsolute), ("https://api.example.com/a", NotAbsolute), ("a?b", NotAbsolute),
            ("/**/a", DoubleStarNotLast), ("/a/**/b", DoubleStarNotLast), ("/**/**", DoubleStarNotLast),
            ("/**/*", DoubleStarNotLast),
            ("/fore*", mixed("fore*")), ("/*a", mixed("*a")), ("/***", mixed("***")),
            ("/a/**b", mixed("**b")), ("/a/b*/c", mixed("b*")), ("/a/*;x", mixed("*;x")),
            ("/%2A*", mixed("%2A*")),
            ("/a//b", EmptySegment), ("//", EmptySegment), ("//a", EmptySegment), ("/a//", EmptySegment),
            ("///", EmptySegment), ("/*//**", EmptySegment),
            ("/.", DotSegment), ("/..", DotSegment), ("/a/..", DotSegment), ("/a/../b", DotSegment),
            ("/./a", DotSegment), ("/%2e%2e", DotSegment), ("/.%2E", DotSegment), ("/..;x", DotSegment),
            ("/a\0", Nul), ("/a%00", Nul),
            ("/a\\b", Backslash), ("/a%5c", Backslash), ("/a%5C", Backslash),
            ("/a?b", QueryOrFragment), ("/a?", QueryOrFragment), ("/?", QueryOrFragment),
            ("/a#b", QueryOrFragment), ("/#", QueryOrFragment),
            ("/a\n", ControlCharacter), ("/a%0d", ControlCharacter), ("/a\u{9f}", ControlCharacter),
            ("/a%2fb", EncodedSlash), ("/a%2F", EncodedSlash),
            ("/a%zz", BadEncoding), ("/a%", BadEncoding), ("/%ff", BadEncoding), ("/%c0%ae", BadEncoding),
            ("/%252e", DoubleEncoding), ("/a%252f", DoubleEncoding), ("/a%2525", DoubleEncoding),
        ];
        for (raw, want) in table {
            assert_eq!(PathPattern::parse(raw), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn pattern_error_messages_are_one_sentence() {
        let raws = [
            "", "a", "/a?b", "/a//b", "/..", "/**/a", "/fore*", "/a\\", "/a\0", "/a\n", "/a%2f",
            "/a%zz", "/%252e",
        ];
        for raw in raws {
            let message = PathPattern::parse(raw).map(|_| ()).unwrap_err().to_string();
            assert!(
                !message.is_empty() && !message.contains('\n'),
                "{message:?}"
            );
            assert!(
                !message.contains(". ") && !message.ends_with('.'),
                "{message:?}"
            );
        }
        assert_eq!(
            PathPattern::parse("/fore*")
                .map(|_| ())
                .unwrap_err()
                .to_string(),
            "path pattern segment 'fore*' mixes a wildcard with other characters; \
             '*' and '**' must stand alone between slashes"
        );
    }

    #[test]
    fn patterns_keep_their_spelling() {
        for raw in [
            "/",
            "/*",
            "/**",
            "/forecastrss/",
            "/fore%63astrss",
            "/*/2/**",
            "/a;b",
            "/café",
        ] {
            assert_eq!(pattern(raw).as_str(), raw);
        }
        // The spelling is part of the value, while equivalent spellings compile to the same matcher.
        assert_ne!(pattern("/a"), pattern("/a/"));
        assert_eq!(pattern("/a/*").kind, pattern("/a/*/").kind);
        assert_eq!(pattern("/forecastrss").kind, pattern("/fore%63astrss").kind);
    }

    /// A naive model of the semantics, checked against the compiled matcher over every small combination.
    #[test]
    fn matcher_agrees_with_a_naive_model() {
        fn model(pattern: &str, path: &str) -> bool {
            if pattern == "/" {
                return true;
            }
            let want: Vec<&str> = pattern[1..].split('/').collect();
            let trimmed = if path.len() > 1 {
                path.strip_suffix('/').unwrap_or(path)
            } else {
                path
            };
            let got: Vec<&str> = if trimmed == "/" {
                Vec::new()
            } else {
                trimmed[1..].split('/').collect()
            };
            let (fixed, tail) = match want.split_last() {
                Some((&"**", fixed)) => (fixed, true),
                _ => (&want[..], false),
            };
            let fixed_ok = got.len() >= fixed.len()
                && fixed
                    .iter()
                    .zip(&got)
                    .all(|(w, g)| if *w == "*" { !g.is_empty() } else { w == g });
            if tail {
                fixed_ok && got[fixed.len()..].iter().any(|g| !g.is_empty())
            } else {
                fixed_ok && got.len() == fixed.len()
            }
        }
        fn words(alphabet: &[&str], max_len: usize) -> Vec<Vec<String>> {
            let mut all = vec![Vec::new()];
            let mut frontier = vec![Vec::new()];
            for _ in 0..max_len {
                let mut next = Vec::new();
                for word in &frontier {
                    for letter in alphabet {
                        let mut longer: Vec<String> = word.clone();
                        longer.push((*letter).to_owned());
                        next.push(longer);
                    }
                }
                all.extend(next.iter().cloned());
                frontier = next;
            }
            all
        }
        let mut patterns = vec!["/".to_owned()];
        for word in words(&["a", "b", "*"], 3) {
            if !word.is_empty() {
                patterns.push(format!("/{}", word.join("/")));
            }
            patterns.push(format!(
                "/{}",
                word.iter()
                    .cloned()
                    .chain(["**".to_owned()])
                    .collect::<Vec<_>>()
                    .join("/")
            ));
        }
        let mut paths = Vec::new();
        for word in words(&["a", "b", ""], 4) {
            let joined = format!("/{}", word.join("/"));
            paths.push(format!("{joined}/"));
            paths.push(joined);
        }
        let mut checked = 0;
        for raw_pattern in &patterns {
            let compiled = pattern(raw_pattern);
            for raw_path in &paths {
                assert_eq!(
                    compiled.matches(&safe(raw_path)),
                    model(raw_pattern, raw_path),
                    "{raw_pattern} against {raw_path}"
                );
                checked += 1;
            }
        }
        assert!(checked > 10_000, "{checked}");
    }
}
