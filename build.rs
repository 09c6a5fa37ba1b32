//! Link settings for the `dbgpt` binary.
//!
//! `-z pack-relative-relocs` stores the executable's ~56k relative relocations as DT_RELR
//! (a few kilobytes) instead of a 1.3 MB `.rela.dyn` table that the dynamic loader reads,
//! page by page, at every start: every daemon's resident memory is ~1.3 MB smaller and it
//! starts a little faster. Needs glibc ≥ 2.36 at run time (Debian 12, Ubuntu 22.10,
//! Fedora 37, RHEL 10) and lld or GNU ld ≥ 2.38 at link time.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
