//! Token counts read out of an answer on its way to the client: the `"usage":{…}` object of
//! an OpenAI answer (whole, or the usage chunk of a stream), of a Responses answer
//! (`input_tokens`/`output_tokens`) or of DB-GPT's last frame. The bytes are only searched
//! (SIMD `memmem`), never parsed as a whole; an object split across body frames is put
//! together from the pieces. `"usage":null` (the chunks before a stream's usage chunk) is
//! skipped. Text inside a JSON string cannot look like the key: its quotes are escaped.
//!
//! [`BodyScan`] reads a whole answer frame by frame ([`UsageScan`]) and a stream (SSE) by
//! its tail ([`TailScan`]): a stream's usage is its last event's (OpenAI's usage chunk, the
//! Responses `response.completed` event; a server that sends a running total in every chunk
//! gets its final one counted, not their sum), so a stream's frames are only copied into a
//! small window on their way and searched once, at the end, instead of one search per
//! token.

use std::sync::LazyLock;

use memchr::memmem::{Finder, FinderRev};

const KEY: &[u8] = b"\"usage\":";
/// Longest usage object read (larger ones are not usage objects we know).
const MAX_OBJECT: usize = 1024;

static FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(KEY));
static FINDER_REV: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(KEY));

/// Token counts of one usage object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl std::ops::AddAssign for Tokens {
    fn add_assign(&mut self, o: Tokens) {
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
    }
}

/// Scans the frames of one body in order. Allocates only for an object cut between
/// frames; a stream's chunks cost a SIMD search each.
#[derive(Debug, Default)]
pub struct UsageScan {
    /// The start of an object the last frame cut (from its key on).
    pending: Vec<u8>,
    /// The last frame's tail from its last quote on, when that could be the start of a key
    /// cut in two (`carry[..carried]`).
    carry: [u8; KEY.len() - 1],
    carried: usize,
}

impl UsageScan {
    /// The usage objects that end in `data` (summed), if any.
    pub fn feed(&mut self, data: &[u8]) -> Option<Tokens> {
        let mut found: Option<Tokens> = None;
        fn add(found: &mut Option<Tokens>, t: Tokens) {
            *found.get_or_insert_with(Tokens::default) += t;
        }
        let mut from = 0;
        if !self.pending.is_empty() {
            let old = self.pending.len();
            let need = MAX_OBJECT.saturating_sub(old).min(data.len());
            self.pending.extend_from_slice(&data[..need]);
            match object_at(&self.pending) {
                Parsed::Done(t, end) => {
                    add(&mut found, t);
                    self.pending.clear();
                    from = end.saturating_sub(old).min(data.len());
                }
                Parsed::Partial if self.pending.len() < MAX_OBJECT => return None,
                _ => self.pending.clear(),
            }
        } else if self.carried > 0 {
            // A key cut between the last frame and this one.
            let carried = std::mem::take(&mut self.carried);
            let head = &data[..data.len().min(KEY.len())];
            let mut buf = [0u8; 2 * KEY.len()];
            buf[..carried].copy_from_slice(&self.carry[..carried]);
            buf[carried..carried + head.len()].copy_from_slice(head);
            let joined = &buf[..carried + head.len()];
            if joined.len() < KEY.len() && KEY.starts_with(joined) {
                // Still only the key's start (a frame shorter than the key).
                self.carry[..joined.len()].copy_from_slice(joined);
                self.carried = joined.len();
                return None;
            }
            if joined.starts_with(KEY) {
                let mut obj = joined.to_vec();
                obj.extend_from_slice(&data[head.len()..data.len().min(MAX_OBJECT)]);
                match object_at(&obj) {
                    Parsed::Done(t, _) => add(&mut found, t),
                    Parsed::Partial => {
                        self.pending = obj;
                        return found;
                    }
                    Parsed::No => {}
                }
            }
        }
        let rest = &data[from..];
        for pos in FINDER.find_iter(rest) {
            match object_at(&rest[pos..]) {
                Parsed::Done(t, _) => add(&mut found, t),
                Parsed::Partial => {
                    let end = rest.len().min(pos + MAX_OBJECT);
                    self.pending = rest[pos..end].to_vec();
                    return found;
                }
                Parsed::No => {}
            }
        }
        // A key cut at the end: the tail from a quote within the last KEY.len() - 1 bytes on
        // is the key's start (the earliest such quote: the key has a second one). A frame
        // that ends in a byte the key does not have (a stream event's newline) has none.
        let tail = &rest[rest.len() - rest.len().min(KEY.len() - 1)..];
        if let Some(&last) = tail.last()
            && KEY.contains(&last)
            && let Some(cut) = memchr::memchr_iter(b'"', tail)
                .map(|q| &tail[q..])
                .find(|cut| KEY.starts_with(cut))
        {
            self.carry[..cut.len()].copy_from_slice(cut);
            self.carried = cut.len();
        }
        found
    }
}

