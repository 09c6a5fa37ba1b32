//! Link settings for the `dbgpt` binary (not for tests or examples), which shrink what every
//! daemon keeps resident:
//!
//! * `-z pack-relative-relocs` stores the executable's ~56k relative relocations as DT_RELR
//!   (a few kilobytes) instead of a 1.3 MB `.rela.dyn` table that the dynamic loader reads
//!   at every start: ~1.3 MB less per daemon. Needs glibc ≥ 2.36 at run time (Debian 12,
//!   Ubuntu 22.10, Fedora 37, RHEL 10).
//! * `--symbol-ordering-file=packaging/symbol-order.txt` places the functions the daemons
//!   actually run (recorded by `scripts/gen-symbol-order.sh`) first and together in
//!   `.text`, so a controller maps ~3.5 MB of code instead of ~7.5 MB scattered over the
//!   17 MB that llama.cpp, candle and sqlx bring in. Names that no longer exist are skipped.
//!
//! Both are lld options (GNU ld ≥ 2.38 has the first, not the second); rustc links with its
//! bundled lld on x86_64 Linux, the only target they are applied to.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_ARCH") != "x86_64"
        || var("CARGO_CFG_TARGET_OS") != "linux"
        || var("CARGO_CFG_TARGET_ENV") != "gnu"
    {
        return;
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    let order = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/symbol-order.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    if order.exists() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
