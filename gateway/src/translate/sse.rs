//! Incremental Server-Sent Events parsing: bytes in, complete events out.

use bytes::{Bytes, BytesMut};

/// One complete SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event exactly as received, terminator included (for passthrough).
    pub raw: Bytes,
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// Buffers bytes until events are complete. Holds at most one partial event. Each byte
/// is scanned for an event boundary once, however the stream is chunked.
#[derive(Default, Debug)]
pub struct SseParser {
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no boundary.
    scanned: usize,
}

/// Largest partial event kept; a peer that never ends an event is cut off.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

impl SseParser {
    /// Appends bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes waiting for the end of an event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete event, if one is buffered.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let Some((end, term)) = find_boundary(&self.buf, self.scanned) else {
                // A boundary may start at the last byte or two ("\n", "\n\r").
                self.scanned = self.buf.len().saturating_sub(2);
                return None;
            };
            self.scanned = 0;
            let raw = self.buf.split_to(end + term).freeze();
            let event = parse_fields(&raw[..end], raw.clone());
            // Comment-only or empty blocks carry nothing.
            if event.event.is_some() || !event.data.is_empty() {
                return Some(event);
            }
        }
    }
}

fn find_boundary(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i + 1 < buf.len() {
        i += memchr_newline(&buf[i..buf.len() - 1])?;
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some((i, 2));
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
}

fn memchr_newline(b: &[u8]) -> Option<usize> {
    b.iter().position(|c| *c == b'\n')
}

fn parse_fields(block: &[u8], raw: Bytes) -> SseEvent {
    let text = String::from_utf8_lossy(block);
    let mut event = None;
    let mut data = String::new();
    let mut first = true;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => event = Some(value.to_string()),
            "data" => {
                if !first {
                    data.push('\n');
                }
                data.push_str(value);
                first = false;
            }
            _ => {}
        }
    }
    SseEvent { raw, event, data }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn splits_events_across_chunks() {
        let mut p = SseParser::default();
        p.push(b"event: a\ndata: {\"x\"");
        assert!(p.next_event().is_none());
        p.push(b":1}\n\ndata: [DONE]\n\n: comment\n\n");
        let e = p.next_event().unwrap();
        assert_eq!(e.event.as_deref(), Some("a"));
        assert_eq!(e.data, "{\"x\":1}");
        assert_eq!(&e.raw[..], b"event: a\ndata: {\"x\":1}\n\n");
        let e = p.next_event().unwrap();
        assert_eq!(e.data, "[DONE]");
        assert!(p.next_event().is_none());
        assert_eq!(p.pending(), 0);
    }

    fn events_of(input: &[u8], cuts: &[usize]) -> (Vec<SseEvent>, usize) {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            let c = c.clamp(last, input.len());
            p.push(&input[last..c]);
            last = c;
            while let Some(e) = p.next_event() {
                out.push(e);
            }
        }
        (out, p.pending())
    }

    proptest::proptest! {
        /// However a stream is cut into chunks, the same events come out.
        #[test]
        fn any_chunking_gives_the_same_events(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("data: {\"a\":1}\n\n".to_string()),
                    proptest::strategy::Just("event: x\r\ndata: y\r\n\r\n".to_string()),
                    proptest::strategy::Just(": ping\n\n".to_string()),
                    proptest::strategy::Just("data: [DONE]\n\n".to_string()),
                    "[a-z:\n\r ]{0,12}",
                ],
                0..12,
            ),
            mut cuts in proptest::collection::vec(0usize..200, 0..10),
        ) {
            let input = parts.concat().into_bytes();
            cuts.sort_unstable();
            let whole = events_of(&input, &[]);
            let chunked = events_of(&input, &cuts);
            proptest::prop_assert_eq!(&whole, &chunked);
            let bytewise: Vec<usize> = (0..input.len()).collect();
            proptest::prop_assert_eq!(whole, events_of(&input, &bytewise));
        }
    }

    #[test]
    fn handles_crlf() {
        let mut p = SseParser::default();
        p.push(b"data: a\r\ndata: b\r\n\r\n");
        let e = p.next_event().unwrap();
        assert_eq!(e.data, "a\nb");
    }
}
