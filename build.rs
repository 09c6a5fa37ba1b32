//! Link settings for the `dbgpt` binary (not for tests or examples).
//!
//! `--symbol-ordering-file=packaging/symbol-order.txt` places the functions the daemons
//! actually run (recorded by `scripts/gen-symbol-order.sh`) first and together in `.text`,
//! so a controller maps ~3.5 MB of code instead of ~7.5 MB scattered over the 17 MB that
//! llama.cpp, candle and sqlx bring in. Names that no longer exist are skipped. It is an lld
//! option; rustc links with its bundled lld on x86_64 Linux, the only target it is applied to.
//!
//! Not used, on purpose: `-z pack-relative-relocs` (DT_RELR) would save another ~1.3 MB per
//! daemon (the 1.3 MB `.rela.dyn` table the loader reads at start), but makes the binary
//! require glibc ≥ 2.36, which would shut out Ubuntu 22.04 and RHEL/Rocky 9.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_ARCH") != "x86_64"
        || var("CARGO_CFG_TARGET_OS") != "linux"
        || var("CARGO_CFG_TARGET_ENV") != "gnu"
    {
        return;
    }
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
