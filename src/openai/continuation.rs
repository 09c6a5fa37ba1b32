//! Mid-stream continuation, the protocol side (no I/O): which chat streams may be continued
//! on another worker, the continuation request the apiserver sends, what a proxy model's
//! upstream gets of it, and the reading and rewriting of the SSE chunks relayed around a
//! migration.
//!
//! A continuation request is the client's chat request with the text streamed so far
//! appended as a last `{"role": "assistant", "content": …}` message, plus
//! `continue_final_message: true` and `add_generation_prompt: false` (vLLM's names: render
//! the conversation with that assistant turn left open, no end-of-turn, and generate what
//! follows) and our extension `x_dbgpt_continuation: true`, which asks our worker to account
//! for the final message as output already generated: it counts against `max_tokens` and in
//! `usage.completion_tokens` (not `prompt_tokens`), so the client's usage and length limit
//! are those of one uninterrupted run.
//!
//! Only plain-text chat streams with one choice are continued: `n` > 1 (several choices
//! interleaved), tools (a call may be half sent), log-probabilities and structured output
//! (a grammar cannot resume mid-way) end with an error event instead.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::CompletionRequest;

/// vLLM's field: continue the final (assistant) message instead of opening a new turn.
pub const CONTINUE_FIELD: &str = "continue_final_message";
/// vLLM's field, sent `false` beside [`CONTINUE_FIELD`].
pub const GENERATION_PROMPT_FIELD: &str = "add_generation_prompt";
/// Ours: the final message counts as generated output (in `max_tokens` and `usage`).
pub const ACCOUNTING_FIELD: &str = "x_dbgpt_continuation";

/// Why a stream of this request cannot be continued on another worker (`None`: it can).
pub fn blocker(r: &CompletionRequest, body: &[u8]) -> Option<String> {
    if r.n != 1 {
        return Some("several choices (n > 1) are not continued".into());
    }
    if let Some(field) = &r.native_only {
        return Some(format!(
            "requests with '{field}' are not continued (only plain text is)"
        ));
    }
    // The request parser lets these pass when they ask for nothing special.
    #[derive(serde::Deserialize)]
    struct Extra<'a> {
        #[serde(borrow, default)]
        continue_final_message: Option<&'a serde_json::value::RawValue>,
    }
    match serde_json::from_slice::<Extra<'_>>(body) {
        Ok(e) if e.continue_final_message.is_some_and(|v| v.get() == "true") => {
            Some("a request that continues a final message itself is not continued".into())
        }
        _ => None,
    }
}

/// The continuation request: the client's chat `body` with `partial` (the text streamed so
/// far) as an open final assistant message (see the module documentation). `None` when the
/// body is not a JSON object with a `messages` list (it was validated, so never in practice).
pub fn request(body: &[u8], partial: &str) -> Option<Bytes> {
    let mut m: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let msgs = m.get_mut("messages")?.as_array_mut()?;
    msgs.push(serde_json::json!({"role": "assistant", "content": partial}));
    m.insert(CONTINUE_FIELD.into(), Value::Bool(true));
    m.insert(GENERATION_PROMPT_FIELD.into(), Value::Bool(false));
    m.insert(ACCOUNTING_FIELD.into(), Value::Bool(true));
    serde_json::to_vec(&m).ok().map(Bytes::from)
}

/// What an OpenAI-compatible upstream gets of a continuation request (a proxy model): the
/// assistant prefill message stays, our three fields go (an upstream may refuse fields it
/// does not know; how it treats a trailing assistant message is its own: best effort).
/// `None` when `body` is not a continuation request (it goes upstream unchanged).
pub fn for_upstream(body: &[u8]) -> Option<Bytes> {
    #[derive(serde::Deserialize)]
    struct Marker<'a> {
        #[serde(borrow, default)]
        x_dbgpt_continuation: Option<&'a serde_json::value::RawValue>,
    }
    serde_json::from_slice::<Marker<'_>>(body)
        .ok()?
        .x_dbgpt_continuation?;
    let mut m: Map<String, Value> = serde_json::from_slice(body).ok()?;
    for f in [CONTINUE_FIELD, GENERATION_PROMPT_FIELD, ACCOUNTING_FIELD] {
        m.shift_remove(f);
    }
    serde_json::to_vec(&m).ok().map(Bytes::from)
}

