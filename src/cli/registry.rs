//! `dbgpt registry check|backup|restore`: operator tools for the controller's redb file.
//!
//! All three work on a verified copy: the file is copied until two consecutive reads are
//! identical (so a controller committing meanwhile cannot tear the copy), and the copy is
//! opened exactly as the controller opens a registry (redb's integrity check, every record
//! decoded). `check` and `backup` therefore never modify the registry and work while the
//! controller runs; `restore` replaces the file only with a backup that verified cleanly,
//! refuses while a controller holds the file, and keeps the replaced file next to it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::controller::config::{ControllerArgs, RegistryType};
use crate::registry::redb_store::file::{self, Scan};
use crate::registry::{Instance, RegistryError};

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Verify the registry file (redb's integrity check, then every record decoded) and print
    /// a summary; exits 1 if anything is wrong. Works while the controller runs.
    Check(FileArgs),
    /// Write a verified copy of the registry file to DEST. Works while the controller runs.
    Backup {
        /// Where to write the copy.
        dest: PathBuf,
        /// Overwrite DEST if it exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        file: FileArgs,
    },
    /// Replace the registry file with BACKUP after verifying it. Stop the controller first;
    /// the replaced file is kept as FILE.replaced-TIMESTAMP.
    Restore {
        /// A file written by `dbgpt registry backup` (or any registry file).
        backup: PathBuf,
        #[command(flatten)]
        file: FileArgs,
    },
}

/// Which registry file: the controller's, found the way `dbgpt start controller` finds it.
#[derive(Debug, Clone, clap::Args)]
pub struct FileArgs {
    /// redb registry file [default: the controller's, from --config or $DBGPT_STATE_DIR/registry.redb, ~/.local/share/dbgpt/registry.redb, or /var/lib/dbgpt/registry.redb for root]
    #[arg(
        long = "registry_path",
        visible_alias = "registry-path",
        env = "CONTROLLER_REGISTRY_PATH"
    )]
    pub registry_path: Option<PathBuf>,
    /// The controller's TOML configuration file (its registry_path is used).
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
}

impl FileArgs {
    fn resolve(self) -> anyhow::Result<PathBuf> {
        let mut args = ControllerArgs {
            registry_path: self.registry_path,
            ..ControllerArgs::default()
        };
        args.common.config = self.config;
        let cfg = args.resolve()?;
        if cfg.registry_type != RegistryType::Embedded {
            bail!(
                "the controller is configured with a database registry; `dbgpt registry` works on the embedded redb file (use the database's own backup tools)"
            );
        }
        Ok(cfg.registry_path)
    }
}

/// Runs a `registry` subcommand.
pub fn run(cmd: RegistryCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RegistryCommand::Check(file) => check(&file.resolve()?),
        RegistryCommand::Backup { dest, force, file } => {
            backup(&file.resolve()?, &dest, force).map(|()| ExitCode::SUCCESS)
        }
        RegistryCommand::Restore { backup, file } => {
            restore(&backup, &file.resolve()?).map(|()| ExitCode::SUCCESS)
        }
    }
}

/// `check`: prints a summary; exit code 1 if the file has unreadable records.
pub fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let work = Scratch(scratch_path(&std::env::temp_dir(), path, "check"));
    let scan = verified_copy(path, &work.0)?;
    println!("{}", summary(path, &scan.instances));
    for bad in &scan.unreadable {
        println!("  unreadable record {}: {}", bad.key, bad.error);
    }
    if scan.unreadable.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "registry {}: {} unreadable record(s); the controller skips them (restore a backup to get them back)",
        path.display(),
        scan.unreadable.len()
    );
    Ok(ExitCode::FAILURE)
}

/// `backup`: a verified copy of `path` at `dest`.
pub fn backup(path: &Path, dest: &Path, force: bool) -> anyhow::Result<()> {
    if dest.exists() && !force {
        bail!("{} exists (use --force to overwrite it)", dest.display());
    }
    let dir = parent_dir(dest);
    let work = Scratch(scratch_path(dir, dest, "backup"));
    let scan = clean(verified_copy(path, &work.0)?, path)?;
    std::fs::rename(&work.0, dest)
        .with_context(|| format!("cannot move the copy to {}", dest.display()))?;
    sync_dir(dir)?;
    println!(
        "backed up {} instance(s) from {} to {}",
        scan.instances.len(),
        path.display(),
        dest.display()
    );
    Ok(())
}

