//! cni-conformance: a CNI conformance suite any plugin can be run against (issue 4 grows it), and
//! the network-namespace fixtures sluice's end-to-end tests share.

pub mod fixture;
