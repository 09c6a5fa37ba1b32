use super::*;
use crate::registry::RedbRegistry;
use crate::registry::Registry;
use crate::registry::redb_store::tests::{V010, V010_CORRUPT, data, encoded, write_raw_rows};
use crate::wire::controller::InstanceInput;

fn input(name: &str, port: u16) -> InstanceInput {
    InstanceInput {
        model_name: name.into(),
        host: "127.0.0.1".into(),
        port,
        weight: None,
        check_healthy: Some(true),
        enabled: None,
        prompt_template: None,
        remove_from_registry: false,
    }
}

fn copy_of(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join("registry.redb");
    std::fs::copy(data(name), &path).unwrap();
    path
}

fn models(path: &Path) -> Vec<String> {
    let (_, scan) = file::open(path, &file::create).unwrap();
    let mut i = scan.instances;
    i.sort_by_key(|i| i.seq);
    i.into_iter().map(|i| i.key.model_name).collect()
}

#[test]
fn check_passes_the_release_file_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_of(dir.path(), V010);
    let before = std::fs::read(&path).unwrap();
    assert_eq!(check(&path).unwrap(), ExitCode::SUCCESS);
    assert!(std::fs::read(&path).unwrap() == before);
    // No scratch file left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn check_refuses_a_corrupt_file_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_of(dir.path(), V010_CORRUPT);
    let err = check(&path).unwrap_err();
    match err.downcast_ref::<RegistryError>() {
        Some(RegistryError::Corrupt { path: p, .. }) => assert_eq!(p, &path.display().to_string()),
        other => panic!("{other:?}: {err:#}"),
    }
}

#[test]
fn check_fails_on_unreadable_records_and_on_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.redb");
    write_raw_rows(
        &path,
        &[
            (("good@llm", "127.0.0.1", 1), encoded("good@llm", 1, 0)),
            (("bad@llm", "127.0.0.1", 2), vec![1, 255]),
        ],
    );
    assert_eq!(check(&path).unwrap(), ExitCode::FAILURE);
    let missing = dir.path().join("nope.redb");
    let err = check(&missing).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err:#}");
    assert!(!missing.exists());
}

/// A backup taken while a controller holds (and writes) the file is a verified copy.
#[tokio::test]
async fn backup_while_the_controller_runs_then_restore_after_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let r = RedbRegistry::open(&path, Duration::from_secs(60)).unwrap();
    r.register(input("a@llm", 1)).await.unwrap();
    r.register(input("b@llm", 1)).await.unwrap();
    let dest = dir.path().join("backup.redb");
    backup(&path, &dest, false).unwrap();
    assert_eq!(models(&dest), ["a@llm", "b@llm"]);
    let err = backup(&path, &dest, false).unwrap_err();
    assert!(err.to_string().contains("--force"), "{err:#}");

    r.register(input("c@llm", 1)).await.unwrap();
    let err = restore(&dest, &path).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err:#}");
    drop(r);

    restore(&dest, &path).unwrap();
    assert_eq!(models(&path), ["a@llm", "b@llm"]);
    // The replaced file (with c) is kept beside it.
    let kept: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".replaced-"))
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(models(&kept[0]), ["a@llm", "b@llm", "c@llm"]);
}

/// A restore run as root keeps the replaced file's owner and mode, so the controller's own
/// user can still write the registry.
#[test]
fn restore_keeps_the_owner_and_mode_of_the_replaced_file() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let path = copy_of(dir.path(), V010);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let me = std::fs::metadata(&path).unwrap();
    // As root, hand the file to another user first (as under systemd's User=dbgpt).
    let owner = if me.uid() == 0 { 65534 } else { me.uid() };
    if owner != me.uid() {
        std::os::unix::fs::chown(&path, Some(owner), Some(owner)).unwrap();
    }
    restore(&data(V010), &path).unwrap();
    let now = std::fs::metadata(&path).unwrap();
    assert_eq!(now.mode() & 0o7777, 0o640);
    assert_eq!(now.uid(), owner);
}

#[test]
fn restore_refuses_a_damaged_backup_and_keeps_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_of(dir.path(), V010);
    let before = std::fs::read(&path).unwrap();
    let bad = dir.path().join("bad.redb");
    std::fs::copy(data(V010_CORRUPT), &bad).unwrap();
    let err = restore(&bad, &path).unwrap_err();
    assert!(err.to_string().contains("bad.redb"), "{err:#}");
    assert!(std::fs::read(&path).unwrap() == before);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

/// Restoring onto a damaged registry (the reason to restore) replaces it.
#[test]
fn restore_replaces_a_damaged_registry() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_of(dir.path(), V010_CORRUPT);
    assert!(check(&path).is_err());
    restore(&data(V010), &path).unwrap();
    assert_eq!(check(&path).unwrap(), ExitCode::SUCCESS);
    assert_eq!(models(&path).len(), 6);
}

#[test]
fn the_subcommands_parse() {
    use clap::Parser;
    let cli = crate::cli::Cli::try_parse_from([
        "dbgpt",
        "registry",
        "backup",
        "/tmp/b.redb",
        "--registry_path",
        "/tmp/r.redb",
        "--force",
    ])
    .unwrap();
    let crate::cli::Command::Registry(RegistryCommand::Backup { dest, force, file }) = cli.command
    else {
        panic!("{cli:?}")
    };
    assert_eq!(dest, Path::new("/tmp/b.redb"));
    assert!(force);
    assert_eq!(file.resolve().unwrap(), Path::new("/tmp/r.redb"));
}