/// `restore`: replaces `path` with a verified copy of `backup`.
pub fn restore(backup: &Path, path: &Path) -> anyhow::Result<()> {
    if !backup.is_file() {
        bail!("backup {} does not exist", backup.display());
    }
    if in_use(path) {
        bail!(
            "registry {} is in use by a running controller; stop it first (`dbgpt stop controller`)",
            path.display()
        );
    }
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let work = Scratch(scratch_path(dir, path, "restore"));
    let scan = clean(verified_copy(backup, &work.0)?, backup)?;
    let mut kept = String::new();
    if let Ok(old) = std::fs::metadata(path) {
        same_owner_and_mode(&work.0, &old)?;
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
        let aside = PathBuf::from(format!("{}.replaced-{stamp}", path.display()));
        std::fs::rename(path, &aside)
            .with_context(|| format!("cannot move {} aside", path.display()))?;
        kept = format!(" (the replaced file is kept as {})", aside.display());
    }
    std::fs::rename(&work.0, path)
        .with_context(|| format!("cannot move the backup into {}", path.display()))?;
    sync_dir(dir)?;
    println!(
        "restored {} instance(s) from {} into {}{kept}",
        scan.instances.len(),
        backup.display(),
        path.display()
    );
    Ok(())
}

fn summary(path: &Path, instances: &[Instance]) -> String {
    let models: std::collections::HashSet<&str> = instances
        .iter()
        .map(|i| i.key.model_name.as_str())
        .collect();
    let healthy = instances.iter().filter(|i| i.healthy).count();
    format!(
        "registry {}: redb integrity ok, schema {}, {} instance(s) of {} model(s), {} healthy when last written",
        path.display(),
        file::SCHEMA_VERSION,
        instances.len(),
        models.len(),
        healthy
    )
}

/// Refuses a scan with unreadable records (a backup is only ever a clean one).
fn clean(scan: Scan, source: &Path) -> anyhow::Result<Scan> {
    if !scan.unreadable.is_empty() {
        bail!(
            "{} has {} unreadable record(s); see `dbgpt registry check --registry_path {}`",
            source.display(),
            scan.unreadable.len(),
            source.display()
        );
    }
    Ok(scan)
}

/// Copies `src` to `work` (a path this command owns) once two consecutive reads of `src`
/// agree, and opens the copy the way the controller does. Errors name `src`.
fn verified_copy(src: &Path, work: &Path) -> anyhow::Result<Scan> {
    if !src.is_file() {
        bail!("registry {} does not exist", src.display());
    }
    let read = || std::fs::read(src).with_context(|| format!("cannot read {}", src.display()));
    let mut bytes = read()?;
    let mut stable = false;
    for _ in 0..50 {
        let again = read()?;
        if again == bytes {
            stable = true;
            break;
        }
        bytes = again;
        std::thread::sleep(Duration::from_millis(20));
    }
    if !stable {
        bail!(
            "{} kept changing while it was copied; try again",
            src.display()
        );
    }
    write_synced(work, &bytes)?;
    let (db, scan) = file::open(work, &file::create).map_err(|e| naming(e, src))?;
    drop(db);
    Ok(scan)
}

/// The same error about `path` instead of the scratch copy.
fn naming(e: RegistryError, path: &Path) -> RegistryError {
    let path = path.display().to_string();
    match e {
        RegistryError::Locked { .. } => RegistryError::Locked { path },
        RegistryError::Open { reason, .. } => RegistryError::Open { path, reason },
        RegistryError::Corrupt { reason, .. } => RegistryError::Corrupt { path, reason },
        e @ RegistryError::Storage(_) => e,
    }
}

/// Whether a controller holds the file (redb refuses a reader while a writer has it).
fn in_use(path: &Path) -> bool {
    path.exists()
        && matches!(
            file::contain(|| redb::ReadOnlyDatabase::open(path).map(drop)),
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen))
        )
}

/// Gives the restored file the owner and mode of the file it replaces (a restore run as
/// root must leave a file the controller's own user can still write).
fn same_owner_and_mode(path: &Path, like: &std::fs::Metadata) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mine = std::fs::metadata(path)?;
    if (mine.uid(), mine.gid()) != (like.uid(), like.gid()) {
        std::os::unix::fs::chown(path, Some(like.uid()), Some(like.gid())).with_context(|| {
            format!(
                "cannot give {} the owner of the file it replaces (uid {}, gid {}); run the restore as that user or as root",
                path.display(),
                like.uid(),
                like.gid()
            )
        })?;
    }
    std::fs::set_permissions(path, like.permissions())
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A scratch file next to `like` in `dir`, unique to this process.
fn scratch_path(dir: &Path, like: &Path, what: &str) -> PathBuf {
    let name = like.file_name().unwrap_or_default().to_string_lossy();
    dir.join(format!(".{name}.{what}-{}.tmp", std::process::id()))
}

/// A scratch file removed when dropped (if it was not moved into place).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests;
