//! `dbgpt ctl status|stop|upgrade` and `dbgpt stop …`: the client side of the admin sockets.
//!
//! Daemons are found by listing their runtime directories (see [`crate::admin`]) and
//! asking each socket; nothing ever matches process names. A stop waits until the daemon
//! is really gone (its socket refuses connections and its pid no longer exists).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Subcommand;
use serde_json::{Map, Value, json};

use super::{StopArgs, StopOpts, StopTarget};
use crate::admin::client::{AdminError, connect_socket};
use crate::admin::{self, AdminClient, FoundSocket, Status};
use crate::daemon::Service;

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Show every local dbgpt daemon: service, port, pid, uptime, version, instances.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemon listening on a port, gracefully; exits 0 once it is gone.
    Stop {
        /// HTTP port of the daemon to stop.
        #[arg(long)]
        port: u16,
        /// Only a daemon of this kind (controller, worker, apiserver).
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        opts: StopOpts,
    },
    /// Replace the daemon listening on a port by the `dbgpt` binary now on disk, with the
    /// same arguments, without refusing a connection or dropping a request: the new process
    /// takes over the listening socket, pid file and admin socket, serves (a worker loads and
    /// registers its models first), then the old one finishes its in-flight requests and
    /// streams and exits. Exits 0 once the new process serves; on failure the old one keeps
    /// serving.
    Upgrade {
        /// HTTP port of the daemon to upgrade (may be left out when only one daemon runs
        /// here, as in a systemd unit's runtime directory: `ExecReload=dbgpt ctl upgrade`).
        #[arg(long)]
        port: Option<u16>,
        /// Only a daemon of this kind (controller, worker, apiserver).
        #[arg(long)]
        service: Option<String>,
        /// Seconds to wait for the new process to serve.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

/// Runs a `ctl` subcommand.
pub async fn run(cmd: CtlCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CtlCommand::Status { json } => status(json).await,
        CtlCommand::Stop {
            port,
            service,
            opts,
        } => {
            let found: Vec<_> = admin::discover()
                .into_iter()
                .filter(|s| s.port == port && service.as_ref().is_none_or(|x| *x == s.service))
                .collect();
            if found.is_empty() {
                bail!(
                    "no dbgpt daemon found for --port {port} (looked in {})",
                    looked_in()
                );
            }
            stop_all(found, &opts, true).await
        }
        CtlCommand::Upgrade {
            port,
            service,
            timeout,
        } => upgrade(port, service, Duration::from_secs(timeout)).await,
    }
}

