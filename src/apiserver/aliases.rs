//! Model aliases and fallback chains (`--model_alias`, `--fallback`): which models a request
//! for a model name is tried on, in order.
//!
//! An alias (`gpt-4o-mini=smollm2`) is served by its target model; aliases may name aliases,
//! resolved once at start-up (a loop, an empty side or an alias of itself is a start-up
//! error naming the flag). A fallback chain (`smollm2=qwen,proxy-gpt`) lists the models a
//! request for `smollm2` moves on to, in order, when `smollm2` cannot serve it before the
//! first byte: no instance is known or routable, every instance tried failed (connect
//! errors, 5xx, stalls before the headers) or is overloaded ([`falls_back`]). A worker's
//! verdict on the request (a 400 or 413) is final: every model would refuse it. A request
//! for an alias walks its target's chain (LiteLLM's bug #10317 was an alias that skipped
//! the fallbacks). Chains are not followed transitively: the fallbacks of a fallback are
//! not tried.
//!
//! The answer names the model that served it in the `x-dbgpt-served-model` header. Its body's
//! `model` is what OpenAI clients expect when the alias's own target served it (the name the
//! client asked for: the worker's `model` is rewritten, in every chunk of a stream), and the
//! serving model after a fallback (a different model answered: the body says so).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;
use serde_json::{Map, Value};
use tracing::warn;

use super::proxy::UpstreamError;
use crate::telemetry::metrics::apiserver::ApiMetrics;

/// The response header naming the model that served a request.
pub static SERVED_MODEL_HEADER: HeaderName = HeaderName::from_static("x-dbgpt-served-model");

/// Why the aliases or chains cannot be used (each names its flag).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutesError {
    #[error("--model_alias {0:?}: expected ALIAS=MODEL with both names non-empty")]
    AliasSyntax(String),
    #[error("--model_alias {0}={0}: an alias cannot name itself")]
    AliasOfItself(String),
    #[error("--model_alias {alias}: given twice, for `{first}` and for `{second}`")]
    AliasTwice {
        alias: String,
        first: String,
        second: String,
    },
    #[error("--model_alias: the aliases form a loop: {0}")]
    AliasLoop(String),
    #[error("--fallback {0:?}: expected MODEL=FALLBACK[,FALLBACK…] with no empty name")]
    FallbackSyntax(String),
    #[error(
        "--fallback {model}: `{model}` is an alias of `{target}`; give the chain of `{target}` (an alias uses its target's chain)"
    )]
    FallbackOfAlias { model: String, target: String },
    #[error("--fallback {0}: given twice")]
    FallbackTwice(String),
    #[error("--fallback {model}: the chain names `{model}` itself (as `{entry}`)")]
    FallbackToItself { model: String, entry: String },
    #[error("--fallback {model}: `{entry}` appears twice in the chain")]
    FallbackRepeated { model: String, entry: String },
}

/// Splits `ALIAS=MODEL`.
pub fn parse_alias(s: &str) -> Result<(String, String), RoutesError> {
    let syntax = || RoutesError::AliasSyntax(s.to_string());
    let (a, m) = s.split_once('=').ok_or_else(syntax)?;
    let (a, m) = (a.trim(), m.trim());
    if a.is_empty() || m.is_empty() {
        return Err(syntax());
    }
    Ok((a.to_string(), m.to_string()))
}

/// Splits `MODEL=FALLBACK[,FALLBACK…]`.
pub fn parse_fallback(s: &str) -> Result<(String, Vec<String>), RoutesError> {
    let syntax = || RoutesError::FallbackSyntax(s.to_string());
    let (m, list) = s.split_once('=').ok_or_else(syntax)?;
    let chain: Vec<String> = list.split(',').map(|e| e.trim().to_string()).collect();
    let m = m.trim();
    if m.is_empty() || chain.iter().any(String::is_empty) {
        return Err(syntax());
    }
    Ok((m.to_string(), chain))
}

/// The resolved aliases and chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// Alias → the model that serves it (alias chains resolved).
    aliases: HashMap<String, String>,
    /// Model → the models tried after it, in order.
    fallbacks: HashMap<String, Vec<String>>,
}

