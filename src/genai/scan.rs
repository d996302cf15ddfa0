//! The scanner: the content type picks the reader (JSON buffered to a bound and parsed once at the end,
//! SSE split and parsed one complete event at a time, or sniffed), the decoder sits in front of it, and each
//! document read folds into the [`Usage`].

use std::fmt;
use std::io::{self, Write};

use super::decode::{Decoder, Encoding};
use super::sse::{self, Event, Splitter};
use super::usage::{self, Parts, Reading, Usage};

/// Why usage could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A JSON body longer than `max_buffer` (after decoding), or every readable SSE event of the stream was
    /// longer than that.
    TooLarge,
    /// Not JSON: a syntax error, trailing bytes after the document.
    Malformed,
    /// The JSON ended in the middle (the body was cut, or the upstream sent half a document).
    Truncated,
    /// Bytes that are not UTF-8 (JSON text is UTF-8, RFC 8259 §8.1).
    NotUtf8,
    /// A `content-encoding` other than gzip, x-gzip, deflate or identity (br, zstd, stacked codings).
    UnsupportedEncoding,
    /// The gzip or deflate stream is corrupt or truncated.
    CorruptEncoding,
}

impl Reason {
    /// A stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooLarge => "too_large",
            Reason::Malformed => "malformed",
            Reason::Truncated => "truncated",
            Reason::NotUtf8 => "not_utf8",
            Reason::UnsupportedEncoding => "unsupported_encoding",
            Reason::CorruptEncoding => "corrupt_encoding",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a body said about usage, as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The body ended and its usage was read.
    Complete,
    /// Some usage was seen but not necessarily the last word: the body did not end (the client went away),
    /// its encoding broke after the usage, or an event after the last usage could not be read. Bill what
    /// [`Scanner::usage`] says.
    Partial,
    /// The stream reported no usage but sent content: its output is counted from the content deltas sent,
    /// one token each (an OpenAI chat stream without `stream_options.include_usage`, or cut before its usage).
    Counted,
    /// The body carried no usage and sent no content delta.
    Missing,
    /// Usage could not be read at all; the record counts 0.
    Unreadable(Reason),
}

impl Outcome {
    /// A stable label for metrics: `complete` | `partial` | `missing` | the [`Reason`] label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Partial => "partial",
            Outcome::Counted => "counted",
            Outcome::Missing => "missing",
            Outcome::Unreadable(reason) => reason.as_str(),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads token usage out of one response body, chunk by chunk, in bounded memory.
pub struct Scanner {
    pipe: Decoder<Body>,
    /// The content encoding is corrupt (not the body refusing more bytes).
    corrupt: bool,
    /// No more bytes go through: the decoder failed or the body needs no more.
    stopped: bool,
    /// The outcome once `finish` ran.
    done: Option<Outcome>,
}

impl Scanner {
    /// A scanner for one response. `content_type` and `content_encoding` are the response headers as sent
    /// (parameters such as `; charset=utf-8` allowed, case-insensitive); `pointers` are the
    /// `response_json` pointers to read (may be empty); `max_buffer` bounds the decoded bytes held: a JSON
    /// body, or one SSE event.
    pub fn new(
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        pointers: &[String],
        max_buffer: usize,
    ) -> Scanner {
        let encoding = Encoding::parse(content_encoding);
        let mut body = Body {
            mode: Mode::for_content_type(content_type, max_buffer),
            max: max_buffer,
            tally: Tally {
                pointers: pointers.to_vec(),
                ..Tally::default()
            },
            fatal: None,
            // A compressed body may inflate to at most this much: past it the reading stops (too large), so a
            // small hostile body cannot burn CPU for seconds. Plain bodies are bounded by Envoy's transfer.
            budget: matches!(encoding, Encoding::Gzip | Encoding::Deflate).then(|| {
                u64::try_from(max_buffer)
                    .unwrap_or(u64::MAX)
                    .saturating_mul(INFLATE_BUDGET)
                    .max(1 << 20)
            }),
        };
        if encoding == Encoding::Unsupported {
            body.mode = Mode::Ignore;
            body.fatal = Some(Reason::UnsupportedEncoding);
        }
        Scanner {
            pipe: Decoder::new(encoding, body),
            corrupt: false,
            stopped: false,
            done: None,
        }
    }

