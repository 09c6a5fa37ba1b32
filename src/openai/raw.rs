//! OpenAI request bodies handled as bytes: the few top-level fields a relay needs (`model`,
//! `stream`) read without building the rest, and the `model` value replaced in place, so a
//! request passed through (apiserver → worker → upstream) keeps every other byte the client
//! sent, unknown fields, key order and number spelling included.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::OpenAiError;

/// The top-level fields of an OpenAI request a relay reads; the rest is skipped unparsed.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
}

/// Where the `model` value sits in a body, and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelField {
    /// The model name (unescaped, trimmed as the apiserver trims it).
    pub name: String,
    /// Byte range of the JSON value (the quoted string) in the body.
    pub span: std::ops::Range<usize>,
}

/// Finds the top-level `model` of a JSON object body: 400 naming `body` for a body that is
/// not a JSON object, `model` when it is missing or not a non-empty string.
pub fn model_field(body: &[u8]) -> Result<ModelField, OpenAiError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(OpenAiError::invalid(
            "body",
            "invalid_json",
            "The request body must be a JSON object",
        ));
    }
    let head: Head<'_> = serde_json::from_slice(body).map_err(|e| {
        OpenAiError::invalid(
            "body",
            "invalid_json",
            format!("The request body is not a valid JSON object: {e}"),
        )
    })?;
    let Some(raw) = head.model else {
        return Err(OpenAiError::invalid(
            "model",
            "missing_required_parameter",
            "Missing required parameter: 'model'",
        ));
    };
    let name = match serde_json::from_str::<String>(raw.get()) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => {
            return Err(OpenAiError::invalid(
                "model",
                "invalid_value",
                "'model' must be a non-empty string",
            ));
        }
    };
    // A borrowed RawValue is a slice of `body`: its offset is where the value starts.
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    Ok(ModelField {
        name,
        span: start..start + raw.get().len(),
    })
}

/// Whether a (valid) request body asks for a stream (`"stream": true` at the top level).
pub fn asks_stream(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Stream<'a> {
        #[serde(borrow, default)]
        stream: Option<&'a RawValue>,
    }
    serde_json::from_slice::<Stream<'_>>(body)
        .ok()
        .and_then(|s| s.stream)
        .is_some_and(|v| v.get() == "true")
}

/// `body` with the `model` value at `field` replaced by `model` (every other byte kept).
pub fn with_model(body: &Bytes, field: &ModelField, model: &str) -> Bytes {
    if field.name == model {
        return body.clone();
    }
    let quoted = serde_json::to_string(model).expect("a string serialises");
    let mut out = BytesMut::with_capacity(body.len() + quoted.len());
    out.extend_from_slice(&body[..field.span.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[field.span.end..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_found_and_replaced_keeping_every_other_byte() {
        let body = Bytes::from_static(
            br#"{ "x_vendor": {"model": "inner"}, "model" : "gpt\u0034", "n": 1.50, "tools":[] }"#,
        );
        let f = model_field(&body).unwrap();
        assert_eq!(f.name, "gpt4");
        assert_eq!(&body[f.span.clone()], br#""gpt\u0034""#);
        let out = with_model(&body, &f, "up\"stream");
        assert_eq!(
            &out[..],
            br#"{ "x_vendor": {"model": "inner"}, "model" : "up\"stream", "n": 1.50, "tools":[] }"#
        );
        // Same name: the very same bytes.
        let same = with_model(&body, &f, "gpt4");
        assert_eq!(same.as_ptr(), body.as_ptr());
    }

    #[test]
    fn the_stream_flag_is_read() {
        assert!(asks_stream(br#"{"x":{"stream":false},"stream" : true}"#));
        assert!(!asks_stream(br#"{"x":{"stream":true},"stream":false}"#));
        assert!(!asks_stream(br#"{"model":"m"}"#));
        assert!(!asks_stream(br#"{"stream":"true"}"#));
    }

    #[test]
    fn bad_bodies_name_the_field() {
        for (body, param) in [
            (&b"[1]"[..], "body"),
            (b"{", "body"),
            (b"{}", "model"),
            (br#"{"model": 3}"#, "model"),
            (br#"{"model": " "}"#, "model"),
            (br#"{"model": null}"#, "model"),
        ] {
            let e = model_field(body).unwrap_err();
            assert_eq!(
                e.body()["error"]["param"],
                param,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