/// Bytes of a stream's tail kept for [`TailScan`]: a usage object ends its event, and only
/// `data: [DONE]` follows it. OpenAI's largest usage object (every `*_details` field) is
/// about 250 bytes.
const WINDOW: usize = 512;

/// A stream's last [`WINDOW`] bytes, in a ring kept inline (no allocation; each frame is
/// copied once, in at most two pieces), searched at its end for the last usage object.
#[derive(Debug)]
pub struct TailScan {
    ring: [u8; WINDOW],
    /// Where the next byte goes.
    pos: usize,
    /// The ring has wrapped: all [`WINDOW`] bytes are the stream's, oldest at `pos`.
    full: bool,
}

impl Default for TailScan {
    fn default() -> Self {
        TailScan {
            ring: [0; WINDOW],
            pos: 0,
            full: false,
        }
    }
}

impl TailScan {
    /// Keeps `data` (and what is still within the window before it).
    pub fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(WINDOW)..];
        let first = (WINDOW - self.pos).min(data.len());
        self.ring[self.pos..self.pos + first].copy_from_slice(&data[..first]);
        let rest = &data[first..];
        self.ring[..rest.len()].copy_from_slice(rest);
        let end = self.pos + data.len();
        self.full |= end >= WINDOW;
        self.pos = end % WINDOW;
    }

    /// The last complete usage object in the window (searched from the end: usually the
    /// first key found).
    pub fn finish(&mut self) -> Option<Tokens> {
        let mut tail = [0u8; WINDOW];
        let len = if self.full {
            let (old, new) = self.ring.split_at(self.pos);
            tail[..new.len()].copy_from_slice(new);
            tail[new.len()..].copy_from_slice(old);
            WINDOW
        } else {
            tail[..self.pos].copy_from_slice(&self.ring[..self.pos]);
            self.pos
        };
        (self.pos, self.full) = (0, false);
        let mut end = len;
        while let Some(at) = FINDER_REV.rfind(&tail[..end]) {
            if let Parsed::Done(t, _) = object_at(&tail[at..len]) {
                return Some(t);
            }
            end = at;
        }
        None
    }
}

/// How an answer's body is read for its usage (see the module documentation).
#[derive(Debug)]
pub enum BodyScan {
    Whole(UsageScan),
    /// Boxed: the window is 512 bytes, moved with every body wrapper otherwise.
    Stream(Box<TailScan>),
}

impl BodyScan {
    /// For a stream (`text/event-stream`) or a whole answer.
    pub fn new(stream: bool) -> Self {
        if stream {
            BodyScan::Stream(Box::default())
        } else {
            BodyScan::Whole(UsageScan::default())
        }
    }

    /// The next frame; the tokens found in it (a whole answer's).
    pub fn feed(&mut self, data: &[u8]) -> Option<Tokens> {
        match self {
            BodyScan::Whole(s) => s.feed(data),
            BodyScan::Stream(s) => {
                s.push(data);
                None
            }
        }
    }

