//! Wire types shared by every service, in DB-GPT 0.5.10's JSON shapes.
//!
//! Everything that crosses HTTP between the controller, workers, the apiserver and DB-GPT's
//! own Python clients is defined here, once: field names, key order, defaults and the
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
        let utc = DateTime::<Utc>::from_timestamp_micros(self.0).unwrap_or_default();
        let local = utc.with_timezone(&Local).naive_local();
        let whole = self.0.rem_euclid(1_000_000) == 0;
        if !(0..=9999).contains(&local.year()) {
            // Outside what `%Y` prints as four plain digits: let chrono do it.
            let fmt = if whole {
                "%Y-%m-%dT%H:%M:%S"
            } else {
                "%Y-%m-%dT%H:%M:%S%.6f"
            };
            return local.format(fmt).to_string();
        }
        // "YYYY-MM-DDTHH:MM:SS.ffffff" written into a stack buffer.
        fn put(buf: &mut [u8], v: u32) {
            let mut v = v;
            for b in buf.iter_mut().rev() {
                *b = b'0' + (v % 10) as u8;
                v /= 10;
            }
        }
        let mut buf = *b"0000-00-00T00:00:00.000000";
        put(&mut buf[0..4], local.year() as u32);
        put(&mut buf[5..7], local.month());
        put(&mut buf[8..10], local.day());
        put(&mut buf[11..13], local.hour());
        put(&mut buf[14..16], local.minute());
        put(&mut buf[17..19], local.second());
        let len = if whole {
            19
        } else {
            put(&mut buf[20..26], local.nanosecond() % 1_000_000_000 / 1000);
            26
        };
        String::from_utf8_lossy(&buf[..len]).into_owned()
    }

    /// Seconds elapsed from `self` to `now` (negative if `self` is in the future).
    pub fn secs_until(self, now: Timestamp) -> f64 {
        (now.0 - self.0) as f64 / 1e6
    }
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
    format!("{name}{KEY_SEPARATOR}{worker_type}")
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
    fn worker_keys() {
        assert_eq!(split_worker_key("a@llm"), Some(("a", "llm")));
        assert_eq!(split_worker_key("a"), None);
        assert_eq!(split_worker_key("a@b@c"), None);
        assert_eq!(
            worker_key("WorkerManager", "service"),
            "WorkerManager@service"
        );
    }
}
