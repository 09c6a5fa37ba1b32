//! dbgpt-cluster (bootstrap)

pub mod worker;
