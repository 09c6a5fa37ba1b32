//! The controller protocol (DB-GPT 0.5.10's `/api/controller/*`), used by the controller,
//! its client (workers, the apiserver, the CLI) and the registry stores.
//!
//! It owns what a registry entry looks like on the wire ([`ModelInstance`], nine keys in
//! DB-GPT's order), what a register, heartbeat or deregister request carries after validation
//! ([`InstanceInput`]), the registry identity ([`InstanceKey`]), worker keys (`name@type`,
//! [`worker_key`], [`manager_key`]), the timestamp format ([`Timestamp`], Python's
//! `isoformat()` of local time) and the route paths. Field names, key order, defaults and the
//! timestamp format are part of the contract (see `shared/reference/dbgpt-cluster.md` §3).
//! Parsing from untrusted JSON goes through [`crate::validate`] so errors come out
//! FastAPI-shaped; serialisation uses serde with fields in wire order.

use chrono::{DateTime, Datelike, Local, Timelike, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::validate::{Fields, ValidationErrors};

/// Suffix separator of worker keys: `name@type`.
pub const KEY_SEPARATOR: char = '@';
/// Registry name of a worker manager process (`WorkerManager@service`).
pub const WORKER_MANAGER_NAME: &str = "WorkerManager";
/// Pseudo worker type of worker-manager registry entries.
pub const WORKER_MANAGER_TYPE: &str = "service";

/// `POST` registers an instance, `DELETE` deregisters it, `GET` lists instances.
pub const MODELS_PATH: &str = "/api/controller/models";
/// `POST` renews an instance's heartbeat.
pub const HEARTBEAT_PATH: &str = "/api/controller/heartbeat";

/// Longest `model_name` accepted at registration, in characters: DB-GPT's own SQL column
/// (`varchar(128)`), so every store keeps what it acknowledged, and small enough that a
/// deregistration carrying the name, the host and the prompt template in its query string
/// (DB-GPT's client sends the whole instance there) stays far below hyper's 64 KiB
/// request-target limit even when every character is 4 bytes, percent-encoded.
pub const MAX_MODEL_NAME_CHARS: usize = 128;
/// Longest `host` accepted, in characters (DB-GPT's `varchar(128)` column).
pub const MAX_HOST_CHARS: usize = 128;
/// Longest `prompt_template` accepted, in characters (our SQL column's `varchar(512)`).
pub const MAX_PROMPT_TEMPLATE_CHARS: usize = 512;

/// Whether the fields that travel in a deregistration's query string are within bounds.
fn within_bounds(model_name: &str, host: &str, prompt_template: Option<&str>) -> bool {
    let fits = |s: &str, max: usize| s.chars().nth(max).is_none();
    fits(model_name, MAX_MODEL_NAME_CHARS)
        && fits(host, MAX_HOST_CHARS)
        && prompt_template.is_none_or(|t| fits(t, MAX_PROMPT_TEMPLATE_CHARS))
}

/// Microseconds since the Unix epoch (UTC). Rendered on the wire as DB-GPT does: the
/// controller's *local* naive time, `datetime.isoformat()` style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        Timestamp(Utc::now().timestamp_micros())
    }

    /// Python's `datetime.isoformat()` of the local naive time: microseconds are printed
    /// only when non-zero, exactly like Python.
    ///
    /// Hot path (once per instance in every listing): the digits are written by hand
    /// instead of through chrono's `format`, whose strftime parsing dominated a listing.
    pub fn to_local_iso(self) -> String {
        let mut out = Vec::with_capacity(26);
        self.write_local_iso(&mut out, &mut LocalOffsets::default());
        String::from_utf8(out).unwrap_or_default()
    }

    /// [`Timestamp::to_local_iso`] appended to `out`, with the local UTC offset looked up
    /// once per 15-minute bucket (time-zone transitions fall on quarter hours), so a
    /// listing of many recent timestamps asks the time-zone database once or twice.
    pub fn write_local_iso(self, out: &mut Vec<u8>, offsets: &mut LocalOffsets) {
        let local = self.local_naive(offsets);
        let whole = self.0.rem_euclid(1_000_000) == 0;
        if !(0..=9999).contains(&local.year()) {
            // Outside what `%Y` prints as four plain digits: let chrono do it.
            let fmt = if whole {
                "%Y-%m-%dT%H:%M:%S"
            } else {
                "%Y-%m-%dT%H:%M:%S%.6f"
            };
            out.extend_from_slice(local.format(fmt).to_string().as_bytes());
            return;
        }
        // "YYYY-MM-DDTHH:MM:SS.ffffff" written by hand (chrono's strftime dominated a
        // listing).
        let mut buf = *b"0000-00-00T00:00:00.000000";
        put_date_time(&mut buf, &local);
        let len = if whole {
            19
        } else {
            put_digits(&mut buf[20..26], local.nanosecond() % 1_000_000_000 / 1000);
            26
        };
        out.extend_from_slice(&buf[..len]);
    }

    /// Local naive time with milliseconds, `YYYY-MM-DD HH:MM:SS.mmm`, appended to `out`:
    /// Python's `strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]` (truncated, not rounded), the
    /// format of DB-GPT's tracer file.
    pub fn write_local_millis(self, out: &mut Vec<u8>, offsets: &mut LocalOffsets) {
        let local = self.local_naive(offsets);
        if !(0..=9999).contains(&local.year()) {
            out.extend_from_slice(local.format("%Y-%m-%d %H:%M:%S%.3f").to_string().as_bytes());
            return;
        }
        let mut buf = *b"0000-00-00 00:00:00.000";
        put_date_time(&mut buf, &local);
        put_digits(
            &mut buf[20..23],
            local.nanosecond() % 1_000_000_000 / 1_000_000,
        );
        out.extend_from_slice(&buf);
    }

    /// The local naive date-time of this instant.
    fn local_naive(self, offsets: &mut LocalOffsets) -> chrono::NaiveDateTime {
        let utc = DateTime::<Utc>::from_timestamp_micros(self.0).unwrap_or_default();
        let offset = offsets.get(self.0, &utc);
        utc.naive_utc() + chrono::TimeDelta::seconds(offset as i64)
    }

    /// Seconds elapsed from `self` to `now` (negative if `self` is in the future).
    pub fn secs_until(self, now: Timestamp) -> f64 {
        (now.0 - self.0) as f64 / 1e6
    }
}