/// One SSE event of a relayed chat stream.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// `data: [DONE]`.
    Done,
    /// A chunk (a JSON object without `error`).
    Chunk(Map<String, Value>),
    /// An error object (`{"error": …}`): the worker gave up.
    Error,
    /// Anything else (a comment, a keep-alive, an unparsable payload): relayed as it is.
    Other,
}

/// Splits the first complete SSE event (up to and including its blank line) off `buf`.
pub fn next_event(buf: &mut bytes::BytesMut) -> Option<Bytes> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            // "\n\n" or "\n\r\n" ends the event.
            let rest = &buf[i + 1..];
            let end = if rest.first() == Some(&b'\n') {
                Some(i + 2)
            } else if rest.starts_with(b"\r\n") {
                Some(i + 3)
            } else {
                None
            };
            if let Some(end) = end {
                return Some(buf.split_to(end).freeze());
            }
        }
        i += 1;
    }
    None
}

/// The `data:` payload of an event (several `data:` lines joined by `\n`).
fn data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut out: Option<String> = None;
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data:") {
            let d = d.strip_prefix(' ').unwrap_or(d);
            match &mut out {
                Some(o) => {
                    o.push('\n');
                    o.push_str(d);
                }
                None => out = Some(d.to_string()),
            }
        }
    }
    out
}

/// Reads one event.
pub fn classify(event: &[u8]) -> Event {
    let Some(d) = data(event) else {
        return Event::Other;
    };
    if d.trim() == "[DONE]" {
        return Event::Done;
    }
    match serde_json::from_str::<Map<String, Value>>(&d) {
        Ok(m) if m.contains_key("error") => Event::Error,
        Ok(m) => Event::Chunk(m),
        Err(_) => Event::Other,
    }
}

/// What a chunk of choice 0 carries, as the relay tracks it.
#[derive(Debug, Default, PartialEq)]
pub struct Seen {
    /// `delta.content` text.
    pub content: String,
    /// A `finish_reason` was set.
    pub finished: bool,
    /// A non-null `usage`.
    pub usage: bool,
    /// A delta field other than `role` and `content` (tool calls, reasoning, refusal…): the
    /// stream is no longer plain text.
    pub not_text: bool,
}

/// Reads a chunk (the envelope fields are left alone).
pub fn seen(chunk: &Map<String, Value>) -> Seen {
    let mut s = Seen {
        usage: chunk.get("usage").is_some_and(|u| !u.is_null()),
        ..Default::default()
    };
    let Some(Value::Array(choices)) = chunk.get("choices") else {
        return s;
    };
    for c in choices {
        if c.get("index").and_then(Value::as_u64).unwrap_or(0) != 0 {
            s.not_text = true;
            continue;
        }
        s.finished |= c.get("finish_reason").is_some_and(|f| !f.is_null());
        if let Some(Value::Object(d)) = c.get("delta") {
            for (k, v) in d {
                match (k.as_str(), v) {
                    ("content", Value::String(t)) => s.content.push_str(t),
                    ("role" | "content", _) | (_, Value::Null) => {}
                    (_, Value::Array(a)) if a.is_empty() => {}
                    _ => s.not_text = true,
                }
            }
        }
    }
    s
}

