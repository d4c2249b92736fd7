//! sluice-core: what the CNI plugin, the daemon and the CLI share.
//!
//! - [`proto`]: the gRPC API of `sluiced` (proto/sluice.proto), client and server.
//! - [`bpf`] (feature `bpf`): the libbpf-rs skeletons built from bpf/*.bpf.c. The map key/value
//!   types come from the skeleton (`bpf::pod_veth::types`), generated from bpf/types.h.

pub mod proto {
    tonic::include_proto!("sluice.v1");
}

pub mod client;

#[cfg(feature = "bpf")]
pub mod bpf;

/// Where the CNI plugin and sluicectl find the daemon unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/sluice/sluiced.sock";