    /// Feeds the next body chunk; returns whether the usage changed (so the caller can report new counts).
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        if self.done.is_none() && !self.stopped && self.pipe.write(chunk).is_err() {
            self.stopped = true;
            self.corrupt = !self.pipe.sink().refuses();
        }
        std::mem::take(&mut self.pipe.sink_mut().tally.changed)
    }

    /// The body ended (`end_of_stream`): reads what is left and returns the final outcome (again on later
    /// calls; chunks fed after it are ignored).
    pub fn finish(&mut self) -> Outcome {
        if let Some(done) = self.done {
            return done;
        }
        if !self.stopped && self.pipe.finish().is_err() {
            self.corrupt = !self.pipe.sink().refuses();
        }
        if !self.corrupt {
            self.pipe.sink_mut().finish();
        }
        let outcome = self.outcome(true);
        let tally = &mut self.pipe.sink_mut().tally;
        tally.bill(outcome == Outcome::Complete);
        tally.changed = false;
        self.done = Some(outcome);
        outcome
    }

    /// The usage to bill now: what the provider reported (cumulative, the latest value of each field wins),
    /// and unless the body ended with its usage read ([`Outcome::Complete`]), at least one output token per
    /// content delta sent (see the module doc, "Floors").
    pub fn usage(&self) -> &Usage {
        &self.pipe.sink().tally.billed
    }

    /// Content deltas sent so far (each carried at least one output token).
    pub fn deltas(&self) -> u64 {
        self.pipe.sink().tally.deltas
    }

    /// The outcome if the body stopped here: after `finish`, its outcome; before, `Partial` when some usage
    /// was seen (a cut stream bills what it saw), `Unreadable(Truncated)` for a JSON body begun but not
    /// ended (it is parsed only at the end), else what is already certain (`Unreadable`) or `Missing`.
    pub fn outcome_so_far(&self) -> Outcome {
        self.done.unwrap_or_else(|| self.outcome(false))
    }

    /// SSE events that could not be read (too large, not UTF-8, not JSON) and were skipped.
    pub fn unreadable_events(&self) -> u64 {
        self.pipe.sink().tally.unreadable_events
    }

    /// `response_json` pointers that held something other than a non-negative integer (or `null`), counted
    /// once per document.
    pub fn unreadable_pointers(&self) -> u64 {
        self.pipe.sink().tally.unreadable_pointers
    }

    fn outcome(&self, finished: bool) -> Outcome {
        let body = self.pipe.sink();
        if self.corrupt {
            // What a stream said before its encoding broke is still what it said; a JSON body is all or nothing.
            return if matches!(body.mode, Mode::Sse(_)) && body.tally.seen {
                Outcome::Partial
            } else {
                Outcome::Unreadable(Reason::CorruptEncoding)
            };
        }
        body.outcome(finished)
    }

    /// Whether no more bytes go through the decoder.
    #[cfg(test)]
    pub(crate) fn stopped(&self) -> bool {
        self.stopped
    }

    /// Decoded bytes held now (buffer capacities), for the memory-bound tests.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        match &self.pipe.sink().mode {
            Mode::Json(buf) => buf.capacity(),
            Mode::Sse(splitter) => splitter.held(),
            _ => 0,
        }
    }
}

impl fmt::Debug for Scanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scanner")
            .field("usage", self.usage())
            .field("outcome", &self.outcome_so_far())
            .finish_non_exhaustive()
    }
}

/// How the decoded body is read.
#[derive(Default)]
enum Mode {
    /// Not read: not JSON, an unsupported encoding, past the bound.
    #[default]
    Ignore,
    /// Unknown content type: JSON if the first non-blank byte opens an object or array.
    Sniff,
    /// A JSON body, buffered up to `max` and parsed at the end.
    Json(Vec<u8>),
    /// A server-sent-event stream, read one complete event at a time.
    Sse(Splitter),
    /// The JSON body was parsed.
    Parsed,
}