/// [`classify`] and [`seen`] in one pass over a chunk that is relayed as it is (no rename, no
/// envelope to impose): the event's `data:` payload is read in place into borrowed views of
/// the few fields [`Seen`] needs, not built into a map of values; the text is appended to
/// `text`. `None` when the event is not one `data:` line holding such a chunk (`[DONE]`, an
/// error object, a comment, a shape the views do not take): then [`classify`] reads it, so
/// both give the same answer for every event. Most events of a long stream take this path.
pub fn glance(event: &[u8], text: &mut String) -> Option<Seen> {
    let mut lines = event
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty() && l != b"\r");
    let line = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let payload = line.strip_prefix(b"data:")?;
    let view: ChunkView<'_> = serde_json::from_slice(payload).ok()?;
    if view.error {
        return None;
    }
    let mut s = Seen {
        usage: view.usage.is_some(),
        ..Default::default()
    };
    for c in view.choices.unwrap_or_default() {
        if c.index.unwrap_or(0) != 0 {
            s.not_text = true;
            continue;
        }
        s.finished |= c.finish_reason.is_some();
        if let Some(d) = c.delta {
            text.push_str(&d.content);
            s.not_text |= d.not_text;
        }
    }
    Some(s)
}

/// The fields of a chunk [`glance`] reads.
#[derive(serde::Deserialize)]
struct ChunkView<'a> {
    #[serde(default, deserialize_with = "present")]
    error: bool,
    #[serde(default)]
    usage: Option<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    choices: Option<Vec<ChoiceView<'a>>>,
}

#[derive(serde::Deserialize)]
struct ChoiceView<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    finish_reason: Option<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    delta: Option<DeltaView<'a>>,
}

/// A delta as [`seen`] reads it: the `content` text, and whether any field but `role` and
/// `content` holds something (not null, not an empty list).
#[derive(Default)]
struct DeltaView<'a> {
    content: std::borrow::Cow<'a, str>,
    not_text: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

use serde::Deserialize as _;

