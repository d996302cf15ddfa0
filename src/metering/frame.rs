//! The on-disk framing shared by the spool and the outbox: `magic | length | crc32 | payload`.
//!
//! Every frame carries a CRC32 of its payload, so a torn or half-written tail (a crash between `write` and
//! `fsync`) is detected and cut off instead of being misread as records.

/// Marks the start of a frame ("TGF1"); a torn length field rarely survives this check and the CRC.
const MAGIC: u32 = 0x5447_4631;

/// Bytes before the payload.
pub(crate) const HEADER_LEN: usize = 12;

/// The largest payload a frame may carry; anything larger is treated as corruption.
pub(crate) const MAX_PAYLOAD: usize = 64 << 20;

/// Appends one frame holding `payload` to `out`.
pub(crate) fn encode_into(payload: &[u8], out: &mut Vec<u8>) {
    // A payload over MAX_PAYLOAD is never produced: batches are bounded well below it by the writer.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The frames of `bytes` up to the first invalid one, and how many bytes they span.
///
/// Everything after the returned length is a torn or corrupt tail.
pub(crate) fn decode_all(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some((payload, next)) = decode_at(bytes, at) {
        frames.push(payload);
        at = next;
    }
    (frames, at)
}

fn decode_at(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let header = bytes.get(at..at.checked_add(HEADER_LEN)?)?;
    let word = |i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(header.get(i..i + 4)?.try_into().ok()?))
    };
    if word(0)? != MAGIC {
        return None;
    }
    let len = usize::try_from(word(4)?).ok()?;
    if len > MAX_PAYLOAD {
        return None;
    }
    let start = at + HEADER_LEN;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    (crc32fast::hash(payload) == word(8)?).then_some((payload, start + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode_into(p, &mut out);
        }
        out
    }

    #[test]
    fn whole_frames_round_trip() {
        let bytes = frames(&[b"one", b"", b"three"]);
        let (decoded, len) = decode_all(&bytes);
        assert_eq!(decoded, vec![&b"one"[..], b"", b"three"]);
        assert_eq!(len, bytes.len());
    }

    #[test]
    fn every_truncation_keeps_only_whole_frames() {
        let bytes = frames(&[b"first", b"second"]);
        let first_end = HEADER_LEN + 5;
        for cut in 0..bytes.len() {
            let (decoded, len) = decode_all(&bytes[..cut]);
            if cut < first_end {
                assert!(decoded.is_empty(), "cut at {cut}");
                assert_eq!(len, 0);
            } else {
                assert_eq!(decoded, vec![&b"first"[..]], "cut at {cut}");
                assert_eq!(len, first_end);
            }
        }
    }

    #[test]
    fn a_flipped_bit_ends_the_valid_prefix() {
        let mut bytes = frames(&[b"first", b"second", b"third"]);
        let second_payload = 2 * HEADER_LEN + 5 + 2;
        bytes[second_payload] ^= 0x01;
        let (decoded, len) = decode_all(&bytes);
        assert_eq!(decoded, vec![&b"first"[..]]);
        assert_eq!(len, HEADER_LEN + 5);
    }

    #[test]
    fn garbage_and_zeros_are_not_frames() {
        assert_eq!(decode_all(&[0u8; 64]).1, 0);
        let mut bytes = frames(&[b"ok"]);
        bytes.extend_from_slice(&[0xff; 40]);
        let (decoded, len) = decode_all(&bytes);
        assert_eq!(decoded.len(), 1);
        assert_eq!(len, HEADER_LEN + 2);
    }
}
