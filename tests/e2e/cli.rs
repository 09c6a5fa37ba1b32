//! `dbgpt model list`, `--help` and configuration sources, with the real binary.

use serde_json::Value;

use crate::common::*;

#[test]
fn model_list_table_json_and_filters() {
    let env = TestEnv::new();
    let c = env.controller(&[]);
    json_req(
        c.port,
        "POST",
        "/api/controller/models",
        Some(&instance("smollm2@llm", 8001)),
    );
    json_req(
        c.port,
        "POST",
        "/api/controller/models",
        Some(&instance("WorkerManager@service", 8001)),
    );
    json_req(
        c.port,
        "POST",
        "/api/controller/models",
        Some(&instance("all-minilm@text2vec", 8002)),
    );

    let out = env.run(&["model", "--address", &c.url(), "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t = stdout(&out);
    for col in [
        "Model Name",
        "Model Type",
        "Host",
        "Port",
        "Healthy",
        "Enabled",
        "Prompt Template",
        "Last Heartbeat",
    ] {
        assert!(t.contains(col), "{col} missing:\n{t}");
    }
    assert!(
        t.contains("| WorkerManager |") && t.contains("service"),
        "{t}"
    );
    assert!(t.contains("True"), "{t}");
    assert_eq!(t.lines().filter(|l| l.starts_with('|')).count(), 4);

    // --model_name queries <name>@<type>.
    let out = env.run(&[
        "model",
        "--address",
        &c.url(),
        "list",
        "--model_name",
        "all-minilm",
        "--model_type",
        "text2vec",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["model_name"], "all-minilm@text2vec");

    // CONTROLLER_ADDRESS, and a comma list whose first entry is down.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = env
        .cmd()
        .args(["model", "list", "--json"])
        .env("CONTROLLER_ADDRESS", format!("{dead},{}", c.url()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&out))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // A machine without CA certificates still talks plain HTTP to the cluster.
    let out = env
        .cmd()
        .args(["model", "--address", &c.url(), "list", "--json"])
        .env("SSL_CERT_FILE", "/nonexistent")
        .env("SSL_CERT_DIR", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // Without any address, the local controller is found through its admin socket.
    let out = env.run(&["model", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&out))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn model_list_against_a_down_controller_is_one_line_exit_1() {
    let env = TestEnv::new();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = env.run(&["model", "--address", &dead, "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&dead), "{err}");
}

#[test]
fn help_explains_options_and_bad_flags_are_named() {
    let env = TestEnv::new();
    let out = env.run(&["start", "controller", "--help"]);
    let h = stdout(&out);
    for opt in [
        "--port",
        "--host",
        "--registry_path",
        "--heartbeat_timeout_secs",
        "--heartbeat_interval_secs",
        "--daemon",
        "--config",
        "--log_level",
        "CONTROLLER_PORT",
    ] {
        assert!(h.contains(opt), "{opt} missing from --help:\n{h}");
    }
    let out = env.run(&["start", "controller", "--prot", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--prot"));
    let out = env.run(&["start", "controller", "--port", "99999"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--port"), "{}", stderr(&out));
    let out = env.run(&["start", "controller", "--heartbeat_timeout_secs", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--heartbeat_timeout_secs"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn env_and_config_file_sources() {
    let env = TestEnv::new();
    let port = free_port();
    let cfg = env.path("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[controller]\nhost = \"127.0.0.1\"\nport = {port}\nregistry_path = \"{}\"\n",
            env.path("f.redb").display()
        ),
    )
    .unwrap();
    // The file gives the port; CONTROLLER_HEARTBEAT_TIMEOUT_SECS comes from the environment.
    let mut d = {
        std::fs::create_dir_all(env.log_dir()).unwrap();
        let log = env.log_dir().join("cfg.out");
        let f = std::fs::File::create(&log).unwrap();
        let child = env
            .cmd()
            .args(["start", "controller", "--config", cfg.to_str().unwrap()])
            .env("CONTROLLER_HEARTBEAT_TIMEOUT_SECS", "1")
            .env("CONTROLLER_HEARTBEAT_INTERVAL_SECS", "1")
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Daemon {
            child: Some(child),
            port,
            log,
        }
    };
    d.wait_healthy();
    json_req(
        port,
        "POST",
        "/api/controller/models",
        Some(&instance("a@llm", 1)),
    );
    assert!(
        wait_until(std::time::Duration::from_secs(5), || {
            json_req(
                port,
                "GET",
                "/api/controller/models?healthy_only=true",
                None,
            )
            .1 == serde_json::json!([])
        }),
        "env timeout of 1 s applies"
    );
    assert!(d.terminate().success());
    // A typo in the file is named.
    std::fs::write(&cfg, "[controller]\nprot = 1\n").unwrap();
    let out = env.run(&["start", "controller", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("prot"), "{}", stderr(&out));
}
