//! `content-encoding`: gzip and deflate undone incrementally, in front of the body reader.
//!
//! flate2's `write` decoders push their output into the sink (the body reader) in pieces of at most their
//! internal buffer (32 KiB) per step, so a small compressed chunk that inflates to gigabytes never sits in
//! memory: the sink reads each piece as it comes, and when it needs no more (a JSON body past its bound, a
//! body that is not JSON at all) it refuses the write, which stops the inflation there.

use std::io::{self, Write};

use flate2::write::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};

/// A `content-encoding` as far as the scanner is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// Absent, empty or `identity`.
    Identity,
    /// `gzip` or `x-gzip` (RFC 9110 §8.4.1.3), multi-member streams included.
    Gzip,
    /// `deflate`: zlib-wrapped as RFC 9110 says, or raw deflate as some servers send it.
    Deflate,
    /// `br`, `zstd`, `compress`, a list of several codings, anything else.
    Unsupported,
}

impl Encoding {
    /// The encoding of a `content-encoding` header value (case-insensitive; `identity` entries of a list
    /// are no-ops, two real codings stacked are not undone).
    pub(crate) fn parse(header: Option<&str>) -> Encoding {
        let mut codings = header
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
        let coding = match (codings.next(), codings.next()) {
            (None, _) => return Encoding::Identity,
            (Some(coding), None) => coding,
            (Some(_), Some(_)) => return Encoding::Unsupported,
        };
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            Encoding::Gzip
        } else if coding.eq_ignore_ascii_case("deflate") {
            Encoding::Deflate
        } else {
            Encoding::Unsupported
        }
    }
}

/// Bytes in, decoded bytes pushed into the sink `W`.
pub(crate) struct Decoder<W: Write + Default> {
    state: State<W>,
    /// Some input was written (an empty body with a `gzip` header is empty, not corrupt).
    fed: bool,
}

enum State<W: Write> {
    Identity(W),
    Gzip(Box<MultiGzDecoder<W>>),
    Zlib(Box<ZlibDecoder<W>>),
    Raw(Box<DeflateDecoder<W>>),
    /// `deflate` before its first two bytes tell zlib from raw deflate.
    DeflateHead {
        sink: W,
        head: Vec<u8>,
    },
}

impl<W: Write + Default> Decoder<W> {
    /// A decoder for `encoding` in front of `sink` (`Unsupported` passes bytes through: the sink is told
    /// to ignore them).
    pub(crate) fn new(encoding: Encoding, sink: W) -> Decoder<W> {
        let state = match encoding {
            Encoding::Identity | Encoding::Unsupported => State::Identity(sink),
            Encoding::Gzip => State::Gzip(Box::new(MultiGzDecoder::new(sink))),
            Encoding::Deflate => State::DeflateHead {
                sink,
                head: Vec::with_capacity(2),
            },
        };
        Decoder { state, fed: false }
    }

    /// The sink.
    pub(crate) fn sink(&self) -> &W {
        match &self.state {
            State::Identity(w) | State::DeflateHead { sink: w, .. } => w,
            State::Gzip(d) => d.get_ref(),
            State::Zlib(d) => d.get_ref(),
            State::Raw(d) => d.get_ref(),
        }
    }

    /// The sink, mutably.
    pub(crate) fn sink_mut(&mut self) -> &mut W {
        match &mut self.state {
            State::Identity(w) | State::DeflateHead { sink: w, .. } => w,
            State::Gzip(d) => d.get_mut(),
            State::Zlib(d) => d.get_mut(),
            State::Raw(d) => d.get_mut(),
        }
    }

