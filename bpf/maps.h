/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every map sluice's programs share. Names carry the layout version (_vN): a layout change gets a
 * new name, so a new daemon can migrate from the old pinned map instead of misreading it. The
 * daemon pins each under <bpffs>/maps/<name> and sizes it with set_max_entries() before load.
 */
#ifndef SLUICE_MAPS_H
#define SLUICE_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "consts.h"
#include "types.h"

/* Service frontends: (address, port, proto) -> backend sets. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct frontend_key);
	__type(value, struct frontend_value);
	__uint(max_entries, MAX_FRONTENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} sl_fe_v2 SEC(".maps");

/* Every address that has a frontend (value unused): a later fragment to one is dropped unless
 * its first fragment was seen. Apart from sl_fe_v2 so frontends get that map's whole size. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, __u32);
	__uint(max_entries, MAX_FRONTENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} sl_vip_v1 SEC(".maps");

/* Backend slots: (set id, slot) -> backend. Usable backends only. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct backend_key);
	__type(value, struct backend_value);
	__uint(max_entries, MAX_BACKENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} sl_be_v2 SEC(".maps");

/* Backend set membership: (set id, backend) -> 1, the same backends as the slots. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct member_key);
	__type(value, __u32);
	__uint(max_entries, MAX_BACKENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} sl_bm_v1 SEC(".maps");

/* Conntrack: both legs of every NATed flow, and one entry per direct flow of a local pod. LRU so
 * a full table evicts, never refuses; the daemon expires entries by state and age and repairs
 * half flows; the datapath re-creates a missing reply leg on the next forward packet. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, MAX_CONNTRACK);
} sl_ct_v2 SEC(".maps");

/* sessionAffinity ClientIP: (client, set id) -> the backend its last new flow got. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
	__uint(max_entries, MAX_AFFINITY);
} sl_aff_v1 SEC(".maps");

/* IPv4 fragments: what the first fragment of a NATed flow's packet did, for the later ones. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_value);
	__uint(max_entries, MAX_FRAGMENTS);
} sl_frag_v1 SEC(".maps");

/* Per-pod traffic and address, keyed by host-side veth ifindex; the daemon creates the entry on
 * attach. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, __u32);
	__type(value, struct pod_info);
	__uint(max_entries, MAX_PODS);
} sl_pod_v2 SEC(".maps");

/* The cluster's node addresses (from Node objects), this node's own flagged NODE_F_SELF. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, struct node_value);
	__uint(max_entries, MAX_NODES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} sl_node_v1 SEC(".maps");

/* Packet outcomes, indexed by enum reason. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(max_entries, REASON_MAX);
} sl_rsn_v2 SEC(".maps");

/* Conntrack entry events, indexed by enum ct_event (packets = entries). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(max_entries, CT_EV_MAX);
} sl_ctev_v1 SEC(".maps");

/* Per-service forward traffic, indexed by cluster set id. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct svc_stats);
	__uint(max_entries, MAX_FRONTENDS);
} sl_svc_v2 SEC(".maps");

/* Per-CPU scratch space (one entry). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct scratch);
	__uint(max_entries, 1);
} sl_scratch_v1 SEC(".maps");

#endif
