//! `dbgpt keys …`: managed API keys through the controller (create, list, show, update,
//! revoke, usage).
//!
//! Flags are checked before anything is sent, so bad input (`--rpm 0`, `--expires 3x`)
//! fails with a message naming the flag and changes nothing. A limit is a whole number of
//! at least 1; `update` takes `none` to remove one. `--expires` is a duration from now
//! (`30d`, `12h`, `90m`) or a date (`2027-01-31`: the key expires at 00:00 UTC that day).
//! The controller address is found as for `dbgpt model`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};

use super::model::controller_address;
use crate::controller::client::{ClientError, ControllerClient};
use crate::keys::{is_day, is_valid_name, now_secs, state};
use crate::wire::keys::{ApiKey, KeySpec, KeyUpdate, Limits, Priority, UsageRow};

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Controller URL(s), comma-separated [default: $CONTROLLER_ADDRESS, the local controller, or http://127.0.0.1:8000]
    #[arg(
        long,
        global = true,
        env = "CONTROLLER_ADDRESS",
        visible_alias = "controller_addr",
        alias = "controller-addr"
    )]
    pub address: Option<String>,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once.
    Create(CreateArgs),
    /// List keys (revoked and expired ones too).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one key (by name or id).
    Show {
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a key's models, limits, priority or expiry (`none` removes a limit).
    Update(UpdateArgs),
    /// Revoke a key: requests with it are refused from the apiservers' next sync on.
    Revoke { name: String },
    /// Usage per key, model and UTC day.
    Usage {
        /// Only this key (name or id).
        name: Option<String>,
        /// From this UTC day on (YYYY-MM-DD).
        #[arg(long)]
        since: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// The settings `create` and `update` share.
#[derive(Debug, Clone, Args)]
pub struct KeySettings {
    /// Models the key may use, comma-separated (`*`: every model, the default).
    #[arg(long)]
    pub models: Option<String>,
    /// Requests per minute.
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = parse_limit)]
    pub rpm: Option<LimitArg>,
    /// Tokens (prompt + completion) per minute.
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = parse_limit)]
    pub tpm: Option<LimitArg>,
    /// Requests in flight at once.
    #[arg(
        long = "max_concurrency",
        visible_alias = "max-concurrency",
        value_name = "N",
        allow_hyphen_values = true,
        value_parser = parse_limit
    )]
    pub max_concurrency: Option<LimitArg>,
    /// Tokens per UTC day.
    #[arg(
        long = "daily_tokens",
        visible_alias = "daily-tokens",
        value_name = "N",
        allow_hyphen_values = true,
        value_parser = parse_limit
    )]
    pub daily_tokens: Option<LimitArg>,
    /// interactive (served first) or batch (waits, shed first).
    #[arg(long, value_parser = parse_priority)]
    pub priority: Option<Priority>,
    /// Expiry: 30d, 12h, 90m from now, or a date (YYYY-MM-DD, 00:00 UTC); `none` on update.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_expires)]
    pub expires: Option<ExpiresArg>,
    /// Limits on one model, on top of the key's: MODEL:rpm=N,tpm=N,max_concurrency=N,daily_tokens=N
    /// (repeatable; on update `rpm=none` removes one, MODEL:none all of that model's).
    #[arg(
        long = "model_limit",
        visible_alias = "model-limit",
        value_name = "MODEL:LIMITS",
        allow_hyphen_values = true,
        value_parser = parse_model_limit
    )]
    pub model_limit: Vec<ModelLimitArg>,
}

/// A `--model_limit` value: the model and its limit flags (`None`: `MODEL:none`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLimitArg {
    pub model: String,
    pub limits: Option<Vec<(LimitField, LimitArg)>>,
}

/// Which limit a `--model_limit` part sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitField {
    Rpm,
    Tpm,
    MaxConcurrency,
    DailyTokens,
}

impl LimitField {
    fn slot(self, l: &mut Limits) -> &mut Option<u64> {
        match self {
            LimitField::Rpm => &mut l.rpm,
            LimitField::Tpm => &mut l.tpm,
            LimitField::MaxConcurrency => &mut l.max_concurrency,
            LimitField::DailyTokens => &mut l.daily_tokens,
        }
    }
}

