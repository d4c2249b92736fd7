/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map keys and values. Byte order is marked on every field: "net" = network byte order, as on the
 * wire; "host" = the CPU's. Rust uses these through the generated skeleton types, never a copy.
 */
#ifndef SLUICE_TYPES_H
#define SLUICE_TYPES_H

#include <linux/types.h>
#include "consts.h"

/* sl_fe_v1 key: a service frontend (ClusterIP, port, protocol). */
struct frontend_key {
	__be32 vip;             /* net */
	__be16 port;            /* net */
	__u8   proto;           /* IPPROTO_TCP / IPPROTO_UDP */
	__u8   pad;
};

/* sl_fe_v1 value. */
struct frontend_value {
	__u32 svc_id;           /* host: backend set id, index of sl_svc_v1 */
	__u32 backend_count;    /* host: ready backends in slots [0, count): new flows pick among them */
	__u32 affinity_timeout; /* host: seconds, with FE_F_AFFINITY */
	enum frontend_flags flags; /* host: FE_F_* bits */
};

/* sl_be_v1 key: slot of a backend set. */
struct backend_key {
	__u32 svc_id;           /* host */
	__u32 slot;             /* host: 0 .. backend_count-1 */
};

/* sl_be_v1 value: where the slot sends new flows. */
struct backend_value {
	__be32 addr;            /* net */
	__be16 port;            /* net */
	__u16  flags;           /* host: reserved */
};

/* sl_ct_v1 key: the 5-tuple of one direction, exactly as the packet carries it. */
struct ct_key {
	__be32 saddr;           /* net */
	__be32 daddr;           /* net */
	__be16 sport;           /* net */
	__be16 dport;           /* net */
	__u8   proto;
	__u8   pad[3];
};

/* sl_ct_v1 value: how to rewrite packets of this direction; 0 = leave that field. */
struct ct_value {
	__u64  created_ns;      /* host: bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64  last_seen_ns;    /* host: refreshed at most every ct_refresh_ns */
	__be32 nat_saddr;       /* net */
	__be32 nat_daddr;       /* net */
	__be16 nat_sport;       /* net */
	__be16 nat_dport;       /* net */
	__u32  svc_id;          /* host: frontend's backend set, for counters and purges */
	enum tcp_flag_bits tcp_flags_seen; /* host: TCPF_* seen in this direction, atomically ORed */
	enum ct_type  type;     /* one byte */
	enum ct_flags flags;    /* one byte: CT_F_* bits */
	__u8   pad[2];
};

/* sl_aff_v1 key: sessionAffinity ClientIP. */
struct affinity_key {
	__be32 client;          /* net */
	__u32  svc_id;          /* host */
};

/* sl_aff_v1 value. */
struct affinity_value {
	__u64  last_used_ns;    /* host: bpf_ktime_get_ns() */
	__be32 addr;            /* net: backend */
	__be16 port;            /* net */
	__u16  pad;
};

/* Packets and bytes; value of the per-CPU counter arrays sl_rsn_v1 and sl_svc_v1. */
struct counter {
	__u64 packets;          /* host */
	__u64 bytes;            /* host */
};

/* sl_pod_v1 value, keyed by the host-side veth's ifindex (__u32, host): per-CPU pod traffic. */
struct pod_stats {
	__u64 rx_packets;       /* host: towards the pod */
	__u64 rx_bytes;         /* host */
	__u64 tx_packets;       /* host: sent by the pod */
	__u64 tx_bytes;         /* host */
};

#endif