/// Memo of the local UTC offset (seconds) for the last 15-minute bucket looked up.
#[derive(Debug, Default)]
pub struct LocalOffsets {
    bucket: Option<i64>,
    offset: i32,
}

impl LocalOffsets {
    fn get(&mut self, micros: i64, utc: &DateTime<Utc>) -> i32 {
        use chrono::{Offset, TimeZone};
        let bucket = micros.div_euclid(900_000_000);
        if self.bucket != Some(bucket) {
            self.offset = Local
                .offset_from_utc_datetime(&utc.naive_utc())
                .fix()
                .local_minus_utc();
            self.bucket = Some(bucket);
        }
        self.offset
    }
}

/// Writes `v` as zero-padded decimal digits filling `buf`.
fn put_digits(buf: &mut [u8], mut v: u32) {
    for b in buf.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Fills `YYYY-MM-DD?HH:MM:SS` (the first 19 bytes of `buf`) from `t`.
fn put_date_time(buf: &mut [u8], t: &chrono::NaiveDateTime) {
    put_digits(&mut buf[0..4], t.year() as u32);
    put_digits(&mut buf[5..7], t.month());
    put_digits(&mut buf[8..10], t.day());
    put_digits(&mut buf[11..13], t.hour());
    put_digits(&mut buf[14..16], t.minute());
    put_digits(&mut buf[17..19], t.second());
}

/// A model instance as DB-GPT's controller returns it: nine keys, in this order.
/// `last_heartbeat` is the rendered local naive time (a string), as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInstance {
    pub model_name: String,
    pub host: String,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: Option<f64>,
    #[serde(default = "default_true")]
    pub check_healthy: Option<bool>,
    #[serde(default = "default_false")]
    pub healthy: Option<bool>,
    #[serde(default = "default_true")]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub prompt_template: Option<String>,
    #[serde(default)]
    pub last_heartbeat: Option<String>,
}

