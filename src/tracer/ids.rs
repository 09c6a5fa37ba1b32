//! Span ids and their text form: DB-GPT's `trace_id` (32 hex digits) and
//! `span_id` (`<trace_id>:<16 hex digits>`), parsed from the `DB-GPT-Trace-Span-Id` header
//! or a body's `span_id` exactly as DB-GPT accepts them, and generated like
//! `secrets.token_hex`. A [`SpanCtx`] is `Copy` and never allocates.

use axum::http::HeaderValue;

/// Up to `N` ASCII hex digits, kept exactly as received (or generated lowercase).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Hex<const N: usize> {
    len: u8,
    buf: [u8; N],
}

impl<const N: usize> Hex<N> {
    /// The low `4 * N` bits of `v` as `N` lowercase digits (`secrets.token_hex`).
    fn from_bits(mut v: u128) -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [b'0'; N];
        for b in buf.iter_mut().rev() {
            *b = DIGITS[(v & 0xf) as usize];
            v >>= 4;
        }
        Hex { len: N as u8, buf }
    }

    /// 1 to `N` hex digits.
    fn parse(s: &[u8]) -> Option<Self> {
        if s.is_empty() || s.len() > N || !s.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut buf = [b'0'; N];
        buf[..s.len()].copy_from_slice(s);
        Some(Hex {
            len: s.len() as u8,
            buf,
        })
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    fn is_zero(&self) -> bool {
        self.as_bytes().iter().all(|&b| b == b'0')
    }
}

/// A span's identity: DB-GPT's `trace_id` (32 hex digits) and `span_id`, which DB-GPT
/// spells `<trace_id>:<16 hex digits>`. `Copy`, no heap.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SpanCtx {
    pub(super) trace: Hex<32>,
    span: Hex<16>,
}

impl SpanCtx {
    /// A span of a new trace.
    pub(super) fn new_trace() -> Self {
        let mut trace: u128 = rand::random();
        while trace == 0 {
            trace = rand::random();
        }
        SpanCtx {
            trace: Hex::from_bits(trace),
            span: Hex::from_bits(rand::random::<u64>() as u128),
        }
    }

    /// A new span in `parent`'s trace.
    pub(super) fn child_of(parent: &SpanCtx) -> Self {
        SpanCtx {
            trace: parent.trace,
            span: Hex::from_bits(rand::random::<u64>() as u128),
        }
    }

    /// Parses `<trace_id>:<span_id>` as DB-GPT accepts it (hex parts, a non-zero trace).
    /// Anything else is ignored (the request then starts a new trace).
    pub fn parse(s: &[u8]) -> Option<Self> {
        let s = s.trim_ascii();
        let colon = s.iter().position(|&b| b == b':')?;
        let trace = Hex::<32>::parse(&s[..colon])?;
        let span = Hex::<16>::parse(&s[colon + 1..])?;
        (!trace.is_zero()).then_some(SpanCtx { trace, span })
    }

    /// The span with W3C trace-context ids (an OTLP span, a client's `traceparent`):
    /// DB-GPT's widths, 32 and 16 hex digits. `None` for a zero trace id.
    pub fn from_ids(trace: u128, span: u64) -> Option<Self> {
        (trace != 0).then(|| SpanCtx {
            trace: Hex::from_bits(trace),
            span: Hex::from_bits(span as u128),
        })
    }

    /// The ids as numbers, for W3C trace context (`None` when the span id is zero).
    pub fn ids(&self) -> Option<(u128, u64)> {
        let num = |b: &[u8]| u128::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok();
        let trace = num(self.trace.as_bytes())?;
        let span = u64::try_from(num(self.span.as_bytes())?).ok()?;
        (trace != 0 && span != 0).then_some((trace, span))
    }

    /// `<trace_id>:<span_id>` from a JSON body's `span_id` (DB-GPT's clients send it in
    /// `PromptRequest` and `EmbeddingsRequest`).
    pub fn from_body(v: &serde_json::Value) -> Option<Self> {
        v.get("span_id")
            .and_then(serde_json::Value::as_str)
            .and_then(|s| SpanCtx::parse(s.as_bytes()))
    }

    /// The trace id.
    pub fn trace_id(&self) -> &str {
        std::str::from_utf8(self.trace.as_bytes()).unwrap_or_default()
    }

    pub(super) fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.trace.as_bytes());
        out.push(b':');
        out.extend_from_slice(self.span.as_bytes());
    }

    /// The value of [`TRACE_HEADER`](super::TRACE_HEADER) naming this span as the parent.
    pub fn header_value(&self) -> HeaderValue {
        let mut b = Vec::with_capacity(49);
        self.write(&mut b);
        HeaderValue::from_bytes(&b).expect("hex digits and ':' are a valid header value")
    }
}

impl std::fmt::Display for SpanCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut b = Vec::with_capacity(49);
        self.write(&mut b);
        f.write_str(std::str::from_utf8(&b).unwrap_or_default())
    }
}

impl std::fmt::Debug for SpanCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpanCtx({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(s: &str) -> SpanCtx {
        SpanCtx::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn span_ids_parse_and_propagate() {
        let c = ctx(" 00ab:1 ");
        assert_eq!(c.to_string(), "00ab:1");
        assert_eq!(c.trace_id(), "00ab");
        for bad in [
            "",
            "abc",
            "0000:1",
            "xyz:1",
            "ab:",
            ":ab",
            "ab:cd:ef",
            "0123456789abcdef0123456789abcdef0:1",
            "ab:0123456789abcdef0",
        ] {
            assert!(SpanCtx::parse(bad.as_bytes()).is_none(), "{bad:?}");
        }
        let fresh = SpanCtx::new_trace();
        let s = fresh.to_string();
        assert_eq!(s.len(), 49);
        assert!(
            s[..32]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(&s[32..33], ":");
        let kid = SpanCtx::child_of(&fresh);
        assert_eq!(kid.trace_id(), fresh.trace_id());
        assert_ne!(kid, fresh);
        assert_eq!(SpanCtx::parse(s.as_bytes()), Some(fresh));
        assert_eq!(fresh.header_value().to_str().unwrap(), s);
        assert_eq!(
            SpanCtx::from_body(&serde_json::json!({"span_id": s})),
            Some(fresh)
        );
    }

    #[test]
    fn w3c_ids_round_trip() {
        let c = SpanCtx::from_ids(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331).unwrap();
        assert_eq!(
            c.to_string(),
            "0af7651916cd43dd8448eb211c80319c:b7ad6b7169203331"
        );
        assert_eq!(
            c.ids(),
            Some((0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331))
        );
        assert!(SpanCtx::from_ids(0, 1).is_none());
        // DB-GPT's short forms still map onto W3C ids; a zero span id does not.
        assert_eq!(ctx("ab:cd").ids(), Some((0xab, 0xcd)));
        assert_eq!(ctx("ab:0").ids(), None);
    }
}