impl Mode {
    fn for_content_type(content_type: Option<&str>, max: usize) -> Mode {
        let Some(content_type) = content_type else {
            return Mode::Sniff;
        };
        let essence = content_type
            .split_once(';')
            .map_or(content_type, |(essence, _)| essence)
            .trim();
        let json_suffix = essence.len() >= 5
            && essence.is_char_boundary(essence.len() - 5)
            && essence[essence.len() - 5..].eq_ignore_ascii_case("+json");
        if essence.eq_ignore_ascii_case("text/event-stream") {
            Mode::Sse(Splitter::new(max))
        } else if essence.eq_ignore_ascii_case("application/json") || json_suffix {
            Mode::Json(Vec::new())
        } else {
            Mode::Sniff
        }
    }
}

/// The decoded body's reader: the decoder writes into it.
#[derive(Default)]
struct Body {
    mode: Mode,
    max: usize,
    tally: Tally,
    /// Usage cannot be read, whatever comes next.
    fatal: Option<Reason>,
    /// Decoded bytes a compressed body may still produce (`None`: not compressed).
    budget: Option<u64>,
}

/// How many times `max_buffer` a compressed body may inflate to in all.
const INFLATE_BUDGET: u64 = 16;

impl Body {
    /// Whether more bytes would change nothing (so the decoder may stop inflating).
    fn refuses(&self) -> bool {
        matches!(self.mode, Mode::Ignore | Mode::Parsed)
    }

    fn push(&mut self, bytes: &[u8]) {
        match &mut self.mode {
            Mode::Sniff => {
                let Some(start) = bytes
                    .iter()
                    .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
                else {
                    return;
                };
                if matches!(bytes[start], b'{' | b'[') {
                    self.mode = Mode::Json(Vec::new());
                    self.push(&bytes[start..]);
                } else {
                    self.mode = Mode::Ignore;
                }
            }
            Mode::Json(buf) => {
                if buf.len().saturating_add(bytes.len()) > self.max {
                    // Never a guess: a body we cannot hold whole is not read at all.
                    self.fatal = Some(Reason::TooLarge);
                    self.mode = Mode::Ignore;
                } else {
                    sse::extend_within(buf, bytes, self.max);
                }
            }
            Mode::Sse(splitter) => {
                let tally = &mut self.tally;
                splitter.feed(bytes, &mut |event| tally.on_event(event));
            }
            Mode::Ignore | Mode::Parsed => {}
        }
    }

    fn finish(&mut self) {
        match &mut self.mode {
            Mode::Sse(splitter) => {
                let tally = &mut self.tally;
                splitter.finish(&mut |event| tally.on_event(event));
            }
            Mode::Json(buf) => {
                let buf = std::mem::take(buf);
                self.mode = Mode::Parsed;
                if buf.trim_ascii().is_empty() {
                    // An empty body (a 204, a HEAD answer) says nothing; it is not half a document.
                    return;
                }
                match std::str::from_utf8(&buf) {
                    Err(_) => self.fatal = Some(Reason::NotUtf8),
                    Ok(text) => match self.tally.read(text) {
                        Ok(mut reading) => {
                            // A whole body's usage is all or nothing: floors are for streams.
                            reading.deltas = 0;
                            self.tally.apply(reading);
                        }
                        Err(e) => self.fatal = Some(json_reason(&e)),
                    },
                }
            }
            Mode::Sniff | Mode::Ignore | Mode::Parsed => {}
        }
    }

    fn outcome(&self, finished: bool) -> Outcome {
        if let Some(reason) = self.fatal {
            return Outcome::Unreadable(reason);
        }
        let tally = &self.tally;
        match &self.mode {
            // Only before `finish`: JSON is parsed at the end, so a body cut short is unreadable.
            Mode::Json(buf) if !buf.is_empty() => Outcome::Unreadable(Reason::Truncated),
            Mode::Sse(_) if tally.seen && (!finished || tally.bad_since_usage) => Outcome::Partial,
            _ if tally.seen => Outcome::Complete,
            _ if tally.deltas > 0 => Outcome::Counted,
            _ => tally.last_bad.map_or(Outcome::Missing, Outcome::Unreadable),
        }
    }
}