    /// At the body's end: the tokens of a stream.
    pub fn finish(&mut self) -> Option<Tokens> {
        match self {
            BodyScan::Whole(_) => None,
            BodyScan::Stream(s) => s.finish(),
        }
    }
}

enum Parsed {
    /// A usage object with its length.
    Done(Tokens, usize),
    /// Cut short: more bytes may complete it.
    Partial,
    /// Not an object (`null`, …).
    No,
}

/// Reads the object after the key at the start of `b` (`"usage":{…}`), in one pass: its
/// end (braces and brackets outside strings; usage objects nest `*_details` objects) and the
/// numbers of its first-level token keys (`prompt_tokens`, else `input_tokens`;
/// `completion_tokens`, else `output_tokens`; the first of a repeated key).
fn object_at(b: &[u8]) -> Parsed {
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let i = skip_ws(KEY.len());
    if i >= b.len() {
        return Parsed::Partial;
    }
    if b[i] != b'{' {
        return Parsed::No;
    }
    // prompt_tokens, input_tokens, completion_tokens, output_tokens.
    let mut found: [Option<u64>; 4] = [None; 4];
    let mut depth = 0usize;
    let mut j = i;
    while j < b.len() {
        match b[j] {
            b'"' => {
                // The string's end: the next quote not escaped by a backslash.
                let start = j + 1;
                let mut k = start;
                loop {
                    match memchr::memchr2(b'"', b'\\', &b[k..]) {
                        None => return Parsed::Partial,
                        Some(o) if b[k + o] == b'\\' => k += o + 2,
                        Some(o) => {
                            k += o;
                            break;
                        }
                    }
                    if k >= b.len() {
                        return Parsed::Partial;
                    }
                }
                j = k + 1;
                if depth != 1 {
                    continue;
                }
                let slot = match &b[start..k] {
                    b"prompt_tokens" => 0,
                    b"input_tokens" => 1,
                    b"completion_tokens" => 2,
                    b"output_tokens" => 3,
                    _ => continue,
                };
                let c = skip_ws(j);
                if b.get(c) != Some(&b':') {
                    continue;
                }
                let n = skip_ws(c + 1);
                let digits = b[n..].iter().take_while(|d| d.is_ascii_digit()).count();
                if found[slot].is_none() {
                    found[slot] = std::str::from_utf8(&b[n..n + digits])
                        .ok()
                        .and_then(|d| d.parse().ok());
                }
                j = n + digits;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    let tokens = Tokens {
                        prompt_tokens: found[0].or(found[1]).unwrap_or(0),
                        completion_tokens: found[2].or(found[3]).unwrap_or(0),
                    };
                    return Parsed::Done(tokens, j + 1);
                }
            }
            _ => {}
        }
        j += 1;
    }
    Parsed::Partial
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(pieces: &[&[u8]]) -> Tokens {
        let mut s = UsageScan::default();
        let mut t = Tokens::default();
        for p in pieces {
            if let Some(x) = s.feed(p) {
                t += x;
            }
        }
        t
    }

    const WHOLE: &[u8] = br#"{"id":"x","choices":[{"message":{"content":"he said \"usage\":{\"prompt_tokens\":99}"}}],"usage":{"prompt_tokens":12,"prompt_tokens_details":{"cached_tokens":3},"completion_tokens":7,"total_tokens":19}}"#;

    #[test]
    fn whole_answer_usage_and_text_that_looks_like_it() {
        let t = scan_all(&[WHOLE]);
        assert_eq!(
            t,
            Tokens {
                prompt_tokens: 12,
                completion_tokens: 7
            }
        );
    }

    #[test]
    fn every_split_point_gives_the_same_count() {
        for cut in 0..=WHOLE.len() {
            let (a, b) = WHOLE.split_at(cut);
            assert_eq!(scan_all(&[a, b]).completion_tokens, 7, "cut at {cut}");
            assert_eq!(scan_all(&[a, b]).prompt_tokens, 12, "cut at {cut}");
        }
    }

    #[test]
    fn every_pair_of_split_points_gives_the_same_count() {
        // Three frames, the key or the object cut anywhere (frames of a byte or two too).
        for a in 0..=WHOLE.len() {
            for b in a..=WHOLE.len() {
                let t = scan_all(&[&WHOLE[..a], &WHOLE[a..b], &WHOLE[b..]]);
                assert_eq!(
                    (t.prompt_tokens, t.completion_tokens),
                    (12, 7),
                    "cuts {a}, {b}"
                );
            }
        }
        // A byte at a time.
        let bytes: Vec<&[u8]> = WHOLE.chunks(1).collect();
        assert_eq!(scan_all(&bytes).completion_tokens, 7);
    }

    fn stream_events(n: usize, usage_every_chunk: bool) -> Vec<Vec<u8>> {
        let mut ev: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let usage = if usage_every_chunk {
                    format!("{{\"prompt_tokens\":5,\"completion_tokens\":{}}}", i + 1)
                } else {
                    "null".to_string()
                };
                format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"w{i} \\\"usage\\\":{{\"}}}}],\"usage\":{usage}}}\n\n")
                    .into_bytes()
            })
            .collect();
        if !usage_every_chunk {
            ev.push(
                b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":400}}\n\n"
                    .to_vec(),
            );
        }
        ev.push(b"data: [DONE]\n\n".to_vec());
        ev
    }

    fn tail_scan(frames: &[&[u8]]) -> Option<Tokens> {
        let mut s = BodyScan::new(true);
        for f in frames {
            assert_eq!(s.feed(f), None, "a stream counts at its end");
        }
        s.finish()
    }

    #[test]
    fn a_stream_is_counted_by_its_last_usage_object_however_it_is_cut() {
        let ev = stream_events(400, false);
        let frames: Vec<&[u8]> = ev.iter().map(Vec::as_slice).collect();
        let want = Some(Tokens {
            prompt_tokens: 5,
            completion_tokens: 400,
        });
        assert_eq!(tail_scan(&frames), want);
        // The same bytes in other frames: one, a byte at a time, 7 and 1000 at a time.
        let all: Vec<u8> = ev.concat();
        assert_eq!(tail_scan(&[&all]), want);
        for size in [1, 7, 511, 512, 513, 1000, 5000] {
            let pieces: Vec<&[u8]> = all.chunks(size).collect();
            assert_eq!(tail_scan(&pieces), want, "frames of {size}");
        }
        // A running total in every chunk: the last one, not their sum.
        let ev = stream_events(50, true);
        let frames: Vec<&[u8]> = ev.iter().map(Vec::as_slice).collect();
        assert_eq!(tail_scan(&frames).unwrap().completion_tokens, 50);
        // No usage at all.
        let none = stream_events(3, false);
        assert_eq!(tail_scan(&[&none[0], &none[1], &none[4]]), None);
    }

    #[test]
    fn stream_chunks_null_usage_then_the_usage_chunk() {
        let t = scan_all(&[
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
            b"data: {\"choices\":[],\"usage\": {\"prompt_tokens\": 5, \"completion_tokens\": 2}}\n\n",
            b"data: [DONE]\n\n",
        ]);
        assert_eq!(
            t,
            Tokens {
                prompt_tokens: 5,
                completion_tokens: 2
            }
        );
    }

    #[test]
    fn responses_and_embeddings_shapes() {
        let t = scan_all(&[br#"{"usage":{"input_tokens":4,"output_tokens":9,"total_tokens":13}}"#]);
        assert_eq!((t.prompt_tokens, t.completion_tokens), (4, 9));
        let t = scan_all(&[br#"{"data":[],"usage":{"prompt_tokens":6,"total_tokens":6}}"#]);
        assert_eq!((t.prompt_tokens, t.completion_tokens), (6, 0));
    }

    #[test]
    fn no_usage_no_count() {
        let mut s = UsageScan::default();
        assert_eq!(s.feed(b"{\"choices\":[]}"), None);
        assert_eq!(s.feed(b""), None);
    }
}
