//! An incremental server-sent-events splitter: bytes in, complete events out, the stream never held.
//!
//! It follows the event-stream interpretation of the HTML Living Standard (§9.2.6): lines end in `\r\n`,
//! `\n` or `\r`; a line starting with `:` is a comment; `field: value` drops one space after the colon; `data`
//! lines of one event are joined with `\n`; an empty line dispatches the event, and an event without a
//! `data` line is not dispatched; a leading UTF-8 BOM is dropped. `event`, `id` and `retry` are parsed as
//! fields and ignored: every provider repeats the event type inside the JSON data (`type`), so the scanner
//! needs only the data. Chunks may end anywhere: inside `\r\n`, inside a field name, inside a UTF-8
//! sequence (bytes are split on ASCII terminators only, so a multi-byte sequence is never cut by us).
//!
//! Memory: the current partial line (at most `max + LINE_SLACK` bytes) and the current event's data (at most
//! `max + 1`). A longer line or event is dropped as it arrives and reported once as [`Event::Oversized`]
//! when its event ends, and the stream goes on.

/// Room for the field name and separator of a `data:` line whose value is exactly `max` bytes.
const LINE_SLACK: usize = 64;

/// What the splitter hands out for each dispatched event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event<'a> {
    /// The event's `data` lines joined by `\n`.
    Data(&'a [u8]),
    /// The event's data or one of its lines passed the bound; it was dropped.
    Oversized,
}

/// The splitter's state between chunks.
#[derive(Debug)]
pub(crate) struct Splitter {
    max: usize,
    /// The current line when a chunk ended inside it.
    line: Vec<u8>,
    /// The current line passed the bound: its remaining bytes are dropped until its end.
    line_overflow: bool,
    /// The last chunk ended in `\r`: a `\n` opening the next one belongs to that line end.
    after_cr: bool,
    /// No line has ended yet (the BOM check).
    first_line: bool,
    /// The current event's data, each line followed by `\n`.
    data: Vec<u8>,
    /// The current event has a `data` field (an empty `data:` line still makes an event).
    has_data: bool,
    /// The current event passed the bound.
    oversized: bool,
}

impl Splitter {
    /// A splitter whose events may hold up to `max` bytes of data.
    pub(crate) fn new(max: usize) -> Splitter {
        Splitter {
            max,
            line: Vec::new(),
            line_overflow: false,
            after_cr: false,
            first_line: true,
            data: Vec::new(),
            has_data: false,
            oversized: false,
        }
    }

    /// Splits the next chunk, calling `on` for each event it completes.
    pub(crate) fn feed(&mut self, mut chunk: &[u8], on: &mut impl FnMut(Event<'_>)) {
        if chunk.is_empty() {
            return;
        }
        if self.after_cr {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, terminator) = (&chunk[..end], chunk[end]);
            chunk = &chunk[end + 1..];
            if self.line.is_empty() && !self.line_overflow {
                // The common case: the whole line is inside this chunk, read it in place.
                self.line_done(head, on);
            } else {
                self.push_partial(head);
                if self.line_overflow {
                    self.line_overflow = false;
                    self.first_line = false;
                } else {
                    let line = std::mem::take(&mut self.line);
                    self.line_done(&line, on);
                    self.line = line;
                }
                self.line.clear();
            }
            if terminator == b'\r' {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.push_partial(chunk);
    }

    /// The stream ended: an unterminated last line and an event without its closing blank line are still
    /// the upstream's last word (it said the body ended), so they are read rather than dropped.
    pub(crate) fn finish(&mut self, on: &mut impl FnMut(Event<'_>)) {
        if self.line_overflow {
            self.line_overflow = false;
        } else if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, on);
        }
        self.line.clear();
        if self.has_data || self.oversized {
            self.dispatch(on);
        }
    }

    /// Bytes held now (capacities), for the memory-bound tests.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.line.capacity() + self.data.capacity()
    }

    /// Keeps part of a line that continues in the next chunk, or drops it past the bound.
    fn push_partial(&mut self, part: &[u8]) {
        if self.line_overflow || part.is_empty() {
            return;
        }
        let limit = self.max.saturating_add(LINE_SLACK);
        if self.line.len() + part.len() > limit {
            // A long comment harms nothing; any other long line spoils its event.
            if self.line.first().or(part.first()) != Some(&b':') {
                self.spoil();
            }
            self.line_overflow = true;
            self.line.clear();
            return;
        }
        extend_within(&mut self.line, part, limit);
    }

