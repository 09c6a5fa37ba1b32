//! dbgpt-cluster (bootstrap)