impl<'de: 'a, 'a> serde::Deserialize<'de> for DeltaView<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = DeltaView<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a delta object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = DeltaView::default();
                while let Some(key) = m.next_key::<&'de str>()? {
                    match (key, m.next_value::<Piece<'de>>()?) {
                        ("content", Piece::Text(t)) => {
                            if out.content.is_empty() {
                                out.content = t;
                            } else {
                                out.content.to_mut().push_str(&t);
                            }
                        }
                        ("role" | "content", _) | (_, Piece::Nothing) => {}
                        _ => out.not_text = true,
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A delta field's value, as far as [`seen`] distinguishes them.
enum Piece<'a> {
    Text(std::borrow::Cow<'a, str>),
    /// `null` or `[]`.
    Nothing,
    Something,
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Piece<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Piece<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Piece::Text(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Piece::Text(v.to_owned().into()))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Piece::Nothing)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Piece::Nothing)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Piece::Something)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Piece::Something)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Piece::Something)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Piece::Something)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                let mut empty = true;
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    empty = false;
                }
                Ok(if empty {
                    Piece::Nothing
                } else {
                    Piece::Something
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                while m
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Piece::Something)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// The envelope of the stream the client sees: the first chunk's `id`, `created`, `model`
/// (and `system_fingerprint`), which a continuation's chunks are given.
#[derive(Debug, Default, Clone)]
pub struct Envelope(Vec<(String, Value)>);

const ENVELOPE_KEYS: [&str; 4] = ["id", "created", "model", "system_fingerprint"];

impl Envelope {
    /// Whether a chunk's envelope fields were noted.
    pub fn is_noted(&self) -> bool {
        !self.0.is_empty()
    }

    /// Notes the envelope fields of the first chunk that has them.
    pub fn note(&mut self, chunk: &Map<String, Value>) {
        if self.0.is_empty() {
            self.0 = ENVELOPE_KEYS
                .iter()
                .filter_map(|k| chunk.get(*k).map(|v| (k.to_string(), v.clone())))
                .collect();
        }
    }

    /// A continuation's chunk as the client's stream goes on: this envelope, no second
    /// `role`; `None` when nothing is left to send (the continuation's opening chunk).
    pub fn rewrite(&self, mut chunk: Map<String, Value>) -> Option<Bytes> {
        for (k, v) in &self.0 {
            if let Some(slot) = chunk.get_mut(k) {
                *slot = v.clone();
            }
        }
        let mut empty = true;
        if let Some(Value::Array(choices)) = chunk.get_mut("choices") {
            for c in choices.iter_mut() {
                let finish = c.get("finish_reason").is_some_and(|f| !f.is_null());
                if let Some(Value::Object(d)) = c.get_mut("delta") {
                    d.shift_remove("role");
                    let has_text = d.values().any(|v| match v {
                        Value::String(s) => !s.is_empty(),
                        Value::Null => false,
                        _ => true,
                    });
                    empty &= !has_text && !finish;
                } else {
                    empty = false;
                }
            }
        } else {
            empty = false;
        }
        if empty && chunk.get("usage").is_none_or(Value::is_null) {
            return None;
        }
        Some(super::response::sse(&Value::Object(chunk)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn parse(body: &[u8]) -> CompletionRequest {
        super::super::parse_chat(body).unwrap()
    }

    #[test]
    fn only_plain_single_choice_chats_are_continued() {
        let ok = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        assert_eq!(blocker(&parse(ok), ok), None);
        for (body, why) in [
            (
                &br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":2}"#[..],
                "n > 1",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[]}"#,
                "'tools'",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"logprobs":true}"#,
                "'logprobs'",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"}}"#,
                "'response_format'",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"continue_final_message":true}"#,
                "itself",
            ),
        ] {
            let b = blocker(&parse(body), body).expect("blocked");
            assert!(b.contains(why), "{b}");
        }
    }

    #[test]
    fn the_continuation_request_appends_the_partial_text() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":9}"#;
        let c = request(body, "Hello, wor").unwrap();
        let v: Value = serde_json::from_slice(&c).unwrap();
        assert_eq!(
            v["messages"][1],
            serde_json::json!({"role":"assistant","content":"Hello, wor"})
        );
        assert_eq!(v["continue_final_message"], true);
        assert_eq!(v["add_generation_prompt"], false);
        assert_eq!(v["x_dbgpt_continuation"], true);
        assert_eq!(v["max_tokens"], 9);
        // The upstream of a proxy model gets the prefill without our fields.
        let up: Value = serde_json::from_slice(&for_upstream(&c).unwrap()).unwrap();
        assert_eq!(up["messages"][1]["content"], "Hello, wor");
        assert!(up.get("continue_final_message").is_none());
        assert!(up.get("x_dbgpt_continuation").is_none());
        assert!(for_upstream(body).is_none(), "a plain request is untouched");
    }

    #[test]
    fn events_are_split_and_read() {
        let mut buf = BytesMut::from(
            &b"data: {\"id\":\"a\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n: ping\r\n\r\ndata: [DONE]\n\ndata: {\"par"[..],
        );
        let e1 = next_event(&mut buf).unwrap();
        let Event::Chunk(c) = classify(&e1) else {
            panic!("a chunk")
        };
        assert_eq!(seen(&c).content, "Hi");
        assert_eq!(classify(&next_event(&mut buf).unwrap()), Event::Other);
        assert_eq!(classify(&next_event(&mut buf).unwrap()), Event::Done);
        assert!(next_event(&mut buf).is_none(), "a partial event waits");
        assert_eq!(&buf[..], b"data: {\"par");
        assert_eq!(
            classify(b"data: {\"error\":{\"message\":\"x\"}}\n\n"),
            Event::Error
        );
    }

    #[test]
    fn chunks_are_tracked_and_rewritten() {
        let chunk = |s: &str| -> Map<String, Value> { serde_json::from_str(s).unwrap() };
        let tool = chunk(
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]},"finish_reason":null}]}"#,
        );
        assert!(seen(&tool).not_text);
        let fin =
            chunk(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#);
        let s = seen(&fin);
        assert!(s.finished && !s.usage && !s.not_text);

        let mut env = Envelope::default();
        env.note(&chunk(
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[]}"#,
        ));
        // The continuation's opening chunk is dropped; its text chunks get the envelope.
        let open = chunk(
            r#"{"id":"chatcmpl-2","created":2,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        );
        assert!(env.rewrite(open).is_none());
        let text = chunk(
            r#"{"id":"chatcmpl-2","created":2,"model":"m","choices":[{"index":0,"delta":{"content":"ld"},"finish_reason":null}]}"#,
        );
        let out = env.rewrite(text).unwrap();
        let v: Value = serde_json::from_slice(&out[6..out.len() - 2]).unwrap();
        assert_eq!(v["id"], "chatcmpl-1");
        assert_eq!(v["created"], 1);
        assert_eq!(v["choices"][0]["delta"]["content"], "ld");
        // A usage chunk (no choices) goes through.
        let usage =
            chunk(r#"{"id":"x","created":2,"model":"m","choices":[],"usage":{"prompt_tokens":1}}"#);
        assert!(env.rewrite(usage).is_some());
    }

    /// `glance` gives what `classify` + `seen` give whenever it answers, and answers for the
    /// usual chunk shapes (so relayed streams take it).
    #[test]
    fn glance_agrees_with_classify_and_seen() {
        let usual = [
            r#"data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}"#,
            r#"data:{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"data: {"choices":[{"index":0,"delta":{"content":"a\"b\n\u00e9"},"finish_reason":null}]}"#,
            r#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
            r#"data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#,
            r#"data: {"choices":[{"index":0,"delta":{"tool_calls":[],"reasoning_content":null,"content":"x"}}]}"#,
            r#"data: {"choices":[{"index":1,"delta":{"content":"other"}}]}"#,
            r#"data: {"choices":[{"index":0,"delta":{"refusal":"no"}}]}"#,
            r#"data: {"choices":[{"index":0,"delta":{"content":null}}]}"#,
            r#"data: {"choices":[{"index":0,"delta":{"content":["x"]}}]}"#,
            r#"data: {"choices":[{"delta":{"content":"no index"}}],"choices_extra":1}"#,
            r#"data: {"choices":null}"#,
        ];
        let other = [
            "data: [DONE]",
            r#"data: {"error":{"message":"x"}}"#,
            r#"data: {"error":null,"choices":[]}"#,
            ": ping",
            "event: x\ndata: {\"choices\":[]}",
            "data: {\"choices\":[]}\ndata: {\"x\":1}",
            r#"data: {"choices":{"0":1}}"#,
            r#"data: {"choices":[{"index":-1,"delta":{"content":"neg"}}]}"#,
            r#"data: {"choices":[{"index":0,"delta":"text"}]}"#,
            r#"data: {"choices":[{"index":0,"delta":{"con\u0074ent":"escaped key"}}]}"#,
            r#"data: {"choices":[{"index":0"#,
            "data: not json",
        ];
        for (i, e) in usual.iter().chain(&other).enumerate() {
            for sep in ["\n", "\r\n"] {
                let ev = format!("{}{sep}{sep}", e.replace('\n', sep));
                let mut text = String::new();
                let fast = glance(ev.as_bytes(), &mut text);
                assert_eq!(fast.is_some(), i < usual.len(), "event {i}: {e}");
                if let Some(s) = fast {
                    let Event::Chunk(c) = classify(ev.as_bytes()) else {
                        panic!("event {i} is a chunk to classify too")
                    };
                    let slow = seen(&c);
                    assert_eq!(text, slow.content, "event {i}");
                    assert_eq!(Seen { content: text, ..s }, slow, "event {i}");
                }
            }
        }
    }
}