fn parse_model_limit(s: &str) -> Result<ModelLimitArg, String> {
    let Some((model, rest)) = s.rsplit_once(':').filter(|(m, _)| !m.trim().is_empty()) else {
        return Err(format!(
            "expected MODEL:rpm=N,tpm=N,max_concurrency=N,daily_tokens=N, got {s:?}"
        ));
    };
    let model = model.trim().to_string();
    if rest.trim().eq_ignore_ascii_case("none") {
        return Ok(ModelLimitArg {
            model,
            limits: None,
        });
    }
    let mut limits = Vec::new();
    for part in rest.split(',') {
        let Some((k, v)) = part.split_once('=') else {
            return Err(format!("{part:?} in {s:?} is not NAME=VALUE"));
        };
        let field = match k.trim() {
            "rpm" => LimitField::Rpm,
            "tpm" => LimitField::Tpm,
            "max_concurrency" | "max-concurrency" => LimitField::MaxConcurrency,
            "daily_tokens" | "daily-tokens" => LimitField::DailyTokens,
            other => {
                return Err(format!(
                    "unknown limit {other:?} (rpm, tpm, max_concurrency, daily_tokens)"
                ));
            }
        };
        let v = parse_limit(v).map_err(|e| format!("{}: {e}", k.trim()))?;
        limits.push((field, v));
    }
    Ok(ModelLimitArg {
        model,
        limits: Some(limits),
    })
}

/// `current` with the `--model_limit` flags applied; `create` (no current limits) refuses
/// `none`. A model left without any limit is removed.
fn apply_model_limits(
    mut current: std::collections::BTreeMap<String, Limits>,
    args: &[ModelLimitArg],
    create: bool,
) -> anyhow::Result<std::collections::BTreeMap<String, Limits>> {
    for a in args {
        match &a.limits {
            None if create => {
                bail!(
                    "--model_limit: `{}:none` removes limits with `dbgpt keys update`",
                    a.model
                )
            }
            None => {
                current.remove(&a.model);
            }
            Some(parts) => {
                let l = current.entry(a.model.clone()).or_default();
                for (field, v) in parts {
                    *field.slot(l) = match v {
                        LimitArg::Set(n) => Some(*n),
                        LimitArg::Clear if create => bail!(
                            "--model_limit: `none` removes a limit with `dbgpt keys update`; leave it out for no limit"
                        ),
                        LimitArg::Clear => None,
                    };
                }
                if *l == Limits::default() {
                    current.remove(&a.model);
                }
            }
        }
    }
    Ok(current)
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Unique name: 1 to 64 of A-Z a-z 0-9 _ . -
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub settings: KeySettings,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The key's name (or id).
    pub name: String,
    #[command(flatten)]
    pub settings: KeySettings,
}

/// A limit flag's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitArg {
    Set(u64),
    /// `none`: no limit.
    Clear,
}

/// An `--expires` value, as unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiresArg {
    At(i64),
    Never,
}

fn parse_limit(s: &str) -> Result<LimitArg, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(LimitArg::Clear);
    }
    match t.parse::<u64>() {
        Ok(0) => Err(
            "must be at least 1 (leave the flag out, or give `none` on update, for no limit)"
                .into(),
        ),
        Ok(n) if n <= i64::MAX as u64 => Ok(LimitArg::Set(n)),
        _ => Err(format!(
            "expected a whole number of at least 1 (or `none`), got {s:?}"
        )),
    }
}

fn parse_priority(s: &str) -> Result<Priority, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "interactive" => Ok(Priority::Interactive),
        "batch" => Ok(Priority::Batch),
        _ => Err(format!("expected interactive or batch, got {s:?}")),
    }
}

/// `30d`, `12h`, `90m`, `YYYY-MM-DD` or `none`, against the current time.
fn parse_expires(s: &str) -> Result<ExpiresArg, String> {
    expires_at(s, now_secs())
}