async fn upgrade(
    port: Option<u16>,
    service: Option<String>,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let mut found: Vec<_> = admin::discover()
        .into_iter()
        .filter(|s| {
            port.is_none_or(|p| p == s.port) && service.as_ref().is_none_or(|x| *x == s.service)
        })
        .collect();
    let which = match port {
        Some(p) => format!("--port {p}"),
        None => "upgrade".to_string(),
    };
    let s = match found.len() {
        0 => bail!(
            "no dbgpt daemon found for {which} (looked in {})",
            looked_in()
        ),
        1 => found.remove(0),
        _ => bail!(
            "several daemons found ({}): say which with --port (and --service)",
            found
                .iter()
                .map(|f| format!("{} on port {}", f.service, f.port))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let port = s.port;
    let mut c = AdminClient::connect(&s.path).await?;
    let old = c.status().await?.pid;
    match c.upgrade(timeout).await {
        Ok(new) => {
            println!(
                "Upgraded {} on port {port}: pid {new} serves; pid {old} finishes its in-flight requests and exits",
                s.service
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!(
                "error: {} on port {port} (pid {old}) was not upgraded: {e}",
                s.service
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

fn looked_in() -> String {
    admin::candidate_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `dbgpt stop <target>`.
pub async fn stop_command(args: StopArgs) -> anyhow::Result<ExitCode> {
    let (service, port, opts) = match args.target {
        StopTarget::Controller(p) => (Some(Service::Controller), p.port, p.opts),
        StopTarget::Worker(p) => (Some(Service::Worker), p.port, p.opts),
        StopTarget::Apiserver(p) => (Some(Service::Apiserver), p.port, p.opts),
        StopTarget::All(o) => (None, None, o),
    };
    let label = service.map_or("dbgpt daemon", Service::label);
    let mut found: Vec<_> = admin::discover()
        .into_iter()
        .filter(|s| {
            service.is_none_or(|x| x.as_str() == s.service) && port.is_none_or(|p| p == s.port)
        })
        .collect();
    // Workers first (they deregister through the controller), the controller last.
    found.sort_by_key(|s| match Service::from_name(&s.service) {
        Some(Service::Worker) => 0,
        Some(Service::Apiserver) => 1,
        Some(Service::Controller) => 3,
        None => 2,
    });
    if found.is_empty() {
        let at = port.map(|p| format!(" on port {p}")).unwrap_or_default();
        println!("{label} process not found{at}.");
        // Naming a specific port that has nothing is an error; "stop all kinds" is not.
        return Ok(if port.is_some() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    stop_all(found, &opts, port.is_some()).await
}

async fn stop_all(
    found: Vec<FoundSocket>,
    opts: &StopOpts,
    strict: bool,
) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for s in found {
        match stop_one(&s, Duration::from_secs(opts.timeout)).await {
            Ok(Some(pid)) => println!("Stopped {} on port {} (pid {pid})", s.service, s.port),
            Ok(None) => {
                println!(
                    "{} on port {}: stale socket {} (daemon not running)",
                    s.service,
                    s.port,
                    s.path.display()
                );
                failed |= strict;
            }
            Err(e) => {
                eprintln!("error: {} on port {}: {e:#}", s.service, s.port);
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn pid_alive(pid: u32) -> bool {
    // Signal 0 probes existence; EPERM still means "exists".
    let exists = match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    };
    // A zombie has exited already; only its parent has not reaped it yet.
    exists && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Stops one daemon; `Ok(None)` if its socket was stale.
async fn stop_one(s: &FoundSocket, timeout: Duration) -> anyhow::Result<Option<u32>> {
    let mut c = match AdminClient::connect(&s.path).await {
        Ok(c) => c,
        Err(AdminError::Connect(e)) if e.is_stale() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let pid = c.status().await?.pid;
    c.stop().await?;
    drop(c);
    let deadline = Instant::now() + timeout;
    loop {
        let socket_gone = matches!(connect_socket(&s.path).await, Err(e) if e.is_stale());
        if socket_gone && !pid_alive(pid) {
            return Ok(Some(pid));
        }
        if Instant::now() > deadline {
            bail!("pid {pid} acknowledged the stop but is still running after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn status_json(s: &Status) -> Value {
    let details: Map<String, Value> = s
        .details
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "service": s.service, "port": s.port, "pid": s.pid, "version": s.version,
        "started_unix_ms": s.started_unix_ms, "uptime_ms": s.uptime_ms,
        "healthy": s.healthy, "total": s.total, "details": details,
    })
}

/// What asking every socket found gave.
#[derive(Debug, Default)]
struct Survey {
    /// Daemons that answered.
    rows: Vec<Status>,
    /// Sockets nobody listens on.
    stale: Vec<(FoundSocket, String)>,
    /// Daemons that are (or may be) running but did not answer: a full listen backlog, a
    /// socket this user may not open, a timeout.
    unanswered: Vec<(FoundSocket, String)>,
}

async fn survey(found: Vec<FoundSocket>) -> Survey {
    let mut out = Survey::default();
    for s in found {
        match AdminClient::connect(&s.path).await {
            Ok(mut c) => match c.status().await {
                Ok(st) => out.rows.push(st),
                Err(e) => out.unanswered.push((s, e.to_string())),
            },
            Err(AdminError::Connect(e)) if e.is_stale() => out.stale.push((s, e.to_string())),
            Err(e) => out.unanswered.push((s, e.to_string())),
        }
    }
    out
}

/// Prints the daemons that did not answer; true if there were any.
fn report_unanswered(unanswered: &[(FoundSocket, String)]) -> bool {
    for (s, why) in unanswered {
        eprintln!(
            "error: {} on port {} did not answer: {why}",
            s.service, s.port
        );
    }
    !unanswered.is_empty()
}

async fn status(as_json: bool) -> anyhow::Result<ExitCode> {
    let Survey {
        rows,
        stale,
        unanswered,
    } = survey(admin::discover()).await;
    // A daemon that may be running is never left out silently: named, and exit 1.
    let code = |failed: bool| {
        if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    };
    if as_json {
        let out: Vec<Value> = rows.iter().map(status_json).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(code(report_unanswered(&unanswered)));
    }
    if rows.is_empty() && unanswered.is_empty() {
        println!("No dbgpt daemons running (looked in {}).", looked_in());
    } else {
        let header = [
            "SERVICE",
            "PORT",
            "PID",
            "UPTIME",
            "VERSION",
            "HEALTHY/TOTAL",
            "REQ/S",
            "IN-FLIGHT",
            "ERRORS",
            "DETAILS",
        ];
        let table: Vec<Vec<String>> = rows.iter().map(status_row).collect();
        print_columns(&header, &table);
        for s in &rows {
            let instances = instance_lines(s);
            if !instances.is_empty() {
                println!();
                println!(
                    "{} on port {}: instances as it sees them",
                    s.service, s.port
                );
                print_columns(&["  INSTANCE", "STATE"], &instances);
            }
        }
    }
    for (s, why) in stale {
        eprintln!(
            "note: {} on port {} did not answer ({why}); socket {}",
            s.service,
            s.port,
            s.path.display()
        );
    }
    Ok(code(report_unanswered(&unanswered)))
}

/// One row of the status table: the common fields, the figures every daemon reports
/// (`-` from a daemon too old to report them), then the other details.
fn status_row(s: &Status) -> Vec<String> {
    use crate::telemetry::metrics::{
        STATUS_ERRORS, STATUS_IN_FLIGHT, STATUS_INSTANCE_PREFIX, STATUS_RATE,
    };
    let get = |key: &str| {
        s.details
            .iter()
            .find(|(k, _)| k == key)
            .map_or_else(|| "-".to_string(), |(_, v)| v.clone())
    };
    let columns = [STATUS_RATE, STATUS_IN_FLIGHT, STATUS_ERRORS];
    vec![
        s.service.clone(),
        s.port.to_string(),
        s.pid.to_string(),
        human_duration(s.uptime_ms),
        s.version.clone(),
        format!("{}/{}", s.healthy, s.total),
        get(STATUS_RATE),
        get(STATUS_IN_FLIGHT),
        get(STATUS_ERRORS),
        s.details
            .iter()
            .filter(|(k, _)| {
                !columns.contains(&k.as_str()) && !k.starts_with(STATUS_INSTANCE_PREFIX)
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
    ]
}

/// The apiserver's view of each instance (`instance …` details), one row each.
fn instance_lines(s: &Status) -> Vec<Vec<String>> {
    s.details
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(crate::telemetry::metrics::STATUS_INSTANCE_PREFIX)
                .map(|i| vec![format!("  {i}"), v.clone()])
        })
        .collect()
}

/// Left-aligned columns separated by two spaces.
fn print_columns(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_names_a_busy_daemon_instead_of_omitting_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller-8000.sock");
        let _full = crate::admin::client::FullBacklog::bind(&path);
        let found = FoundSocket {
            service: "controller".into(),
            port: 8000,
            path: path.clone(),
        };
        let s = survey(vec![found.clone()]).await;
        assert!(s.rows.is_empty() && s.stale.is_empty(), "{s:?}");
        assert_eq!(s.unanswered.len(), 1, "{s:?}");
        assert_eq!(s.unanswered[0].0, found);
        assert!(s.unanswered[0].1.contains("busy"), "{s:?}");
        // Stopping it is an error naming the socket, not "stale socket (not running)".
        let e = stop_one(&found, Duration::from_secs(1)).await.unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("busy") && e.contains(&*path.to_string_lossy()),
            "{e}"
        );
        assert!(path.exists());
    }

    #[test]
    fn status_rows_show_the_vitals_and_the_instances() {
        let st = Status {
            service: "apiserver".into(),
            port: 8100,
            pid: 7,
            version: "0.1.0".into(),
            started_unix_ms: 0,
            uptime_ms: 5_000,
            healthy: 1,
            total: 2,
            details: vec![
                ("policy".into(), "least_outstanding".into()),
                ("req_per_s".into(), "3.5".into()),
                ("in_flight".into(), "2".into()),
                ("errors".into(), "1".into()),
                (
                    "instance m@llm@127.0.0.1:8001".into(),
                    "healthy outstanding=2".into(),
                ),
            ],
        };
        let row = status_row(&st);
        assert_eq!(&row[6..], ["3.5", "2", "1", "policy=least_outstanding"]);
        assert_eq!(
            instance_lines(&st),
            [["  m@llm@127.0.0.1:8001", "healthy outstanding=2"]]
        );
        // A daemon of an older version reports none of them: dashes, nothing lost.
        let old = Status {
            details: vec![("registry".into(), "redb:/x".into())],
            ..st
        };
        assert_eq!(&status_row(&old)[6..], ["-", "-", "-", "registry=redb:/x"]);
        assert!(instance_lines(&old).is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(super::human_duration(5_000), "5s");
        assert_eq!(super::human_duration(65_000), "1m05s");
        assert_eq!(super::human_duration(3_720_000), "1h02m");
        assert_eq!(super::human_duration(90_000_000), "1d01h");
    }
}