fn default_weight() -> Option<f64> {
    Some(1.0)
}
fn default_true() -> Option<bool> {
    Some(true)
}
fn default_false() -> Option<bool> {
    Some(false)
}

/// What a register, heartbeat or deregister request carries, after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceInput {
    pub model_name: String,
    pub host: String,
    pub port: u16,
    pub weight: Option<f64>,
    pub check_healthy: Option<bool>,
    pub enabled: Option<bool>,
    pub prompt_template: Option<String>,
    /// DB-GPT 0.7+: on DELETE, really remove the entry instead of marking it unhealthy.
    pub remove_from_registry: bool,
}

impl InstanceInput {
    /// Validates a ModelInstance JSON object (body or query string) with DB-GPT's
    /// defaults and lenient coercions. `origin` is `"body"` or `"query"`.
    /// Unknown keys are ignored; a client-sent `healthy` or `last_heartbeat` is ignored
    /// because the server sets both.
    pub fn from_json(origin: &'static str, v: &Value) -> Result<Self, ValidationErrors> {
        let mut f = Fields::new(origin, v);
        let model_name = f.req_str("model_name");
        let host = f.req_str("host");
        let port = f.req_int("port", 0, 65535) as u16;
        // In a query string, DB-GPT's client sends None as an empty value: treat "" as null
        // for the optional fields there.
        let blank =
            |name: &str| origin == "query" && v.get(name).and_then(Value::as_str) == Some("");
        let weight = if blank("weight") {
            None
        } else if f.raw("weight").is_none() {
            Some(1.0)
        } else {
            f.opt_float("weight")
        };
        let check_healthy = if blank("check_healthy") {
            None
        } else if f.raw("check_healthy").is_none() {
            Some(true)
        } else {
            f.opt_bool("check_healthy")
        };
        let enabled = if blank("enabled") {
            None
        } else if f.raw("enabled").is_none() {
            Some(true)
        } else {
            f.opt_bool("enabled")
        };
        let prompt_template = if blank("prompt_template") {
            None
        } else {
            f.opt_str("prompt_template")
        };
        // Validated for type only (pydantic would reject garbage here too).
        if !blank("healthy") {
            f.opt_bool("healthy");
        }
        let remove_from_registry = if blank("remove_from_registry") {
            false
        } else {
            f.opt_bool("remove_from_registry").unwrap_or(false)
        };
        // What registers (a body: register, heartbeat) is bounded, so that whatever is
        // registered can be deregistered again (see [`MAX_MODEL_NAME_CHARS`]) and fits
        // DB-GPT's SQL columns. A deregistration (query) is not: it may remove an entry
        // registered before the bounds existed.
        if origin == "body" {
            f.max_chars("model_name", model_name.trim(), MAX_MODEL_NAME_CHARS);
            f.max_chars("host", host.trim(), MAX_HOST_CHARS);
            if let Some(t) = &prompt_template {
                f.max_chars("prompt_template", t, MAX_PROMPT_TEMPLATE_CHARS);
            }
        }
        if !f.has_errors() {
            if model_name.trim().is_empty() {
                f.invalid(
                    "string_too_short",
                    "model_name",
                    "model_name must not be empty",
                );
            }
            if host.trim().is_empty() {
                f.invalid("string_too_short", "host", "host must not be empty");
            }
        }
        f.finish()?;
        Ok(InstanceInput {
            model_name: model_name.trim().to_string(),
            host: host.trim().to_string(),
            port,
            weight,
            check_healthy,
            enabled,
            prompt_template,
            remove_from_registry,
        })
    }