fn expires_at(s: &str, now: i64) -> Result<ExpiresArg, String> {
    let t = s.trim();
    let bad = || {
        format!(
            "expected a duration like 30d, 12h or 90m, a date like 2027-01-31, or none; got {s:?}"
        )
    };
    if t.eq_ignore_ascii_case("none") || t.eq_ignore_ascii_case("never") {
        return Ok(ExpiresArg::Never);
    }
    if is_day(t) {
        let day = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d").map_err(|_| bad())?;
        let at = day
            .and_hms_opt(0, 0, 0)
            .ok_or_else(bad)?
            .and_utc()
            .timestamp();
        if at <= now {
            return Err(format!("{t} is not in the future"));
        }
        return Ok(ExpiresArg::At(at));
    }
    let (num, unit) = t.split_at(t.len().saturating_sub(1));
    let per = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        _ => return Err(bad()),
    };
    let n: i64 = num.parse().map_err(|_| bad())?;
    if n <= 0 || num.starts_with('+') {
        return Err(bad());
    }
    n.checked_mul(per)
        .and_then(|d| now.checked_add(d))
        .map(ExpiresArg::At)
        .ok_or_else(bad)
}

/// `--models`: `None` (flag absent), `Some(None)` (`*`, every model) or the list.
fn parse_models(s: &Option<String>) -> anyhow::Result<Option<Option<Vec<String>>>> {
    let Some(s) = s else { return Ok(None) };
    if s.trim() == "*" {
        return Ok(Some(None));
    }
    let list: Vec<String> = s
        .split(',')
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    if list.is_empty() {
        bail!("--models: no model named (give m1,m2 or * for every model)");
    }
    Ok(Some(Some(list)))
}

fn limit_for_create(flag: &str, v: Option<LimitArg>) -> anyhow::Result<Option<u64>> {
    match v {
        None => Ok(None),
        Some(LimitArg::Set(n)) => Ok(Some(n)),
        Some(LimitArg::Clear) => {
            bail!(
                "--{flag}: `none` removes a limit with `dbgpt keys update`; leave the flag out for no limit"
            )
        }
    }
}

fn limit_for_update(v: Option<LimitArg>) -> Option<Option<u64>> {
    v.map(|l| match l {
        LimitArg::Set(n) => Some(n),
        LimitArg::Clear => None,
    })
}

fn spec_from(args: CreateArgs) -> anyhow::Result<KeySpec> {
    if !is_valid_name(&args.name) {
        bail!(
            "--name: {:?} is not 1 to 64 of the characters A-Z a-z 0-9 _ . -",
            args.name
        );
    }
    let s = args.settings;
    let models = parse_models(&s.models)?.flatten();
    let limits = Limits {
        rpm: limit_for_create("rpm", s.rpm)?,
        tpm: limit_for_create("tpm", s.tpm)?,
        max_concurrency: limit_for_create("max_concurrency", s.max_concurrency)?,
        daily_tokens: limit_for_create("daily_tokens", s.daily_tokens)?,
    };
    let expires_at = match s.expires {
        Some(ExpiresArg::At(t)) => Some(t),
        Some(ExpiresArg::Never) | None => None,
    };
    Ok(KeySpec {
        name: args.name,
        models,
        limits,
        model_limits: apply_model_limits(Default::default(), &s.model_limit, true)?,
        priority: s.priority.unwrap_or_default(),
        expires_at,
    })
}

/// The update the flags ask for; `current` gives the key's model limits when
/// `--model_limit` changes them (the update carries the whole new map).
fn update_from(s: KeySettings, current: Option<&ApiKey>) -> anyhow::Result<KeyUpdate> {
    let model_limits = if s.model_limit.is_empty() {
        None
    } else {
        let base = current
            .map(|k| k.spec.model_limits.clone())
            .unwrap_or_default();
        Some(apply_model_limits(base, &s.model_limit, false)?)
    };
    let u = KeyUpdate {
        models: parse_models(&s.models)?,
        rpm: limit_for_update(s.rpm),
        tpm: limit_for_update(s.tpm),
        max_concurrency: limit_for_update(s.max_concurrency),
        daily_tokens: limit_for_update(s.daily_tokens),
        model_limits,
        priority: s.priority,
        expires_at: s.expires.map(|e| match e {
            ExpiresArg::At(t) => Some(t),
            ExpiresArg::Never => None,
        }),
    };
    if u == KeyUpdate::default() {
        bail!(
            "nothing to change: give --models, --rpm, --tpm, --max_concurrency, --daily_tokens, --model_limit, --priority or --expires"
        );
    }
    Ok(u)
}

