//! Where objects come from: `sluicectl apply` ([`applied`], persisted in an append-only log) and
//! the manifests directory ([`manifests`], with a durable copy of each file's last good version)
//! and the Kubernetes watch ([`kube`]). Each yields parsed objects for keys (or their removal) and
//! says whether it has loaded completely; none knows the model. The services store merges them.

pub mod applied;
pub mod kube;
pub mod manifests;

use serde::Serialize;

/// How a source is doing, for `sluicectl status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    /// e.g. "applied objects", "manifests /etc/sluice/manifests".
    pub name: String,
    /// Everything it holds was read and parsed at its last load or scan.
    pub loaded: bool,
    /// It has loaded completely at least once since the daemon started. Until every source has,
    /// the daemon deletes nothing it cannot explain from the maps.
    pub loaded_once: bool,
    /// Objects it holds now.
    pub objects: usize,
    /// What went wrong last ("" when nothing did).
    pub last_error: String,
}

impl SourceStatus {
    pub fn new(name: impl Into<String>) -> SourceStatus {
        SourceStatus {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Records the outcome of a load or scan.
    pub fn set(&mut self, complete: bool, error: Option<String>) {
        self.loaded = complete;
        self.loaded_once |= complete;
        if let Some(e) = error {
            self.last_error = e;
        } else if complete {
            self.last_error.clear();
        }
    }
}

/// A fast 64-bit hash of bytes (change detection and torn-record checks; not cryptographic).
pub fn hash64(bytes: &[u8]) -> u64 {
    const P: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = (bytes.len() as u64) ^ 0x243f_6a88_85a3_08d3;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(P).rotate_left(29);
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(P);
    // Final mix (splitmix64) so every input bit reaches every output bit.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_sees_every_byte_and_the_length() {
        let a = hash64(b"apiVersion: v1\nkind: Service\n");
        assert_ne!(a, hash64(b"apiVersion: v1\nkind: Servicf\n"));
        assert_ne!(hash64(b""), hash64(b"\0"));
        assert_ne!(hash64(&[0; 16]), hash64(&[0; 17]));
        assert_eq!(a, hash64(b"apiVersion: v1\nkind: Service\n"));
    }
}