    /// The fast path for well-formed bodies (every worker's register and heartbeat): a
    /// typed parse that accepts only inputs the lenient [`InstanceInput::from_json`] also
    /// accepts, with the same result. Anything else (strings for numbers, blank names,
    /// duplicate keys, malformed JSON…) returns `None` and goes through the lenient path,
    /// which produces the same values or DB-GPT's 422.
    pub fn from_body_strict(body: &[u8]) -> Option<Self> {
        use std::borrow::Cow;
        #[derive(Deserialize)]
        struct Strict<'a> {
            #[serde(borrow)]
            model_name: Cow<'a, str>,
            #[serde(borrow)]
            host: Cow<'a, str>,
            port: u16,
            #[serde(default = "default_weight")]
            weight: Option<f64>,
            #[serde(default = "default_true")]
            check_healthy: Option<bool>,
            #[serde(default = "default_true")]
            enabled: Option<bool>,
            #[serde(default)]
            prompt_template: Option<String>,
            #[serde(default, rename = "healthy")]
            _healthy: Option<bool>,
            #[serde(default)]
            remove_from_registry: Option<bool>,
        }
        let s: Strict<'_> = serde_json::from_slice(body).ok()?;
        let (model_name, host) = (s.model_name.trim(), s.host.trim());
        if model_name.is_empty()
            || host.is_empty()
            || s.weight.is_some_and(|w| !w.is_finite())
            || !within_bounds(model_name, host, s.prompt_template.as_deref())
        {
            return None;
        }
        Some(InstanceInput {
            model_name: model_name.to_string(),
            host: host.to_string(),
            port: s.port,
            weight: s.weight,
            check_healthy: s.check_healthy,
            enabled: s.enabled,
            prompt_template: s.prompt_template,
            remove_from_registry: s.remove_from_registry.unwrap_or(false),
        })
    }

    /// The registry identity of this instance.
    pub fn key(&self) -> InstanceKey {
        InstanceKey {
            model_name: self.model_name.clone(),
            host: self.host.clone(),
            port: self.port,
        }
    }
}

/// Identity of an instance: `(model_name, host, port)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKey {
    pub model_name: String,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({}:{})", self.model_name, self.host, self.port)
    }
}

/// Splits a worker key `name@type` into its two parts (`None` unless exactly one `@`).
pub fn split_worker_key(key: &str) -> Option<(&str, &str)> {
    let (name, ty) = key.split_once(KEY_SEPARATOR)?;
    if ty.contains(KEY_SEPARATOR) {
        return None;
    }
    Some((name, ty))
}

/// Builds a worker key `name@type`.
pub fn worker_key(name: &str, worker_type: &str) -> String {
    // Built by hand: on the apiserver's hot path `format!` costs several times more.
    let mut key = String::with_capacity(name.len() + 1 + worker_type.len());
    key.push_str(name);
    key.push(KEY_SEPARATOR);
    key.push_str(worker_type);
    key
}