/// The controller's message for a failed call (its `detail`, naming the field or key).
fn failed(what: &str, e: ClientError) -> anyhow::Error {
    match e.status() {
        Some(_) => anyhow::anyhow!("{what}: {}", e.detail()),
        None => anyhow::Error::new(e).context(what.to_string()),
    }
}

/// Runs a `keys` subcommand.
pub async fn run(args: KeysArgs) -> anyhow::Result<ExitCode> {
    // Flags are checked before the controller is asked anything.
    let address = controller_address(args.address);
    let client = || ControllerClient::new(&address, Duration::from_secs(10));
    match args.command {
        KeysCommand::Create(a) => {
            let spec = spec_from(a)?;
            let created = client()?
                .keys_create(&spec)
                .await
                .map_err(|e| failed("keys create failed", e))?;
            println!(
                "created API key {} (id {})",
                created.key.spec.name, created.key.id
            );
            println!("{}", created.secret);
            eprintln!(
                "Store this key now: it is shown only this once (the controller keeps only a salted hash)."
            );
        }
        KeysCommand::List { json } => {
            let keys = client()?
                .keys_list()
                .await
                .map_err(|e| failed("keys list failed", e))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                print!("{}", render_keys(&keys, now_secs()));
            }
        }
        KeysCommand::Show { name, json } => {
            let key = client()?
                .keys_get(&name)
                .await
                .map_err(|e| failed("keys show failed", e))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&key)?);
            } else {
                print!("{}", render_key(&key, now_secs()));
            }
        }
        KeysCommand::Update(a) => {
            // Flags first (no request for bad input); the current key only when the model
            // limits change (the update carries the whole map).
            update_from(a.settings.clone(), None)?;
            let client = client()?;
            let current = if a.settings.model_limit.is_empty() {
                None
            } else {
                Some(
                    client
                        .keys_get(&a.name)
                        .await
                        .map_err(|e| failed("keys update failed", e))?,
                )
            };
            let update = update_from(a.settings, current.as_ref())?;
            let key = client
                .keys_update(&a.name, &update)
                .await
                .map_err(|e| failed("keys update failed", e))?;
            println!("updated API key {}", key.spec.name);
            print!("{}", render_key(&key, now_secs()));
        }
        KeysCommand::Revoke { name } => {
            let key = client()?
                .keys_revoke(&name)
                .await
                .map_err(|e| failed("keys revoke failed", e))?;
            println!("revoked API key {} (id {})", key.spec.name, key.id);
        }
        KeysCommand::Usage { name, since, json } => {
            if let Some(d) = &since
                && !is_day(d)
            {
                bail!("--since: {d:?} is not a YYYY-MM-DD date");
            }
            let rows = client()?
                .keys_usage(name.as_deref(), since.as_deref())
                .await
                .map_err(|e| failed("keys usage failed", e))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", render_usage(&rows));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Left-aligned columns separated by two spaces.
fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn show_limits(l: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(v) = l.rpm {
        parts.push(format!("rpm={v}"));
    }
    if let Some(v) = l.tpm {
        parts.push(format!("tpm={v}"));
    }
    if let Some(v) = l.max_concurrency {
        parts.push(format!("concurrency={v}"));
    }
    if let Some(v) = l.daily_tokens {
        parts.push(format!("daily_tokens={v}"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn show_time(t: Option<i64>) -> String {
    match t.and_then(|t| chrono::DateTime::from_timestamp(t, 0)) {
        Some(d) => d.format("%Y-%m-%d %H:%M UTC").to_string(),
        None => "never".into(),
    }
}

fn show_models(k: &ApiKey) -> String {
    match &k.spec.models {
        Some(m) => m.join(","),
        None => "*".into(),
    }
}

pub fn render_keys(keys: &[ApiKey], now: i64) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.spec.name.clone(),
                k.id.clone(),
                show_models(k),
                match k.spec.model_limits.len() {
                    0 => show_limits(&k.spec.limits),
                    n => format!("{} (+{n} per model)", show_limits(&k.spec.limits)),
                },
                k.spec.priority.as_str().to_string(),
                show_time(k.spec.expires_at),
                state(k, now).to_string(),
            ]
        })
        .collect();
    render_table(
        &[
            "NAME", "ID", "MODELS", "LIMITS", "PRIORITY", "EXPIRES", "STATE",
        ],
        &rows,
    )
}

pub fn render_key(k: &ApiKey, now: i64) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| out.push_str(&format!("{name:<10} {value}\n"));
    field("name", k.spec.name.clone());
    field("id", k.id.clone());
    field("state", state(k, now).to_string());
    field("models", show_models(k));
    field("limits", show_limits(&k.spec.limits));
    for (m, l) in &k.spec.model_limits {
        field("limits", format!("{m}: {}", show_limits(l)));
    }
    field("priority", k.spec.priority.as_str().to_string());
    field("expires", show_time(k.spec.expires_at));
    field("created", show_time(Some(k.created_at)));
    if k.revoked_at.is_some() {
        field("revoked", show_time(k.revoked_at));
    }
    field("version", k.version.to_string());
    out
}

