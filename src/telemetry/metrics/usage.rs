//! Token counts read out of an answer on its way to the client: the `"usage":{…}` object of
//! an OpenAI answer (whole, or the usage chunk of a stream), of a Responses answer
//! (`input_tokens`/`output_tokens`) or of DB-GPT's last frame. The bytes are only searched
//! (SIMD `memmem`), never parsed as a whole; an object split across body frames is put
//! together from the pieces. `"usage":null` (the chunks before a stream's usage chunk) is
//! skipped. Text inside a JSON string cannot look like the key: its quotes are escaped.

use std::sync::LazyLock;

use memchr::memmem::Finder;

const KEY: &[u8] = b"\"usage\":";
/// Longest usage object read (larger ones are not usage objects we know).
const MAX_OBJECT: usize = 1024;

static FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(KEY));

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

/// Scans the frames of one body in order.
#[derive(Debug, Default)]
pub struct UsageScan {
    /// The start of an object the last frame cut (from its key on).
    pending: Vec<u8>,
    /// The last bytes of the last frame (a key cut in two).
    carry: Vec<u8>,
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
        } else if !self.carry.is_empty() {
            // A key cut between the last frame and this one.
            let head = &data[..data.len().min(KEY.len())];
            let mut joined = std::mem::take(&mut self.carry);
            let carried = joined.len();
            joined.extend_from_slice(head);
            if let Some(pos) = FINDER.find(&joined)
                && pos < carried
            {
                let mut obj = joined[pos..].to_vec();
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
        let keep = rest.len().min(KEY.len() - 1);
        self.carry.clear();
        self.carry.extend_from_slice(&rest[rest.len() - keep..]);
        found
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

/// Reads the object after the key at the start of `b` (`"usage":{…}`).
fn object_at(b: &[u8]) -> Parsed {
    let mut i = KEY.len();
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    if i >= b.len() {
        return Parsed::Partial;
    }
    if b[i] != b'{' {
        return Parsed::No;
    }
    // The object's end: braces outside strings (usage objects nest `*_details` objects).
    let start = i;
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    let mut end = None;
    for (j, &c) in b[start..].iter().enumerate() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    end = Some(start + j + 1);
                    break;
                }
            }
            _ => {}
        }
    }
    let Some(end) = end else {
        return Parsed::Partial;
    };
    let obj = &b[start..end];
    let num = |keys: &[&[u8]]| keys.iter().find_map(|k| top_level_number(obj, k));
    Parsed::Done(
        Tokens {
            prompt_tokens: num(&[b"\"prompt_tokens\"", b"\"input_tokens\""]).unwrap_or(0),
            completion_tokens: num(&[b"\"completion_tokens\"", b"\"output_tokens\""]).unwrap_or(0),
        },
        end,
    )
}

/// The number after `"key":` at the object's first level (`obj` starts with `{`).
fn top_level_number(obj: &[u8], key: &[u8]) -> Option<u64> {
    let mut depth = 0usize;
    let mut in_str = false;
    let mut esc = false;
    let mut i = 0;
    while i < obj.len() {
        let c = obj[i];
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        match c {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' if depth == 1 && obj[i..].starts_with(key) => {
                let mut j = i + key.len();
                while j < obj.len() && obj[j].is_ascii_whitespace() {
                    j += 1;
                }
                if obj.get(j) == Some(&b':') {
                    j += 1;
                    while j < obj.len() && obj[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    let digits = obj[j..].iter().take_while(|c| c.is_ascii_digit()).count();
                    return std::str::from_utf8(&obj[j..j + digits]).ok()?.parse().ok();
                }
                in_str = true;
            }
            b'"' => in_str = true,
            _ => {}
        }
        i += 1;
    }
    None
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
