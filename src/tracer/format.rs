//! The tracer file's line format: one span as the JSON line DB-GPT's `Span.to_dict()`
//! gives through `json.dumps` (its key order and `", "`/`": "` spacing, local times with
//! milliseconds, `end_time: null` on the start line), and a span's [`Meta`]data.

use std::io::Write;

use axum::extract::MatchedPath;
use serde::Serialize;

use super::SpanCtx;
use crate::wire::controller::{LocalOffsets, Timestamp};

/// A span's `metadata`, written identically on its start and end lines.
pub enum Meta {
    /// `null` (DB-GPT writes `null` for empty metadata).
    None,
    /// `{"path": …}` of a root span, borrowed from the route (no allocation).
    Route(MatchedPath),
    /// `{"path": …}` of a root span on a path no route matched.
    Path(String),
    /// A JSON object already rendered in `json.dumps` spacing ([`Meta::json`]).
    Json(String),
}

impl Meta {
    /// Renders `v` (a struct or map: skip `None` fields, as DB-GPT drops them).
    pub fn json<T: Serialize + ?Sized>(v: &T) -> Meta {
        Meta::Json(py_json(v))
    }

    fn write(&self, out: &mut Vec<u8>) {
        let path = match self {
            Meta::None => return out.extend_from_slice(b"null"),
            Meta::Json(s) => return out.extend_from_slice(s.as_bytes()),
            Meta::Route(m) => m.as_str(),
            Meta::Path(p) => p.as_str(),
        };
        out.extend_from_slice(b"{\"path\": ");
        write_json_str(out, path);
        out.push(b'}');
    }
}

/// serde_json with Python's `json.dumps` separators (`", "` and `": "`); strings are
/// escaped like `ensure_ascii=False` (UTF-8 as is, control characters escaped).
struct PyFormatter;

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `json.dumps(v, ensure_ascii=False)`.
pub fn py_json<T: Serialize + ?Sized>(v: &T) -> String {
    let mut out = Vec::with_capacity(64);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
    if v.serialize(&mut ser).is_err() {
        return "null".into();
    }
    String::from_utf8(out).unwrap_or_else(|_| "null".into())
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// One line of the tracer file, in the key order of DB-GPT's `Span.to_dict()`.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_line(
    out: &mut Vec<u8>,
    offsets: &mut LocalOffsets,
    ctx: &SpanCtx,
    parent: Option<&SpanCtx>,
    operation: &str,
    start: Timestamp,
    end: Option<Timestamp>,
    meta: &Meta,
) {
    out.extend_from_slice(b"{\"span_type\": \"base\", \"trace_id\": \"");
    out.extend_from_slice(ctx.trace.as_bytes());
    out.extend_from_slice(b"\", \"span_id\": \"");
    ctx.write(out);
    out.extend_from_slice(b"\", \"parent_span_id\": ");
    match parent {
        None => out.extend_from_slice(b"null"),
        Some(p) => {
            out.push(b'"');
            p.write(out);
            out.push(b'"');
        }
    }
    out.extend_from_slice(b", \"operation_name\": ");
    write_json_str(out, operation);
    out.extend_from_slice(b", \"start_time\": \"");
    start.write_local_millis(out, offsets);
    out.extend_from_slice(b"\", \"end_time\": ");
    match end {
        None => out.extend_from_slice(b"null"),
        Some(t) => {
            out.push(b'"');
            t.write_local_millis(out, offsets);
            out.push(b'"');
        }
    }
    out.extend_from_slice(b", \"metadata\": ");
    meta.write(out);
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracer::CONTROLLER_ROOT;
    use chrono::{Local, NaiveDateTime, TimeZone};

    fn local_micros(s: &str) -> Timestamp {
        let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap();
        Timestamp(
            Local
                .from_local_datetime(&naive)
                .earliest()
                .unwrap()
                .timestamp_micros(),
        )
    }

    fn ctx(s: &str) -> SpanCtx {
        SpanCtx::parse(s.as_bytes()).unwrap()
    }

    /// The same spans as DB-GPT writes them: the fixture lines are Python 3.11's
    /// `json.dumps(d, ensure_ascii=False)` of dicts in `Span.to_dict()`'s key order (a root
    /// span, and a finished child with metadata that needs escaping).
    #[test]
    fn lines_match_dbgpt_byte_for_byte() {
        let fixture_start = r#"{"span_type": "base", "trace_id": "6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f", "span_id": "6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f:0123456789abcdef", "parent_span_id": null, "operation_name": "DB-GPT-ModelController", "start_time": "2026-11-22 02:40:05.996", "end_time": null, "metadata": {"path": "/api/controller/models"}}"#;
        let fixture_end = r#"{"span_type": "base", "trace_id": "6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f", "span_id": "6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f:fedcba9876543210", "parent_span_id": "6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f:0123456789abcdef", "operation_name": "dbgpt.model.controller.register_instance", "start_time": "2026-11-22 02:40:05.997", "end_time": "2026-11-22 02:40:06.010", "metadata": {"model_name": "smollm2@llm", "host": "127.0.0.1", "port": 8001, "weight": 1.0, "check_healthy": true, "enabled": true, "prompt_template": "q\"uoé\n\u0001"}}"#;
        let root = ctx("6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f:0123456789abcdef");
        let child = ctx("6a1f1f0e6b5c4c7d9e3f2a1b0c9d8e7f:fedcba9876543210");
        let mut out = Vec::new();
        let mut off = LocalOffsets::default();
        write_line(
            &mut out,
            &mut off,
            &root,
            None,
            CONTROLLER_ROOT,
            local_micros("2026-11-22 02:40:05.996999"),
            None,
            &Meta::Path("/api/controller/models".into()),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{fixture_start}\n")
        );

        #[derive(Serialize)]
        struct M<'a> {
            model_name: &'a str,
            host: &'a str,
            port: u16,
            weight: f64,
            check_healthy: bool,
            enabled: bool,
            prompt_template: &'a str,
        }
        let meta = Meta::json(&M {
            model_name: "smollm2@llm",
            host: "127.0.0.1",
            port: 8001,
            weight: 1.0,
            check_healthy: true,
            enabled: true,
            prompt_template: "q\"uo\u{e9}\n\u{1}",
        });
        let mut out = Vec::new();
        write_line(
            &mut out,
            &mut off,
            &child,
            Some(&root),
            "dbgpt.model.controller.register_instance",
            local_micros("2026-11-22 02:40:05.997000"),
            Some(local_micros("2026-11-22 02:40:06.010500")),
            &meta,
        );
        // ensure_ascii=False: "é" as UTF-8, control characters escaped.
        assert_eq!(String::from_utf8(out).unwrap(), format!("{fixture_end}\n"));
    }

    #[test]
    fn python_separators_for_nested_values() {
        let v = serde_json::json!({"a": [1, 2.5, "x"], "b": {"c": null, "d": false}, "e": []});
        assert_eq!(
            py_json(&v),
            r#"{"a": [1, 2.5, "x"], "b": {"c": null, "d": false}, "e": []}"#
        );
    }
}
