/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every map sluice's programs share. Names carry the layout version (_v1): a layout change gets a
 * new name, so a new daemon can migrate from the old pinned map instead of misreading it. The
 * daemon pins each under <bpffs>/maps/<name> and sizes it with set_max_entries() before load.
 */
#ifndef SLUICE_MAPS_H
#define SLUICE_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "consts.h"
#include "types.h"

/* Service frontends: (ClusterIP, port, proto) -> backend set. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct frontend_key);
	__type(value, struct frontend_value);
	__uint(max_entries, MAX_FRONTENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} sl_fe_v1 SEC(".maps");

/* Every VIP that has a frontend (value unused): a fragment to one is dropped, not passed, since
 * it carries no ports to NAT by. Apart from sl_fe_v1 so frontends get that map's whole size. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, __u32);
	__uint(max_entries, MAX_FRONTENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} sl_vip_v1 SEC(".maps");

/* Backend slots: (svc_id, slot) -> backend address. Ready backends only. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct backend_key);
	__type(value, struct backend_value);
	__uint(max_entries, MAX_BACKENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} sl_be_v1 SEC(".maps");

/* Conntrack: one entry per direction of every NATed flow. LRU so a full table evicts, never
 * refuses; the daemon expires entries by state and age. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, MAX_CONNTRACK);
} sl_ct_v1 SEC(".maps");

/* sessionAffinity ClientIP: (client, svc_id) -> the backend its last new flow got. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
	__uint(max_entries, MAX_AFFINITY);
} sl_aff_v1 SEC(".maps");

/* Per-pod traffic, keyed by host-side veth ifindex; the daemon creates the entry on attach. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, __u32);
	__type(value, struct pod_stats);
	__uint(max_entries, MAX_PODS);
} sl_pod_v1 SEC(".maps");

/* Packet outcomes, indexed by enum reason. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(max_entries, REASON_MAX);
} sl_rsn_v1 SEC(".maps");

/* Per-service forward traffic, indexed by svc_id. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct counter);
	__uint(max_entries, MAX_FRONTENDS);
} sl_svc_v1 SEC(".maps");

#endif
