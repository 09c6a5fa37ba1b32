//! The admin channel: a Unix socket every daemon listens on, so that `dbgpt ctl status`
//! and `dbgpt stop …` talk to daemons instead of grepping process lists.
//!
//! Each daemon binds `<runtime dir>/<service>-<port>.sock` (mode 0600) next to its locked
//! pid file `<service>-<port>.pid`. The runtime directory is `$DBGPT_RUNTIME_DIR` when set
//! (systemd units set it to their `RuntimeDirectory=`), else `/run/dbgpt` for root, else
//! `$XDG_RUNTIME_DIR/dbgpt`, else `/tmp/dbgpt-<uid>`. Clients find daemons by listing the
//! candidate directories (and their subdirectories, for systemd's per-unit directories).

pub mod client;
pub mod proto;
pub mod server;

use std::path::{Path, PathBuf};

pub use client::AdminClient;
pub use proto::Status;

/// Environment variable that pins the runtime directory.
pub const RUNTIME_DIR_ENV: &str = "DBGPT_RUNTIME_DIR";

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The directory this process puts its socket and pid file in.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(RUNTIME_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if uid() == 0 {
        return PathBuf::from("/run/dbgpt");
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(x).join("dbgpt");
    }
    std::env::temp_dir().join(format!("dbgpt-{}", uid()))
}

/// Every directory a client should look in for daemons, most specific first.
pub fn candidate_dirs() -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os(RUNTIME_DIR_ENV).filter(|d| !d.is_empty()) {
        return vec![PathBuf::from(d)];
    }
    let mut dirs = vec![PathBuf::from("/run/dbgpt")];
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(x).join("dbgpt"));
    }
    dirs.push(std::env::temp_dir().join(format!("dbgpt-{}", uid())));
    dirs.dedup();
    dirs
}

/// Socket file name of a service instance.
pub fn socket_name(service: &str, port: u16) -> String {
    format!("{service}-{port}.sock")
}

/// Pid file name of a service instance.
pub fn pid_name(service: &str, port: u16) -> String {
    format!("{service}-{port}.pid")
}

/// Parses `<service>-<port>.sock`.
pub fn parse_socket_name(name: &str) -> Option<(String, u16)> {
    let stem = name.strip_suffix(".sock")?;
    let (service, port) = stem.rsplit_once('-')?;
    Some((service.to_string(), port.parse().ok()?))
}

/// A daemon socket found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundSocket {
    pub service: String,
    pub port: u16,
    pub path: PathBuf,
}

fn scan_dir(dir: &Path, out: &mut Vec<FoundSocket>, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() && depth > 0 {
            scan_dir(&path, out, depth - 1);
        } else if let Some((service, port)) = e.file_name().to_str().and_then(parse_socket_name) {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_socket() {
                out.push(FoundSocket {
                    service,
                    port,
                    path,
                });
            }
        }
    }
}

/// Lists daemon sockets in every candidate directory (one level of subdirectories too).
pub fn discover() -> Vec<FoundSocket> {
    let mut out = Vec::new();
    for d in candidate_dirs() {
        scan_dir(&d, &mut out, 1);
    }
    out.dedup_by(|a, b| a.path == b.path);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_round_trip() {
        assert_eq!(socket_name("controller", 8000), "controller-8000.sock");
        assert_eq!(
            parse_socket_name("controller-8000.sock"),
            Some(("controller".into(), 8000))
        );
        assert_eq!(parse_socket_name("worker-x.sock"), None);
        assert_eq!(parse_socket_name("controller-8000.pid"), None);
    }
}