/// Registry name of a worker manager process: `WorkerManager@service`.
pub fn manager_key() -> String {
    worker_key(WORKER_MANAGER_NAME, WORKER_MANAGER_TYPE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn instance_serialises_nine_keys_in_dbgpt_order() {
        let m = ModelInstance {
            model_name: "chatgpt_proxyllm@llm".into(),
            host: "127.0.0.1".into(),
            port: 38001,
            weight: Some(1.0),
            check_healthy: Some(true),
            healthy: Some(true),
            enabled: Some(true),
            prompt_template: None,
            last_heartbeat: Some("2026-11-22T02:40:41.139447".into()),
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"model_name":"chatgpt_proxyllm@llm","host":"127.0.0.1","port":38001,"weight":1.0,"check_healthy":true,"healthy":true,"enabled":true,"prompt_template":null,"last_heartbeat":"2026-11-22T02:40:41.139447"}"#
        );
    }

    #[test]
    fn input_defaults_and_coercion() {
        let v = json!({"model_name": " a@llm ", "host": "h", "port": "1", "remove_from_registry": true, "extra": 1});
        let i = InstanceInput::from_json("body", &v).unwrap();
        assert_eq!(i.model_name, "a@llm");
        assert_eq!(i.port, 1);
        assert_eq!(i.weight, Some(1.0));
        assert_eq!(i.check_healthy, Some(true));
        assert_eq!(i.enabled, Some(true));
        assert!(i.remove_from_registry);
    }

    /// Whatever the strict fast path accepts, the lenient validator accepts with the same
    /// result; the standard worker body takes the fast path.
    #[test]
    fn strict_fast_path_agrees_with_the_lenient_validator() {
        let bodies = [
            r#"{"model_name":"a@llm","host":"h","port":1,"weight":1.0,"check_healthy":true,"healthy":false,"enabled":true,"prompt_template":null,"last_heartbeat":null}"#,
            r#"{"model_name":" a@llm ","host":"h","port":8001}"#,
            r#"{"model_name":"a@llm","host":"h","port":1,"weight":null,"check_healthy":null,"enabled":false,"prompt_template":"t\"q","extra":[1,{}]}"#,
            r#"{"model_name":"a\u00e9@llm","host":"h","port":65535,"remove_from_registry":true,"last_heartbeat":"2026-01-01T00:00:00"}"#,
            r#"{"model_name":"a@llm","host":"h","port":"1"}"#,
            r#"{"model_name":"a@llm","host":"h","port":1.0}"#,
            r#"{"model_name":"a@llm","host":"h","port":1,"enabled":"yes"}"#,
            r#"{"model_name":"","host":"h","port":1}"#,
            r#"{"model_name":"a@llm","host":"  ","port":1}"#,
            r#"{"model_name":"a@llm","host":"h","port":70000}"#,
            r#"{"model_name":"a@llm","host":"h","port":1,"port":2}"#,
            r#"{"model_name":"a@llm","host":"h","port":1,"healthy":"maybe"}"#,
            r#"{"model_name":"a@llm","host":"h","port":1,"weight":"2"}"#,
            r#"{"model_name":"a@llm","host":"h"}"#,
            r#"[1]"#,
            r#"{"#,
        ];
        let mut fast = 0;
        for b in bodies {
            let lenient = crate::validate::parse_json_object(b.as_bytes(), "ModelInstance")
                .and_then(|v| InstanceInput::from_json("body", &v));
            if let Some(strict) = InstanceInput::from_body_strict(b.as_bytes()) {
                fast += 1;
                assert_eq!(Some(strict), lenient.ok(), "{b}");
            }
        }
        assert_eq!(fast, 4, "the well-formed bodies take the fast path");
        assert!(InstanceInput::from_body_strict(bodies[0].as_bytes()).is_some());
    }

    /// Names, hosts and templates are bounded at registration (FastAPI's 422 naming the
    /// field), on the fast and the lenient path alike; the bound counts characters.
    #[test]
    fn registration_bounds_name_the_field() {
        let at = |n: usize| "𝔸".repeat(n);
        let body = |name: &str, host: &str, tpl: Option<&str>| json!({"model_name": name, "host": host, "port": 1, "prompt_template": tpl});
        let ok = body(
            &format!("{}@llm", at(MAX_MODEL_NAME_CHARS - 4)),
            &at(MAX_HOST_CHARS),
            Some(&at(MAX_PROMPT_TEMPLATE_CHARS)),
        );
        let bytes = serde_json::to_vec(&ok).unwrap();
        let strict = InstanceInput::from_body_strict(&bytes).expect("at the limit: fast path");
        assert_eq!(strict, InstanceInput::from_json("body", &ok).unwrap());
        assert_eq!(strict.model_name.chars().count(), MAX_MODEL_NAME_CHARS);
        let over = [
            (
                body(&at(MAX_MODEL_NAME_CHARS + 1), "h", None),
                "model_name",
                MAX_MODEL_NAME_CHARS,
            ),
            (
                body("a@llm", &at(MAX_HOST_CHARS + 1), None),
                "host",
                MAX_HOST_CHARS,
            ),
            (
                body("a@llm", "h", Some(&at(MAX_PROMPT_TEMPLATE_CHARS + 1))),
                "prompt_template",
                MAX_PROMPT_TEMPLATE_CHARS,
            ),
            (
                body(&"x".repeat(100_000), "h", None),
                "model_name",
                MAX_MODEL_NAME_CHARS,
            ),
        ];
        for (v, field, max) in over {
            let bytes = serde_json::to_vec(&v).unwrap();
            assert_eq!(InstanceInput::from_body_strict(&bytes), None, "{field}");
            let e = InstanceInput::from_json("body", &v).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!(e.0[0]["type"], "string_too_long");
            assert_eq!(e.0[0]["loc"], json!(["body", field]));
            assert_eq!(e.0[0]["ctx"]["max_length"], max);
        }
        // A deregistration is not bounded: an entry from before the bounds can still go.
        let q = json!({"model_name": at(MAX_MODEL_NAME_CHARS + 1), "host": "h", "port": "1"});
        assert!(InstanceInput::from_json("query", &q).is_ok());
    }

    #[test]
    fn query_blank_values_are_none() {
        let q = crate::validate::query_object(Some(
            "model_name=a%40llm&host=h&port=1&weight=1.0&check_healthy=true&healthy=false&enabled=true&prompt_template=&last_heartbeat=",
        ));
        let i = InstanceInput::from_json("query", &q).unwrap();
        assert_eq!(i.prompt_template, None);
        assert!(!i.remove_from_registry);
    }

    #[test]
    fn isoformat_like_python() {
        // 2026-11-22 02:40:41.139447 UTC and a whole second: microseconds only when non-zero.
        let t = Timestamp(1_795_315_241_139_447);
        let s = t.to_local_iso();
        assert_eq!(s.len(), 26, "{s}");
        assert!(s.ends_with(".139447"), "{s}");
        let whole = Timestamp(1_795_315_241_000_000).to_local_iso();
        assert_eq!(whole.len(), 19, "{whole}");
    }

    #[test]
    fn isoformat_matches_chrono_strftime() {
        let reference = |t: Timestamp| {
            let local = DateTime::<Utc>::from_timestamp_micros(t.0)
                .unwrap()
                .with_timezone(&Local)
                .naive_local();
            let fmt = if t.0.rem_euclid(1_000_000) == 0 {
                "%Y-%m-%dT%H:%M:%S"
            } else {
                "%Y-%m-%dT%H:%M:%S%.6f"
            };
            local.format(fmt).to_string()
        };
        let samples = [
            0,
            1,
            999_999,
            -1,
            -1_000_000,
            1_795_315_241_139_447,
            1_795_315_241_000_000,
            1_795_315_241_000_001,
            1_711_846_799_999_999,
            253_402_300_799_999_999,
            -62_135_596_800_000_000,
        ];
        for us in samples {
            assert_eq!(
                Timestamp(us).to_local_iso(),
                reference(Timestamp(us)),
                "{us}"
            );
        }
        let mut x: i64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let us = x.rem_euclid(4_102_444_800_000_000);
            assert_eq!(
                Timestamp(us).to_local_iso(),
                reference(Timestamp(us)),
                "{us}"
            );
        }
    }

    #[test]
    fn millis_like_python_strftime_truncated() {
        let reference = |t: Timestamp| {
            let local = DateTime::<Utc>::from_timestamp_micros(t.0)
                .unwrap()
                .with_timezone(&Local)
                .naive_local();
            // Python's `strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]`.
            let s = local.format("%Y-%m-%d %H:%M:%S.%6f").to_string();
            s[..s.len() - 3].to_string()
        };
        let mut offsets = LocalOffsets::default();
        for us in [
            0,
            999,
            1_795_315_241_139_447,
            1_795_315_241_999_999,
            1_795_315_241_000_000,
            -1,
        ] {
            let mut out = Vec::new();
            Timestamp(us).write_local_millis(&mut out, &mut offsets);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                reference(Timestamp(us)),
                "{us}"
            );
        }
    }

    #[test]
    fn worker_keys() {
        assert_eq!(split_worker_key("a@llm"), Some(("a", "llm")));
        assert_eq!(split_worker_key("a"), None);
        assert_eq!(split_worker_key("a@b@c"), None);
        assert_eq!(
            worker_key("WorkerManager", "service"),
            "WorkerManager@service"
        );
        assert_eq!(manager_key(), "WorkerManager@service");
    }
}
