//! The persisted form of an instance: one versioned postcard record per redb row.
//!
//! Postcard is not self-describing, so every value starts with a format-version byte and
//! each version has its own frozen struct. A new format gets a new struct and a new byte;
//! old bytes keep decoding forever (the fixture test below pins version 1's bytes).

use serde::{Deserialize, Serialize};

use super::Instance;
use crate::wire::controller::{InstanceKey, Timestamp};

/// Current record format version.
pub const RECORD_V1: u8 = 1;

/// Format version 1. Frozen: never reorder, rename-by-type or remove fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RecordV1 {
    seq: u64,
    model_name: String,
    host: String,
    port: u16,
    weight: Option<f64>,
    check_healthy: Option<bool>,
    healthy: bool,
    enabled: Option<bool>,
    prompt_template: Option<String>,
    last_heartbeat_us: Option<i64>,
}

/// Why a stored value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("empty record")]
    Empty,
    #[error("record format {0} is newer than this dbgpt understands")]
    UnknownVersion(u8),
    #[error("corrupt record: {0}")]
    Corrupt(#[from] postcard::Error),
}

/// Encodes an instance in the current format.
pub fn encode(inst: &Instance) -> Vec<u8> {
    let rec = RecordV1 {
        seq: inst.seq,
        model_name: inst.key.model_name.clone(),
        host: inst.key.host.clone(),
        port: inst.key.port,
        weight: inst.weight,
        check_healthy: inst.check_healthy,
        healthy: inst.healthy,
        enabled: inst.enabled,
        prompt_template: inst.prompt_template.clone(),
        last_heartbeat_us: inst.last_heartbeat.map(|t| t.0),
    };
    let mut out = vec![RECORD_V1];
    out.extend(postcard::to_allocvec(&rec).expect("postcard encoding of plain data cannot fail"));
    out
}

/// Decodes any known record version.
pub fn decode(bytes: &[u8]) -> Result<Instance, RecordError> {
    let (&version, body) = bytes.split_first().ok_or(RecordError::Empty)?;
    match version {
        RECORD_V1 => {
            let r: RecordV1 = postcard::from_bytes(body)?;
            Ok(Instance {
                key: InstanceKey {
                    model_name: r.model_name,
                    host: r.host,
                    port: r.port,
                },
                seq: r.seq,
                weight: r.weight,
                check_healthy: r.check_healthy,
                healthy: r.healthy,
                enabled: r.enabled,
                prompt_template: r.prompt_template,
                last_heartbeat: r.last_heartbeat_us.map(Timestamp),
            })
        }
        v => Err(RecordError::UnknownVersion(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Instance {
        Instance {
            key: InstanceKey {
                model_name: "smollm2@llm".into(),
                host: "127.0.0.1".into(),
                port: 8001,
            },
            seq: 3,
            weight: Some(1.0),
            check_healthy: Some(true),
            healthy: true,
            enabled: Some(true),
            prompt_template: None,
            last_heartbeat: Some(Timestamp(1_795_315_241_139_447)),
        }
    }

    /// Version-1 bytes as written by the first release. If this test fails, the on-disk
    /// format changed: add a RecordV2 instead of editing RecordV1.
    const V1_FIXTURE: &[u8] = &[
        1, 3, 11, 115, 109, 111, 108, 108, 109, 50, 64, 108, 108, 109, 9, 49, 50, 55, 46, 48, 46,
        48, 46, 49, 193, 62, 1, 0, 0, 0, 0, 0, 0, 240, 63, 1, 1, 1, 1, 1, 0, 1, 238, 243, 169, 243,
        140, 181, 176, 6,
    ];

    #[test]
    fn v1_fixture_still_decodes() {
        assert_eq!(decode(V1_FIXTURE).unwrap(), sample());
    }

    #[test]
    fn encoding_is_stable() {
        assert_eq!(encode(&sample()), V1_FIXTURE);
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        assert!(matches!(decode(&[]), Err(RecordError::Empty)));
        assert!(matches!(
            decode(&[9, 1, 2]),
            Err(RecordError::UnknownVersion(9))
        ));
        assert!(matches!(decode(&[1, 255]), Err(RecordError::Corrupt(_))));
    }
}