    /// Interprets one complete line.
    fn line_done(&mut self, mut line: &[u8], on: &mut impl FnMut(Event<'_>)) {
        if self.first_line {
            self.first_line = false;
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(on);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        if field != b"data" || self.oversized {
            return;
        }
        let limit = self.max.saturating_add(1);
        if self.data.len() + value.len() + 1 > limit {
            self.spoil();
            return;
        }
        extend_within(&mut self.data, value, limit);
        extend_within(&mut self.data, b"\n", limit);
        self.has_data = true;
    }

    /// Ends the current event.
    fn dispatch(&mut self, on: &mut impl FnMut(Event<'_>)) {
        if self.oversized {
            on(Event::Oversized);
        } else if self.has_data {
            // Every data line was followed by `\n`; the last one is not part of the data.
            let data = self.data.strip_suffix(b"\n").unwrap_or(&self.data);
            on(Event::Data(data));
        }
        self.data.clear();
        self.has_data = false;
        self.oversized = false;
    }

    /// Marks the current event too large and drops what it held.
    fn spoil(&mut self) {
        self.oversized = true;
        self.has_data = false;
        self.data.clear();
    }
}

/// Appends `bytes`, keeping the capacity within `limit` (plain `extend` may double it past the bound).
/// The caller has checked that `v.len() + bytes.len() <= limit`.
pub(crate) fn extend_within(v: &mut Vec<u8>, bytes: &[u8], limit: usize) {
    let need = v.len() + bytes.len();
    if need > v.capacity() {
        let target = need
            .max(v.capacity().saturating_mul(2))
            .min(limit.max(need));
        v.reserve_exact(target - v.len());
    }
    v.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event of `input` fed as the given chunks, data as strings, oversized as `None`.
    fn split(chunks: &[&[u8]], max: usize) -> Vec<Option<String>> {
        let mut out = Vec::new();
        let mut on = |ev: Event<'_>| {
            out.push(match ev {
                Event::Data(d) => Some(String::from_utf8_lossy(d).into_owned()),
                Event::Oversized => None,
            })
        };
        let mut s = Splitter::new(max);
        for chunk in chunks {
            s.feed(chunk, &mut on);
        }
        s.finish(&mut on);
        out
    }

    fn whole(input: &str) -> Vec<Option<String>> {
        split(&[input.as_bytes()], 1 << 20)
    }

    fn some(items: &[&str]) -> Vec<Option<String>> {
        items.iter().map(|s| Some(s.to_string())).collect()
    }

    #[test]
    fn line_endings_lf_crlf_cr_are_the_same() {
        let lf = "data: a\n\ndata: b\ndata: c\n\n";
        assert_eq!(whole(lf), some(&["a", "b\nc"]));
        assert_eq!(whole(&lf.replace('\n', "\r\n")), some(&["a", "b\nc"]));
        assert_eq!(whole(&lf.replace('\n', "\r")), some(&["a", "b\nc"]));
        // Mixed in one stream.
        assert_eq!(whole("data: a\r\n\rdata: b\n\r\n"), some(&["a", "b"]));
    }

    #[test]
    fn fields_comments_and_names() {
        let input = ": keep-alive\nevent: message_start\nid: 7\nretry: 10\ndata:{\"x\":1}\n\n\
                     event: only-a-name\n\ndata\n\ndata:  two spaces\n\nfoo: bar\ndata: after-unknown\n\n";
        assert_eq!(
            whole(input),
            some(&["{\"x\":1}", "", " two spaces", "after-unknown"])
        );
    }

    #[test]
    fn bom_is_dropped_once() {
        assert_eq!(whole("\u{feff}data: a\n\n"), some(&["a"]));
        // Split inside the BOM.
        let bytes = "\u{feff}data: a\n\n".as_bytes();
        assert_eq!(split(&[&bytes[..1], &bytes[1..]], 100), some(&["a"]));
        // A BOM that is not first is data.
        assert_eq!(whole("data: a\n\n\u{feff}data: b\n\n").len(), 1);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        // "\r" ends the first chunk, "\n" opens the second: one line end, not a blank line.
        assert_eq!(
            split(&[b"data: a\r", b"\ndata: b\r\n\r\n"], 100),
            some(&["a\nb"])
        );
        // And an empty chunk between them changes nothing.
        assert_eq!(
            split(&[b"data: a\r", b"", b"\ndata: b\r\n\r\n"], 100),
            some(&["a\nb"])
        );
    }

    #[test]
    fn unterminated_last_event_is_read_at_finish() {
        assert_eq!(whole("data: a\n\ndata: b"), some(&["a", "b"]));
        assert_eq!(whole("data: a\n\ndata: b\n"), some(&["a", "b"]));
        assert_eq!(whole("event: x\n"), Vec::<Option<String>>::new());
    }

    #[test]
    fn oversized_event_is_reported_once_and_the_stream_goes_on() {
        let big = "x".repeat(100);
        let input = format!("data: {big}\ndata: more\n\ndata: ok\n\n");
        assert_eq!(whole_with(&input, 50), vec![None, Some("ok".into())]);
        // Many data lines that add up past the bound.
        let input = "data: 0123456789\n".repeat(10) + "\ndata: ok\n\n";
        assert_eq!(whole_with(&input, 50), vec![None, Some("ok".into())]);
        // A long comment does not spoil its event.
        let input = format!(":{}\ndata: ok\n\n", "c".repeat(500));
        assert_eq!(whole_with(&input, 50), some(&["ok"]));
        // Exactly at the bound is fine.
        let input = format!("data: {}\n\n", "y".repeat(50));
        assert_eq!(whole_with(&input, 50), vec![Some("y".repeat(50))]);
    }

    fn whole_with(input: &str, max: usize) -> Vec<Option<String>> {
        let bytes = input.as_bytes();
        let one = split(&[bytes], max);
        // Byte at a time gives the same events and never holds more than the bound.
        let mut out = Vec::new();
        let mut on = |ev: Event<'_>| {
            out.push(match ev {
                Event::Data(d) => Some(String::from_utf8_lossy(d).into_owned()),
                Event::Oversized => None,
            })
        };
        let mut s = Splitter::new(max);
        for b in bytes {
            s.feed(std::slice::from_ref(b), &mut on);
            assert!(s.held() <= 2 * max + LINE_SLACK + 1, "held {}", s.held());
        }
        s.finish(&mut on);
        assert_eq!(one, out);
        one
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let input = b"\xEF\xBB\xBF: c\r\nevent: e\r\ndata: {\"a\":\"\xC3\xA9\"}\r\n\r\ndata: x\rdata: y\r\rdata: [DONE]\n\n";
        let expected = split(&[input], 1000);
        assert_eq!(expected.len(), 3);
        for i in 0..=input.len() {
            for j in i..=input.len() {
                assert_eq!(
                    split(&[&input[..i], &input[i..j], &input[j..]], 1000),
                    expected,
                    "split at {i},{j}"
                );
            }
        }
    }
}