pub fn render_usage(rows: &[UsageRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let key = if r.key_name.is_empty() {
                r.key_id.clone()
            } else {
                r.key_name.clone()
            };
            vec![
                key,
                r.model.clone(),
                r.day.clone(),
                r.requests.to_string(),
                r.prompt_tokens.to_string(),
                r.completion_tokens.to_string(),
                (r.prompt_tokens + r.completion_tokens).to_string(),
            ]
        })
        .collect();
    render_table(
        &[
            "KEY",
            "MODEL",
            "DAY",
            "REQUESTS",
            "PROMPT_TOKENS",
            "COMPLETION_TOKENS",
            "TOTAL_TOKENS",
        ],
        &cells,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(subcommand)]
        c: KeysCommand,
    }

    fn parse(args: &[&str]) -> Result<KeysCommand, String> {
        let mut v = vec!["keys"];
        v.extend_from_slice(args);
        T::try_parse_from(v).map(|t| t.c).map_err(|e| e.to_string())
    }

    #[test]
    fn bad_limits_are_refused_naming_the_flag() {
        for bad in ["-1", "0", "1.5", "x", ""] {
            let e = parse(&["create", "--name", "a", "--rpm", bad]).unwrap_err();
            assert!(e.contains("--rpm"), "{bad}: {e}");
        }
        let e = parse(&["create", "--name", "a", "--daily_tokens", "-5"]).unwrap_err();
        assert!(e.contains("--daily_tokens"), "{e}");
        let KeysCommand::Create(a) = parse(&["create", "--name", "a", "--rpm", "none"]).unwrap()
        else {
            panic!()
        };
        let e = spec_from(a).unwrap_err().to_string();
        assert!(e.starts_with("--rpm:"), "{e}");
    }

    #[test]
    fn expiry_takes_durations_and_dates() {
        let now = 1_800_000_000;
        assert_eq!(
            expires_at("30d", now),
            Ok(ExpiresArg::At(now + 30 * 86_400))
        );
        assert_eq!(expires_at("12h", now), Ok(ExpiresArg::At(now + 12 * 3_600)));
        assert_eq!(expires_at("90m", now), Ok(ExpiresArg::At(now + 90 * 60)));
        assert_eq!(
            expires_at("2027-01-31", now),
            Ok(ExpiresArg::At(1_801_353_600))
        );
        assert_eq!(expires_at("none", now), Ok(ExpiresArg::Never));
        for bad in [
            "3x",
            "d",
            "-3d",
            "0h",
            "+3d",
            "2020-01-01",
            "2027-02-30",
            "",
        ] {
            assert!(expires_at(bad, now).is_err(), "{bad}");
        }
        let e = parse(&["create", "--name", "a", "--expires", "3x"]).unwrap_err();
        assert!(e.contains("--expires"), "{e}");
    }

    #[test]
    fn create_and_update_build_what_the_flags_say() {
        let KeysCommand::Create(a) = parse(&[
            "create",
            "--name",
            "team-a",
            "--models",
            "m1, m2",
            "--rpm",
            "60",
            "--max-concurrency",
            "2",
            "--priority",
            "batch",
        ])
        .unwrap() else {
            panic!()
        };
        let s = spec_from(a).unwrap();
        assert_eq!(s.models, Some(vec!["m1".into(), "m2".into()]));
        assert_eq!(s.limits.rpm, Some(60));
        assert_eq!(s.limits.max_concurrency, Some(2));
        assert_eq!(s.priority, Priority::Batch);
        assert_eq!(s.expires_at, None);

        let KeysCommand::Update(u) =
            parse(&["update", "team-a", "--rpm", "none", "--models", "*"]).unwrap()
        else {
            panic!()
        };
        let u = update_from(u.settings, None).unwrap();
        assert_eq!(u.rpm, Some(None));
        assert_eq!(u.models, Some(None));
        assert_eq!(u.tpm, None);
        let KeysCommand::Update(u) = parse(&["update", "team-a"]).unwrap() else {
            panic!()
        };
        assert!(update_from(u.settings, None).is_err());
        let KeysCommand::Create(a) = parse(&["create", "--name", "bad name"]).unwrap() else {
            panic!()
        };
        assert!(spec_from(a).unwrap_err().to_string().starts_with("--name:"));
    }

    #[test]
    fn model_limits_are_parsed_applied_and_cleared() {
        let KeysCommand::Create(a) = parse(&[
            "create",
            "--name",
            "a",
            "--model_limit",
            "smollm2:rpm=5,tpm=100",
            "--model-limit",
            "org/q:7b:daily_tokens=9",
        ])
        .unwrap() else {
            panic!()
        };
        let s = spec_from(a).unwrap();
        assert_eq!(s.model_limits.len(), 2);
        assert_eq!(s.model_limits["smollm2"].rpm, Some(5));
        assert_eq!(s.model_limits["smollm2"].tpm, Some(100));
        assert_eq!(s.model_limits["org/q:7b"].daily_tokens, Some(9));
        for bad in [
            "smollm2", ":rpm=5", "m:rpm=0", "m:rpm=-1", "m:rps=5", "m:rpm",
        ] {
            let e = parse(&["create", "--name", "a", "--model_limit", bad]).unwrap_err();
            assert!(e.contains("--model_limit"), "{bad}: {e}");
        }
        let KeysCommand::Create(a) =
            parse(&["create", "--name", "a", "--model_limit", "m:none"]).unwrap()
        else {
            panic!()
        };
        assert!(spec_from(a).is_err());

        let (key, _) = crate::keys::new_key(s, 0);
        let KeysCommand::Update(u) = parse(&[
            "update",
            "a",
            "--model_limit",
            "smollm2:rpm=none",
            "--model_limit",
            "org/q:7b:none",
            "--model_limit",
            "new:max_concurrency=2",
        ])
        .unwrap() else {
            panic!()
        };
        // The flags alone are valid before the key is fetched.
        update_from(u.settings.clone(), None).unwrap();
        let u = update_from(u.settings, Some(&key)).unwrap();
        let m = u.model_limits.unwrap();
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m["smollm2"].rpm, None);
        assert_eq!(m["smollm2"].tpm, Some(100));
        assert_eq!(m["new"].max_concurrency, Some(2));
        assert_eq!(u.rpm, None);
    }

    #[test]
    fn tables_show_state_and_limits() {
        let (mut k, _) = crate::keys::new_key(
            KeySpec {
                name: "team-a".into(),
                limits: Limits {
                    rpm: Some(60),
                    ..Limits::default()
                },
                expires_at: Some(100),
                ..KeySpec::default()
            },
            0,
        );
        let t = render_keys(std::slice::from_ref(&k), 50);
        assert!(t.contains("rpm=60") && t.contains("active"), "{t}");
        assert!(render_keys(std::slice::from_ref(&k), 100).contains("expired"));
        k.revoked_at = Some(10);
        assert!(render_keys(&[k], 50).contains("revoked"));
    }
}
