# Sourced by every script that builds the optimised binary (the packages, the benchmarks,
# the symbol order): the shipped binary's settings. Our crate at opt-level 3 without debug
# assertions and overflow checks, as the dependencies always are in the dev profile
# (Cargo.toml: [profile.dev.package."*"]); so only our crate is rebuilt, and the dependencies
# are the test suite's. Plain `cargo build`/`cargo test` keep both checks in our crate.
export CARGO_PROFILE_DEV_OPT_LEVEL=3
export CARGO_PROFILE_DEV_DEBUG_ASSERTIONS=false
export CARGO_PROFILE_DEV_OVERFLOW_CHECKS=false
