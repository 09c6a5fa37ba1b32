//! Writes the `dbgpt` man pages and shell completions, generated from the real command-line
//! definition ([`dbgpt_cluster::cli::Cli`]), so they never drift from `--help`.
//!
//! `cargo run --example gen-docs -- OUT_DIR` writes `OUT_DIR/man/dbgpt.1` (and one page per
//! subcommand, `dbgpt-start-controller.1`, …) and `OUT_DIR/completions/{dbgpt.bash,_dbgpt,
//! dbgpt.fish}`. `scripts/build-dist.sh` runs it; the packages install the results.

use std::path::PathBuf;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> anyhow::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: gen-docs OUT_DIR")?;
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }

    let cmd = dbgpt_cluster::cli::Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)
        .with_context(|| format!("cannot write man pages to {}", man.display()))?;

    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = cmd.clone();
        let path = clap_complete::generate_to(shell, &mut cmd, "dbgpt", &completions)
            .with_context(|| format!("cannot write {shell} completions"))?;
        println!("{}", path.display());
    }
    for entry in std::fs::read_dir(&man)? {
        println!("{}", entry?.path().display());
    }
    Ok(())
}
