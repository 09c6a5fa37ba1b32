//! The controller's registry file under damage and a full disk, and the operator commands
//! `dbgpt registry check|backup|restore`, with the committed fixtures in `tests/data/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn fixture(env: &TestEnv, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    let dst = env.path("registry.redb");
    std::fs::copy(src, &dst).unwrap();
    dst
}

fn model_names(port: u16) -> Vec<String> {
    let (_, list) = json_req(port, "GET", "/api/controller/models", None);
    let all = list.as_array().cloned().unwrap_or_default();
    all.iter()
        .map(|i| i["model_name"].as_str().unwrap().to_string())
        .collect()
}

fn registry_cmd(env: &TestEnv, args: &[&str], registry: &Path) -> std::process::Output {
    let mut all = vec!["registry"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--registry_path", registry.to_str().unwrap()]);
    env.run(&all)
}

/// A damaged registry file: the controller exits non-zero with one clear error naming the
/// file and what to do, and `dbgpt registry check` says the same; nothing panics.
#[test]
fn a_corrupt_registry_file_is_refused_with_a_clear_error() {
    let env = TestEnv::new();
    let reg = fixture(&env, "v0.1.0_registry_corrupt.redb");
    let mut c = env.spawn_controller(free_port(), &reg, &[]);
    let status = c.wait_exit(Duration::from_secs(20));
    let err = c.logs();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(line.contains(reg.to_str().unwrap()), "{line}");
    assert!(line.contains("is damaged"), "{line}");
    assert!(line.contains("dbgpt registry check"), "{line}");
    assert!(line.contains("dbgpt registry restore"), "{line}");

    let out = registry_cmd(&env, &["check"], &reg);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains(reg.to_str().unwrap()) && err.contains("is damaged"),
        "{err}"
    );
}

/// check, backup while the controller runs, restore refused while it runs and done after.
#[test]
fn registry_check_backup_and_restore() {
    let env = TestEnv::new();
    let reg = fixture(&env, "v0.1.0_registry.redb");
    let out = registry_cmd(&env, &["check"], &reg);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("6 instance(s) of 5 model(s)"),
        "{}",
        stdout(&out)
    );

    let port = free_port();
    let mut c = env.controller_on(port, &reg, &[]);
    let backup = env.path("backup.redb");
    let out = registry_cmd(&env, &["backup", backup.to_str().unwrap()], &reg);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("backed up 6 instance(s)"),
        "{}",
        stdout(&out)
    );

    let (status, _) = json_req(
        port,
        "POST",
        "/api/controller/models",
        Some(&instance("after-backup@llm", 1)),
    );
    assert_eq!(status, 200);
    let out = registry_cmd(&env, &["restore", backup.to_str().unwrap()], &reg);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));

    assert!(c.terminate().success(), "{}", c.logs());
    let out = registry_cmd(&env, &["restore", backup.to_str().unwrap()], &reg);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("replaced file is kept"),
        "{}",
        stdout(&out)
    );
    let c = env.controller_on(port, &reg, &[]);
    let names = model_names(c.port);
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(!names.iter().any(|n| n == "after-backup@llm"), "{names:?}");
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` where mounting is not allowed (not root, no tmpfs): the test says so and stops.
    fn mount(dir: PathBuf, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` until every write fails with ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for size in [64 * 1024, 4096, 512] {
        let chunk = vec![0xA5u8; size];
        while let Ok(()) = f.write_all(&chunk).and_then(|()| f.sync_all()) {}
    }
    let last = f.write_all(&[0u8; 512]).and_then(|()| f.sync_all());
    assert_eq!(last.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    path
}

/// A full disk: registrations fail (503, nothing acknowledged), `/api/ready` says the
/// registry is failing while `/api/health` stays DB-GPT's 200, and once space returns the
/// controller recovers by itself: ready again, registrations on disk again.
#[test]
fn a_full_disk_fails_writes_and_the_controller_recovers_when_space_returns() {
    let env = TestEnv::new();
    let Some(fs) = Tmpfs::mount(env.path("tmpfs"), "4m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let reg = fs.0.join("registry.redb");
    let port = free_port();
    let mut c = env.controller_on(port, &reg, &[]);
    let register = |name: &str| {
        json_req(
            port,
            "POST",
            "/api/controller/models",
            Some(&instance(name, 1)),
        )
        .0
    };
    assert_eq!(register("before@llm"), 200);
    assert_eq!(json_req(port, "GET", "/api/ready", None).0, 200);

    let filler = fill(&fs.0);
    // Registrations until one fails (redb may still have room inside its file).
    let mut refused = None;
    for i in 0..2000 {
        let name = format!("m{i}@llm");
        if register(&name) != 200 {
            refused = Some(name);
            break;
        }
    }
    let refused = refused.expect("a full disk must refuse a registration");
    assert_eq!(register(&refused), 503);
    let (status, body) = json_req(port, "GET", "/api/ready", None);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["registry"], "failing", "{body}");
    assert_eq!(http_get_status(port, "/api/health"), Some(200));

    std::fs::remove_file(filler).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            json_req(port, "GET", "/api/ready", None).0 == 200
        }),
        "the registry did not recover: {}",
        c.logs()
    );
    assert_eq!(register(&refused), 200);
    assert!(c.terminate().success(), "{}", c.logs());

    let c = env.controller_on(port, &reg, &[]);
    let names = model_names(c.port);
    assert!(names.iter().any(|n| n == "before@llm"), "{names:?}");
    assert!(names.contains(&refused), "{names:?}");
    drop(c);
}
