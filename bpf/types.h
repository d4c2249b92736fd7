/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map keys and values. Byte order is marked on every field: "net" = network byte order, as on the
 * wire; "host" = the CPU's. Rust uses these through the generated skeleton types, never a copy.
 * IPv4 only; IPv6 will get its own keys and maps beside these (paired v4/v6 names), not wider ones.
 */
#ifndef SLUICE_TYPES_H
#define SLUICE_TYPES_H

#include <linux/types.h>
#include "consts.h"

/* sl_fe_v2 key: a service frontend. */
struct frontend_key {
	__be32 addr;            /* net: ClusterIP, LoadBalancer IP, external IP; 0 = NodePort, on
				 * every node address */
	__be16 port;            /* net */
	__u8   proto;           /* IPPROTO_TCP / IPPROTO_UDP */
	__u8   pad;
};

/*
 * sl_fe_v2 value. Every Service port has two backend sets: "cluster" (every usable endpoint) and
 * "local" (the usable endpoints on this node). Which one a new flow uses depends on who the
 * client is and the traffic policies (FE_F_*_LOCAL).
 */
struct frontend_value {
	__u32 cluster_id;       /* host: backend set id, index of sl_svc_v1 */
	__u32 cluster_count;    /* host: backends in slots [0, count) of cluster_id */
	__u32 local_id;         /* host: backend set id of this node's endpoints */
	__u32 local_count;      /* host */
	__u32 affinity_timeout; /* host: seconds, with FE_F_AFFINITY */
	__u32 gen;              /* host: bumped when an endpoint leaves either set; UDP flows re-check
				 * their backend against sl_bm_v1 when it differs from theirs */
	enum frontend_flags flags; /* host: FE_F_* bits */
	enum frontend_kind kind;   /* one byte */
	__u8  pad[3];
};

/* sl_be_v2 key: slot of a backend set. */
struct backend_key {
	__u32 set_id;           /* host */
	__u32 slot;             /* host: 0 .. count-1 */
};

/* sl_be_v2 value: where the slot sends new flows. */
struct backend_value {
	__be32 addr;            /* net: the endpoint (pod) */
	__be16 port;            /* net */
	__u16  flags;           /* host: BE_F_* bits */
	__be32 node;            /* net: the address of the endpoint's node; 0 when unknown */
};

/* sl_bm_v1 key: membership of a backend set (what UDP flows and affinity entries check). */
struct member_key {
	__u32  set_id;          /* host */
	__be32 addr;            /* net */
	__be16 port;            /* net */
	__u16  pad;
};

/* sl_ct_v2 key: the 5-tuple of one direction, exactly as the packet carries it. */
struct ct_key {
	__be32 saddr;           /* net */
	__be32 daddr;           /* net */
	__be16 sport;           /* net */
	__be16 dport;           /* net */
	__u8   proto;
	__u8   pad[3];
};

/* sl_ct_v2 value: how to rewrite packets of this direction; 0 = leave that field. */
struct ct_value {
	__u64  created_ns;      /* host: CLOCK_MONOTONIC, coarse (sl_now()) */
	__u64  last_seen_ns;    /* host: refreshed at most every ct_refresh_ns */
	__be32 nat_saddr;       /* net */
	__be32 nat_daddr;       /* net */
	__be16 nat_sport;       /* net */
	__be16 nat_dport;       /* net */
	__u32  set_id;          /* host: the backend set the flow's backend came from (0 for direct) */
	__u32  gen;             /* host: the frontend's gen when the backend was last known usable */
	__be32 tun_addr;        /* net: the peer node of an external flow (TUN: the backend's node;
				 * backend node: the ingress node) */
	enum tcp_flag_bits seen; /* host: TCPF_* | CT_SEEN_PKT seen in this direction, atomically
				  * ORed; DIRECT: the peer's in bits 8.. */
	enum ct_type  type;     /* one byte */
	enum ct_flags flags;    /* one byte: CT_F_* bits */
	__u8   pad[2];
};

/* sl_aff_v1 key: sessionAffinity ClientIP. */
struct affinity_key {
	__be32 client;          /* net */
	__u32  svc_id;          /* host: backend set id */
};

/* sl_aff_v1 value. */
struct affinity_value {
	__u64  last_used_ns;    /* host: CLOCK_MONOTONIC, coarse */
	__be32 addr;            /* net: backend */
	__be16 port;            /* net */
	__u16  pad;
};

/* sl_frag_v1 key: the packet a fragment belongs to (RFC 791: source, destination, protocol, id). */
struct frag_key {
	__be32 saddr;           /* net: as the fragments arrive */
	__be32 daddr;           /* net */
	__be16 id;              /* net */
	__u8   proto;
	__u8   pad;
};

/* sl_frag_v1 value: what the first fragment's flow did to its addresses, for the later ones. */
struct frag_value {
	__u64  first_ns;        /* host: when the first fragment passed; stale after frag_timeout_ns */
	__be32 nat_saddr;       /* net: 0 = unchanged */
	__be32 nat_daddr;       /* net: 0 = unchanged */
	__be32 tun_addr;        /* net: encapsulate towards this node (external flows); 0 = no */
	__u32  flags;           /* host: reserved */
};

/* sl_svc_v2 value, indexed by a Service port's cluster set id: per-CPU forward traffic. */
struct svc_stats {
	__u64 packets;          /* host: forward packets (pod or external clients) */
	__u64 bytes;            /* host */
	__u64 local;            /* host: external packets delivered to a backend on this node */
	__u64 forwarded;        /* host: external packets encapsulated to a backend's node */
	__u64 decapsulated;     /* host: ingress nodes' encapsulated packets served here */
};

/* Packets and bytes; value of the per-CPU counter array sl_rsn_v2. */
struct counter {
	__u64 packets;          /* host */
	__u64 bytes;            /* host */
};

/* sl_pod_v2 value, keyed by the host-side veth's ifindex (__u32, host): per-CPU pod traffic, and
 * the pod's address (the same in every CPU's copy) for the source-address check. */
struct pod_info {
	__u64  rx_packets;      /* host: towards the pod */
	__u64  rx_bytes;        /* host */
	__u64  tx_packets;      /* host: sent by the pod */
	__u64  tx_bytes;        /* host */
	__be32 addr;            /* net: the pod's IPv4 address on this veth; 0 = not checked */
	__u32  sibling;         /* host: ifindex of the next host veth of the same pod (a ring over
				 * its sluice interfaces, whose addresses it may also send from:
				 * the kernel answers on one interface for an address of another);
				 * 0 = none */
};

/* sl_scratch_v1 value: per-CPU room for what does not fit the 512 bytes of stack a program's call
 * chain shares: an ICMP error being built (new IP and ICMP headers and the quote), and the flow a
 * packet follows while its entries are created. (Programs do not nest on one CPU.) */
struct scratch {
	__u8 icmp[160];
	struct ct_value flow;
};

/* sl_node_v1 value, keyed by a node address (__be32, net): the cluster's nodes. */
struct node_value {
	__u32 flags;            /* host: NODE_F_* bits */
	__u32 pad;
};

enum node_flags {
	NODE_F_SELF = 1 << 0,   /* an address of this node */
};

#endif