impl Write for Body {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.refuses() {
            // Stops the decoder: a gzip bomb is not inflated past the point where we stopped listening.
            return Err(io::Error::other("the body reader needs no more bytes"));
        }
        if let Some(budget) = &mut self.budget {
            let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
            if len > *budget {
                self.fatal = Some(Reason::TooLarge);
                self.mode = Mode::Ignore;
                return Err(io::Error::other("the body inflates past its budget"));
            }
            *budget -= len;
        }
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The usage folded from every document read.
#[derive(Default)]
struct Tally {
    pointers: Vec<String>,
    parts: Parts,
    /// What the provider reported.
    reported: Usage,
    /// What is billed: `usage` with the delta floor (see [`Tally::bill`]).
    billed: Usage,
    /// Content deltas sent (SSE events only).
    deltas: u64,
    /// The billed usage changed since `feed` last returned.
    changed: bool,
    /// Some document carried usage (a provider count or a pointer value).
    seen: bool,
    /// An event could not be read after the last one that carried usage (it may have been the final word).
    bad_since_usage: bool,
    last_bad: Option<Reason>,
    unreadable_events: u64,
    unreadable_pointers: u64,
}

impl Tally {
    fn read(&self, text: &str) -> Result<Reading, serde_json::Error> {
        if self.pointers.is_empty() {
            usage::read_parts(text)
        } else {
            usage::read_document(text, &self.pointers)
        }
    }

    fn on_event(&mut self, event: Event<'_>) {
        match event {
            Event::Oversized => self.bad(Reason::TooLarge),
            Event::Data(data) => {
                let data = data.trim_ascii();
                // OpenAI's end marker, and empty keep-alive events, are not documents.
                if data.is_empty() || data == b"[DONE]" {
                    return;
                }
                match std::str::from_utf8(data) {
                    Err(_) => self.bad(Reason::NotUtf8),
                    Ok(text) => match self.read(text) {
                        Ok(reading) => self.apply(reading),
                        Err(e) => self.bad(json_reason(&e)),
                    },
                }
            }
        }
    }

    fn bad(&mut self, reason: Reason) {
        self.unreadable_events += 1;
        self.last_bad = Some(reason);
        self.bad_since_usage = true;
    }

    fn apply(&mut self, reading: Reading) {
        self.unreadable_pointers += reading.bad_pointers;
        self.deltas = self.deltas.saturating_add(reading.deltas);
        if !reading.parts.is_empty() || !reading.values.is_empty() {
            self.seen = true;
            self.bad_since_usage = false;
            self.parts.merge(&reading.parts);
            let usage = &mut self.reported;
            (usage.input_tokens, usage.output_tokens, usage.total_tokens) = (
                self.parts.input_tokens(),
                self.parts.output_tokens(),
                self.parts.total_tokens(),
            );
            for (index, value) in reading.values {
                if let Some(pointer) = self.pointers.get(index) {
                    usage.pointers.insert(pointer.clone(), value);
                }
            }
        }
        self.bill(false);
    }

    /// Recomputes what is billed. A body that ended with its usage read (`complete`) bills exactly that.
    /// Otherwise the content deltas sent are a floor for the output (each carried at least one token; OpenAI
    /// streams one token per delta), and the total is at least the input reported plus that output: a client
    /// that cuts a stream before the provider's usage, or never asks for it, still pays what it received.
    fn bill(&mut self, complete: bool) {
        let mut billed = self.reported.clone();
        if !complete && self.deltas > 0 {
            let output = billed.output_tokens.unwrap_or(0).max(self.deltas);
            let sent = billed.input_tokens.unwrap_or(0).saturating_add(output);
            billed.output_tokens = Some(output);
            billed.total_tokens = Some(billed.total_tokens.unwrap_or(0).max(sent));
        }
        if billed != self.billed {
            self.billed = billed;
            self.changed = true;
        }
    }
}

fn json_reason(error: &serde_json::Error) -> Reason {
    if error.is_eof() {
        Reason::Truncated
    } else {
        Reason::Malformed
    }
}
