//! Streaming text helpers of the llama.cpp backend: an incremental UTF-8 decoder (a token
//! may end inside a character) and stop-string matching that holds back text that may be
//! the start of a stop string.

/// Incremental UTF-8 decoder: tokens may end in the middle of a multi-byte
/// character; those bytes are held until the character is complete. Invalid
/// bytes become U+FFFD.
#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Add bytes; return the text that is now complete.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("validated prefix"),
                    );
                    match e.error_len() {
                        // Incomplete character at the end: keep it for later.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    /// End of stream: whatever is left, lossily decoded.
    pub(crate) fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

/// Stop-string detection over streamed text. Text that might be the start of
/// a stop string is held back until it is known not to be one, so emitted
/// text never contains any part of a matched stop string.
#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
    pub(crate) stopped: bool,
}

impl StopMatcher {
    pub(crate) fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Add text; returns (text safe to emit, whether a stop string matched).
    /// After a match, the text from the stop string on is discarded.
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(text);
        if let Some(idx) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let out = self.held[..idx].to_string();
            self.held.clear();
            self.stopped = true;
            return (out, true);
        }
        let hold = self.partial_suffix_len();
        let cut = self.held.len() - hold;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a
    /// stop string.
    fn partial_suffix_len(&self) -> usize {
        let h = &self.held;
        let mut best = 0;
        for s in &self.stops {
            for k in (best + 1..s.len().min(h.len() + 1)).rev() {
                if s.is_char_boundary(k) && h.is_char_boundary(h.len() - k) && h.ends_with(&s[..k])
                {
                    best = k;
                    break;
                }
            }
        }
        best
    }

    /// Release held-back text (end of generation without a match).
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}