/// One model a request is tried on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop<'a> {
    /// The model that serves this try.
    pub model: &'a str,
    /// The name the answer's body carries (see the module docs).
    pub answer_as: &'a str,
}

impl Hop<'_> {
    /// The name to put in the worker's answer instead of its own, when it differs.
    pub fn rename(&self) -> Option<&str> {
        (self.answer_as != self.model).then_some(self.answer_as)
    }
}

impl Routes {
    /// Checks and resolves `aliases` (`(alias, model)`) and `fallbacks` (`(model, chain)`).
    pub fn new(
        aliases: Vec<(String, String)>,
        fallbacks: Vec<(String, Vec<String>)>,
    ) -> Result<Self, RoutesError> {
        let mut direct: HashMap<String, String> = HashMap::new();
        for (a, m) in aliases {
            if a == m {
                return Err(RoutesError::AliasOfItself(a));
            }
            match direct.get(&a) {
                Some(prev) if *prev != m => {
                    return Err(RoutesError::AliasTwice {
                        alias: a,
                        first: prev.clone(),
                        second: m,
                    });
                }
                _ => {
                    direct.insert(a, m);
                }
            }
        }
        let mut resolved = HashMap::with_capacity(direct.len());
        for a in direct.keys() {
            let mut path = vec![a.as_str()];
            let mut at = a.as_str();
            while let Some(next) = direct.get(at) {
                if path.contains(&next.as_str()) {
                    path.push(next);
                    return Err(RoutesError::AliasLoop(path.join(" → ")));
                }
                path.push(next);
                at = next;
            }
            resolved.insert(a.clone(), at.to_string());
        }
        let mut chains: HashMap<String, Vec<String>> = HashMap::new();
        for (m, list) in fallbacks {
            if let Some(target) = resolved.get(&m) {
                return Err(RoutesError::FallbackOfAlias {
                    model: m,
                    target: target.clone(),
                });
            }
            if chains.contains_key(&m) {
                return Err(RoutesError::FallbackTwice(m));
            }
            let mut chain: Vec<String> = Vec::with_capacity(list.len());
            for entry in list {
                let to = resolved
                    .get(&entry)
                    .cloned()
                    .unwrap_or_else(|| entry.clone());
                if to == m {
                    return Err(RoutesError::FallbackToItself { model: m, entry });
                }
                if chain.contains(&to) {
                    return Err(RoutesError::FallbackRepeated { model: m, entry });
                }
                chain.push(to);
            }
            chains.insert(m, chain);
        }
        Ok(Routes {
            aliases: resolved,
            fallbacks: chains,
        })
    }

    /// The model that serves a request for `model` first.
    pub fn target<'a>(&'a self, model: &'a str) -> &'a str {
        self.aliases.get(model).map_or(model, String::as_str)
    }

    /// The models a request for `requested` is tried on, in order: its target, then the
    /// target's fallbacks.
    pub fn hops<'a>(&'a self, requested: &'a str) -> Vec<Hop<'a>> {
        let target = self.target(requested);
        let mut out = vec![Hop {
            model: target,
            answer_as: requested,
        }];
        if let Some(chain) = self.fallbacks.get(target) {
            out.extend(chain.iter().map(|m| Hop {
                model: m,
                answer_as: m,
            }));
        }
        out
    }

    /// The aliases `/v1/models` lists with the `served` models: those that a served model
    /// would answer (their target or one of its fallbacks is served), with their targets.
    pub fn listed(&self, served: &[String]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .aliases
            .iter()
            .filter(|(a, _)| {
                self.hops(a)
                    .iter()
                    .any(|h| served.iter().any(|s| s == h.model))
            })
            .map(|(a, t)| (a.clone(), t.clone()))
            .collect();
        out.sort();
        out
    }
}

/// Whether a model's failure moves the request on to the next model of its chain: nothing
/// reached a worker that could answer (no instance known or routable, every one failed
/// before the first byte, or all are overloaded). Timeouts of an answering worker and a
/// worker's verdict on the request do not.
pub fn falls_back(e: &UpstreamError) -> bool {
    matches!(
        e,
        UpstreamError::UnknownModel { .. }
            | UpstreamError::NoneRoutable { .. }
            | UpstreamError::NoInstance { .. }
            | UpstreamError::Exhausted { .. }
            | UpstreamError::Overloaded { .. }
    )
}

