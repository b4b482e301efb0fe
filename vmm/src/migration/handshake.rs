//! The handshake: the source's `Hello` and the destination's `Welcome` both carry the
//! stream's magic, its version and the architecture, then a JSON summary. Either end
//! refuses a mismatch with a message naming both values (and, on the destination, a
//! `Refuse` frame so the source can say it too).

use serde::{Deserialize, Serialize};

use super::MigrationError;
use crate::config::VmConfig;

/// The first bytes of a `Hello` and a `Welcome` payload.
pub const MAGIC: &[u8; 8] = b"FLMIGRAT";
/// This stream's version (2: post-copy's frames and the summary's mode).
pub const VERSION: u32 = 2;
/// The architecture: the ELF machine number of x86-64.
pub const ARCH_X86_64: u32 = 62;

/// What the source says about the VM before sending it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The sending program, e.g. `faultline 0.1.0`.
    pub writer: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM, bytes.
    pub memory_bytes: u64,
    /// Per zone: size, backend name and transfer unit.
    pub zones: Vec<ZoneSummary>,
    /// How the VM moves: `precopy` (or `fd-local`'s handover), `postcopy`, `hybrid`.
    #[serde(default)]
    pub mode: String,
    /// Post-copy: a second connection (the preempt channel) carries page requests.
    #[serde(default)]
    pub preempt: bool,
}

/// One zone in the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneSummary {
    /// Size, bytes.
    pub size_bytes: u64,
    /// Backend name.
    pub backend: String,
    /// The unit its pages travel in (4 KiB, or 2 MiB for hugetlb).
    pub unit_bytes: u64,
}

impl Summary {
    /// The summary of `config`.
    pub fn of(config: &VmConfig) -> Self {
        Summary {
            writer: writer(),
            vcpus: config.vcpus,
            memory_bytes: config.zones.iter().map(|z| z.size_bytes).sum(),
            zones: config
                .zones
                .iter()
                .map(|z| ZoneSummary {
                    size_bytes: z.size_bytes,
                    backend: z.backend.name().to_string(),
                    unit_bytes: super::memory::unit_bytes(z),
                })
                .collect(),
            mode: "precopy".into(),
            preempt: false,
        }
    }

    /// Whether the destination runs the VM before all its memory arrived.
    pub fn is_postcopy(&self) -> bool {
        matches!(self.mode.as_str(), "postcopy" | "hybrid")
    }
}

/// `faultline VERSION`.
pub fn writer() -> String {
    format!("faultline {}", env!("CARGO_PKG_VERSION"))
}

/// A `Hello` or `Welcome` payload.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    encode_with(VERSION, ARCH_X86_64, body)
}

/// A handshake payload with any version and architecture (tests send wrong ones).
pub fn encode_with<T: Serialize>(version: u32, arch: u32, body: &T) -> Vec<u8> {
    let mut payload = MAGIC.to_vec();
    payload.extend_from_slice(&version.to_le_bytes());
    payload.extend_from_slice(&arch.to_le_bytes());
    payload.extend(serde_json::to_vec(body).expect("handshake bodies serialize"));
    payload
}

/// Checks a handshake payload from `peer` (`"source"` or `"destination"`) and decodes its body.
pub fn decode<T: for<'de> Deserialize<'de>>(peer: &str, payload: &[u8]) -> Result<T, MigrationError> {
    let refused = |reason: String| MigrationError::Handshake { reason };
    if payload.len() < 16 || &payload[..8] != MAGIC {
        return Err(refused(format!(
            "the {peer} does not speak faultline's migration stream (no {:?} magic)",
            std::str::from_utf8(MAGIC).unwrap_or("?")
        )));
    }
    let version = u32::from_le_bytes(payload[8..12].try_into().expect("4 bytes"));
    let arch = u32::from_le_bytes(payload[12..16].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(refused(format!(
            "the {peer} speaks migration stream version {version}, this faultline speaks {VERSION}; run the same faultline version on both ends"
        )));
    }
    if arch != ARCH_X86_64 {
        return Err(refused(format!(
            "the {peer} is architecture {arch} (ELF machine number), this host is {ARCH_X86_64} (x86-64); a VM migrates only to the same architecture"
        )));
    }
    serde_json::from_slice(&payload[16..]).map_err(|e| refused(format!("the {peer}'s handshake is malformed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_is_refused_naming_both_versions() {
        let good = encode(&serde_json::json!({"writer": "x"}));
        assert!(decode::<serde_json::Value>("source", &good).is_ok());
        let err = decode::<serde_json::Value>("source", &encode_with(9, ARCH_X86_64, &0)).unwrap_err().to_string();
        assert!(err.contains("version 9") && err.contains(&format!("speaks {VERSION}")), "{err}");
        let err = decode::<serde_json::Value>("destination", &encode_with(VERSION, 183, &0)).unwrap_err().to_string();
        assert!(err.contains("architecture 183"), "{err}");
        let err = decode::<serde_json::Value>("source", b"GET / HTTP/1.1\r\n\r\n").unwrap_err().to_string();
        assert!(err.contains("magic"), "{err}");
    }
}