    /// Decodes a chunk into the sink. An error is a corrupt stream or the sink refusing more; the caller
    /// tells them apart by asking the sink, and writes no more either way.
    pub(crate) fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.fed = true;
        match &mut self.state {
            State::Identity(w) => w.write_all(chunk),
            State::Gzip(d) => d.write_all(chunk),
            State::Zlib(d) => d.write_all(chunk),
            State::Raw(d) => d.write_all(chunk),
            State::DeflateHead { sink, head } => {
                let take = chunk.len().min(2 - head.len());
                head.extend_from_slice(&chunk[..take]);
                if head.len() < 2 {
                    return Ok(());
                }
                let (sink, head) = (std::mem::take(sink), std::mem::take(head));
                self.state = if is_zlib_header(head[0], head[1]) {
                    State::Zlib(Box::new(ZlibDecoder::new(sink)))
                } else {
                    State::Raw(Box::new(DeflateDecoder::new(sink)))
                };
                self.write(&head)?;
                self.write(&chunk[take..])
            }
        }
    }

    /// The input ended: flushes what the decoder still holds into the sink and checks the stream is whole
    /// (gzip: its CRC and length).
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        if !self.fed {
            return Ok(());
        }
        match &mut self.state {
            State::Identity(_) => Ok(()),
            State::Gzip(d) => d.try_finish(),
            State::Zlib(d) => d.try_finish(),
            State::Raw(d) => d.try_finish(),
            State::DeflateHead { .. } => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// RFC 1950 §2.2: method 8 (deflate), window at most 32 KiB, and the check bits make CMF·256 + FLG a
/// multiple of 31. A raw deflate stream starts with a block header that rarely passes all three.
fn is_zlib_header(cmf: u8, flg: u8) -> bool {
    cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};

    #[test]
    fn parse_encodings() {
        assert_eq!(Encoding::parse(None), Encoding::Identity);
        assert_eq!(Encoding::parse(Some("")), Encoding::Identity);
        assert_eq!(Encoding::parse(Some("identity")), Encoding::Identity);
        assert_eq!(Encoding::parse(Some("gzip")), Encoding::Gzip);
        assert_eq!(Encoding::parse(Some(" GZIP ")), Encoding::Gzip);
        assert_eq!(Encoding::parse(Some("x-gzip")), Encoding::Gzip);
        assert_eq!(Encoding::parse(Some("identity, gzip")), Encoding::Gzip);
        assert_eq!(Encoding::parse(Some("deflate")), Encoding::Deflate);
        assert_eq!(Encoding::parse(Some("br")), Encoding::Unsupported);
        assert_eq!(Encoding::parse(Some("zstd")), Encoding::Unsupported);
        assert_eq!(Encoding::parse(Some("gzip, br")), Encoding::Unsupported);
        assert_eq!(Encoding::parse(Some("gzip, gzip")), Encoding::Unsupported);
    }

    fn roundtrip(encoding: Encoding, encoded: &[u8], step: usize) -> Vec<u8> {
        let mut d = Decoder::new(encoding, Vec::new());
        for chunk in encoded.chunks(step) {
            d.write(chunk).unwrap();
        }
        d.finish().unwrap();
        d.sink().clone()
    }

    #[test]
    fn gzip_zlib_and_raw_deflate_decode_in_any_chunking() {
        let plain: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let mut zl = ZlibEncoder::new(Vec::new(), Compression::default());
        zl.write_all(&plain).unwrap();
        let zl = zl.finish().unwrap();
        let mut raw = DeflateEncoder::new(Vec::new(), Compression::default());
        raw.write_all(&plain).unwrap();
        let raw = raw.finish().unwrap();
        for step in [1, 2, 3, 7, 100, usize::MAX] {
            assert_eq!(roundtrip(Encoding::Gzip, &gz, step), plain, "gzip {step}");
            assert_eq!(
                roundtrip(Encoding::Deflate, &zl, step),
                plain,
                "zlib {step}"
            );
            assert_eq!(
                roundtrip(Encoding::Deflate, &raw, step),
                plain,
                "raw {step}"
            );
        }
        // Two gzip members are one body.
        let twice = [gz.clone(), gz.clone()].concat();
        assert_eq!(
            roundtrip(Encoding::Gzip, &twice, 50),
            [plain.clone(), plain].concat()
        );
    }

    #[test]
    fn truncated_or_corrupt_streams_fail() {
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&[b'x'; 10_000]).unwrap();
        let gz = gz.finish().unwrap();
        let mut d = Decoder::new(Encoding::Gzip, Vec::new());
        d.write(&gz[..gz.len() / 2]).unwrap();
        assert!(d.finish().is_err(), "truncated gzip");
        let mut bad = gz.clone();
        let n = bad.len();
        bad[n - 5] ^= 0xff; // the stored length/CRC no longer match
        let mut d = Decoder::new(Encoding::Gzip, Vec::new());
        let r = d.write(&bad).and_then(|()| d.finish());
        assert!(r.is_err(), "bad trailer");
        let mut d = Decoder::new(Encoding::Gzip, Vec::new());
        assert!(d.write(b"not gzip at all").is_err());
        let mut d = Decoder::new(Encoding::Deflate, Vec::new());
        d.write(b"x").unwrap();
        assert!(d.finish().is_err(), "one byte of deflate");
        // Nothing written: an empty body, not an error.
        let mut d = Decoder::new(Encoding::Gzip, Vec::new());
        d.finish().unwrap();
    }
}