/// Logs and counts a request moving from `from` to `to` because of `why`.
pub fn note_fallback(metrics: &ApiMetrics, from: &str, to: &str, why: &UpstreamError) {
    warn!(
        model = %crate::telemetry::Escaped(from),
        to = %crate::telemetry::Escaped(to),
        reason = %crate::telemetry::Escaped(&why.to_string()),
        "model cannot serve the request; falling back"
    );
    metrics.fell_back(from, to);
}

/// `body` (a JSON object) with its top-level `model` set to `model`; `None` when it is not
/// a JSON object.
pub fn with_model(body: &[u8], model: &str) -> Option<Bytes> {
    let mut m: Map<String, Value> = serde_json::from_slice(body).ok()?;
    m.insert("model".into(), Value::String(model.to_string()));
    serde_json::to_vec(&m).ok().map(Bytes::from)
}

/// An answer's body (a JSON object) with an existing top-level `model` renamed; `None` when
/// there is nothing to rename.
pub fn renamed(body: &[u8], name: &str) -> Option<Bytes> {
    let mut m: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let slot = m.get_mut("model")?;
    *slot = Value::String(name.to_string());
    serde_json::to_vec(&m).ok().map(Bytes::from)
}

/// Names the serving model in the answer's headers.
pub fn served(mut resp: Response, model: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(model) {
        resp.headers_mut().insert(SERVED_MODEL_HEADER.clone(), v);
    }
    resp
}

/// The serving model named by an answer, if any.
pub fn served_by(resp: &Response) -> Option<&str> {
    resp.headers()
        .get(&SERVED_MODEL_HEADER)
        .and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(aliases: &[&str], fallbacks: &[&str]) -> Result<Routes, RoutesError> {
        let a = aliases
            .iter()
            .map(|s| parse_alias(s))
            .collect::<Result<Vec<_>, _>>()?;
        let f = fallbacks
            .iter()
            .map(|s| parse_fallback(s))
            .collect::<Result<Vec<_>, _>>()?;
        Routes::new(a, f)
    }

    fn models<'a>(hops: &[Hop<'a>]) -> Vec<(&'a str, &'a str)> {
        hops.iter().map(|h| (h.model, h.answer_as)).collect()
    }

    #[test]
    fn syntax_errors_name_the_flag() {
        for bad in ["a=", "=b", "ab", " = "] {
            let e = parse_alias(bad).unwrap_err();
            assert_eq!(e, RoutesError::AliasSyntax(bad.into()));
            assert!(e.to_string().starts_with("--model_alias"), "{e}");
        }
        for bad in ["a=", "=b", "a=b,,c", "a=b,", "ab"] {
            let e = parse_fallback(bad).unwrap_err();
            assert!(e.to_string().starts_with("--fallback"), "{e}");
        }
        assert_eq!(
            parse_fallback(" m = x , y ").unwrap(),
            ("m".to_string(), vec!["x".to_string(), "y".to_string()])
        );
    }

    #[test]
    fn alias_loops_and_conflicts_are_refused() {
        assert_eq!(
            routes(&["a=a"], &[]).unwrap_err(),
            RoutesError::AliasOfItself("a".into())
        );
        let e = routes(&["a=b", "b=c", "c=a"], &[]).unwrap_err();
        let RoutesError::AliasLoop(path) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(path.split(" → ").count(), 4, "{path}");
        assert!(e.to_string().contains("--model_alias"));
        assert!(matches!(
            routes(&["a=b", "a=c"], &[]).unwrap_err(),
            RoutesError::AliasTwice { .. }
        ));
        // The same alias given twice alike is fine.
        routes(&["a=b", "a=b"], &[]).unwrap();
    }

    #[test]
    fn aliases_resolve_through_aliases() {
        let r = routes(&["gpt-4o-mini=mini", "mini=smollm2"], &[]).unwrap();
        assert_eq!(r.target("gpt-4o-mini"), "smollm2");
        assert_eq!(r.target("mini"), "smollm2");
        assert_eq!(r.target("smollm2"), "smollm2");
        assert_eq!(r.target("other"), "other");
        let h = r.hops("gpt-4o-mini");
        assert_eq!(models(&h), [("smollm2", "gpt-4o-mini")]);
        assert_eq!(h[0].rename(), Some("gpt-4o-mini"));
        assert_eq!(r.hops("smollm2")[0].rename(), None);
    }

    #[test]
    fn chains_apply_to_aliases_and_are_checked() {
        let r = routes(
            &["gpt-4o-mini=smollm2", "big=qwen"],
            &["smollm2=big,proxy-gpt"],
        )
        .unwrap();
        // The alias walks its target's chain; chain entries that are aliases resolve.
        assert_eq!(
            models(&r.hops("gpt-4o-mini")),
            [
                ("smollm2", "gpt-4o-mini"),
                ("qwen", "qwen"),
                ("proxy-gpt", "proxy-gpt")
            ]
        );
        assert_eq!(
            models(&r.hops("smollm2")),
            [
                ("smollm2", "smollm2"),
                ("qwen", "qwen"),
                ("proxy-gpt", "proxy-gpt")
            ]
        );
        // Not transitive: qwen has no chain of its own.
        assert_eq!(models(&r.hops("qwen")), [("qwen", "qwen")]);
        assert_eq!(models(&r.hops("big")), [("qwen", "big")]);

        assert!(matches!(
            routes(&["gpt-4o-mini=smollm2"], &["gpt-4o-mini=qwen"]).unwrap_err(),
            RoutesError::FallbackOfAlias { .. }
        ));
        assert!(matches!(
            routes(&[], &["m=a", "m=b"]).unwrap_err(),
            RoutesError::FallbackTwice(_)
        ));
        assert!(matches!(
            routes(&[], &["m=a,m"]).unwrap_err(),
            RoutesError::FallbackToItself { .. }
        ));
        // Through an alias of itself, too.
        assert!(matches!(
            routes(&["self=m"], &["m=a,self"]).unwrap_err(),
            RoutesError::FallbackToItself { .. }
        ));
        assert!(matches!(
            routes(&["q=qwen"], &["m=qwen,q"]).unwrap_err(),
            RoutesError::FallbackRepeated { .. }
        ));
    }

    #[test]
    fn listed_aliases_are_those_something_serves() {
        let r = routes(&["a=m", "b=gone", "c=down"], &["down=m"]).unwrap();
        let served = vec!["m".to_string()];
        assert_eq!(
            r.listed(&served),
            [("a".into(), "m".into()), ("c".into(), "down".into())]
        );
    }

    #[test]
    fn bodies_are_rewritten_in_place() {
        let b = br#"{"model":"gpt-4o-mini","messages":[],"stream":true}"#;
        assert_eq!(
            &with_model(b, "smollm2").unwrap()[..],
            br#"{"model":"smollm2","messages":[],"stream":true}"#
        );
        assert_eq!(
            &renamed(
                br#"{"id":"x","model":"smollm2","choices":[]}"#,
                "gpt-4o-mini"
            )
            .unwrap()[..],
            br#"{"id":"x","model":"gpt-4o-mini","choices":[]}"#
        );
        assert!(renamed(br#"{"id":"x"}"#, "a").is_none());
        assert!(with_model(b"[1]", "a").is_none());
    }

    #[test]
    fn what_falls_back() {
        let m = || "m".to_string();
        assert!(falls_back(&UpstreamError::NoneRoutable { model: m() }));
        assert!(falls_back(&UpstreamError::Exhausted {
            model: m(),
            tried: 1,
            last: "x".into()
        }));
        assert!(falls_back(&UpstreamError::Overloaded {
            model: m(),
            tried: 1,
            last: "x".into(),
            retry_after: 1
        }));
        assert!(!falls_back(&UpstreamError::Refused {
            status: 400,
            detail: "x".into()
        }));
        assert!(!falls_back(&UpstreamError::Timeout(
            std::time::Duration::from_secs(1)
        )));
    }
}
