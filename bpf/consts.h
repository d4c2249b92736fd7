/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Limits, flags and enums shared by every sluice BPF program and, through the skeleton, by Rust. */
#ifndef SLUICE_CONSTS_H
#define SLUICE_CONSTS_H

/* Default map sizes; the daemon overrides each with set_max_entries() before load. */
#define MAX_FRONTENDS     65536
#define MAX_BACKENDS      262144
#define MAX_CONNTRACK     524288
#define MAX_AFFINITY      65536
#define MAX_PODS          16384
#define MAX_FRAGMENTS     8192
#define MAX_NODES         4096
#define POD_SIBLINGS_MAX  7      /* other sluice interfaces of one pod its source check follows */

/*
 * The enums below type struct fields in types.h, so they reach BTF and the Rust skeleton: userspace
 * never copies a value by hand. Packed enums are one byte.
 */

/* frontend_value.flags (bits) */
enum frontend_flags {
	FE_F_AFFINITY     = 1 << 0, /* sessionAffinity: ClientIP */
	FE_F_EXTERNAL     = 1 << 1, /* NodePort, LoadBalancer IP or external IP: served on the uplink */
	FE_F_ETP_LOCAL    = 1 << 2, /* externalTrafficPolicy: Local (external clients: local set only) */
	FE_F_ITP_LOCAL    = 1 << 3, /* internalTrafficPolicy: Local (pod clients: local set only) */
};

/* frontend_value.kind: what kind of address the frontend is (for counters and display) */
enum frontend_kind {
	FE_KIND_CLUSTER_IP    = 1,
	FE_KIND_NODE_PORT     = 2,
	FE_KIND_LOAD_BALANCER = 3,
	FE_KIND_EXTERNAL_IP   = 4,
} __attribute__((packed));

/* backend_value.flags (bits) */
enum backend_flags {
	BE_F_LOCAL = 1 << 0, /* the endpoint runs on this node */
};

/* config.h lb_mode: how an external flow to a remote backend is answered */
enum lb_mode {
	LB_MODE_DSR    = 0, /* the backend's node answers the client itself */
	LB_MODE_TUNNEL = 1, /* replies are tunnelled back to the ingress node, which answers */
};

/* ct_value.type: what an entry describes */
enum ct_type {
	CT_TYPE_FWD    = 1, /* a flow's first leg (client -> frontend, or a pod's port-translated direct
			     * flow), rewritten towards the backend */
	CT_TYPE_REV    = 2, /* its reply leg (backend -> client), rewritten back */
	CT_TYPE_DIRECT = 3, /* an untranslated flow of a local pod, keyed by the direction that reaches
			     * the pod: no rewrite, tracked so a NATed flow never takes its tuple */
	CT_TYPE_TUN    = 4, /* ingress node: an external flow sent to a remote backend's node */
} __attribute__((packed));

/* ct_value.flags (bits) */
enum ct_flags {
	CT_F_HAIRPIN  = 1 << 0, /* client is its own backend: source NATed to hairpin_addr */
	CT_F_XLATE    = 1 << 1, /* the client's source port is translated (reply tuple clash) */
	CT_F_EXTERNAL = 1 << 2, /* the client is outside the cluster: replies leave by the uplink */
	CT_F_DSR      = 1 << 3, /* backend node: replies go straight to the client from here */
	CT_F_TUNNEL   = 1 << 4, /* backend node: replies are tunnelled back to the ingress node */
} __attribute__((packed));

/*
 * ct_value.seen (bits): TCP flags as in byte 13 of the TCP header, plus CT_SEEN_PKT ("a packet
 * crossed after the entry was created"). A DIRECT entry records both directions: the pod's in the
 * low byte, the peer's shifted by CT_SEEN_PEER_SHIFT.
 */
enum tcp_flag_bits {
	TCPF_FIN    = 0x01,
	TCPF_SYN    = 0x02,
	TCPF_RST    = 0x04,
	TCPF_ACK    = 0x10,
	CT_SEEN_PKT = 0x80,
};
#define CT_SEEN_PEER_SHIFT 8
#define TCPF_TRACKED (TCPF_FIN | TCPF_SYN | TCPF_RST | TCPF_ACK)
#define TCPF_ENDED   (TCPF_FIN | TCPF_RST)

#define IP_MF             0x2000
#define IP_DF             0x4000
#define IP_OFFSET         0x1FFF

/*
 * One reason enum for every packet outcome; it is also the index of the per-CPU counter array
 * (sl_rsn_v2). Values below REASON_FIRST_DROP let the packet through (possibly rewritten); the rest
 * drop it. Append only within each half: userspace names them by number.
 */
enum reason {
	REASON_PASS              = 0,  /* not service traffic: untouched */
	REASON_PASS_NON_IPV4     = 1,  /* not IPv4: untouched */
	REASON_PASS_FRAGMENT     = 2,  /* later IPv4 fragment of no NATed flow: untouched */
	REASON_NAT_NEW           = 3,  /* new service flow: backend chosen, DNAT, CT created */
	REASON_NAT_ESTABLISHED   = 4,  /* CT hit on the forward leg: DNAT */
	REASON_REV_NAT           = 5,  /* CT hit on the reply leg: source restored to the frontend */
	REASON_HAIRPIN           = 6,  /* client was its own backend: SNAT to hairpin_addr, redirect */
	REASON_NO_BACKEND        = 7,  /* service without endpoints: ICMP port unreachable sent back */
	REASON_AFFINITY_HIT      = 8,  /* new flow sent to the client's remembered backend */
	REASON_REV_NAT_ICMP      = 9,  /* ICMP error about a NATed flow: quote (and source) restored */
	REASON_NAT_FRAGMENT      = 10, /* later fragment rewritten as its first fragment was */
	REASON_NAT_NEW_XLATE     = 11, /* new service flow whose reply tuple belongs to a live flow:
					* the client's source port is translated */
	REASON_DIRECT_NEW        = 12, /* a pod's new direct flow: tracked */
	REASON_DIRECT_XLATE_NEW  = 13, /* a pod's new direct flow whose tuple is a live NATed flow's
					* reply: its source port is translated */
	REASON_XLATE             = 14, /* packet of a port-translated direct flow */
	REASON_CT_REPAIRED       = 15, /* a flow's missing leg was re-created from the other */
	REASON_FLOW_REPLACED     = 16, /* new flow over an ended one's tuple (port reuse) */
	REASON_UDP_REBALANCED    = 17, /* UDP flow whose backend is no longer usable: new backend */
	REASON_DIRECT            = 18, /* packet of a tracked direct flow that updated its entry */
	REASON_NP_LOCAL          = 19, /* external flow to a local backend: DNAT, delivered here */
	REASON_NP_FORWARD        = 20, /* external flow to a remote backend: encapsulated to its node */
	REASON_NP_DECAP          = 21, /* an ingress node's encapsulated request: served here */
	REASON_NP_REPLY          = 22, /* external flow's reply: source restored, out to the client */
	REASON_NP_REPLY_TUNNEL   = 23, /* external flow's reply encapsulated back to its ingress node */
	REASON_NP_TUNNEL_REPLY   = 24, /* ingress node: a tunnelled reply sent on to the client */
	REASON_FRAG_NEEDED       = 25, /* too big once encapsulated: ICMP fragmentation needed sent */
	REASON_FIRST_DROP        = 32,
	REASON_DROP_MALFORMED    = 32, /* bad IP version/IHL/total length */
	REASON_DROP_TRUNCATED    = 33, /* headers end before they should */
	REASON_DROP_FRAG_ORPHAN  = 34, /* later fragment to a VIP whose first fragment was not seen */
	REASON_DROP_CT_CREATE    = 35, /* conntrack insert failed */
	REASON_DROP_REWRITE      = 36, /* a store/checksum helper failed */
	REASON_DROP_NO_BACKEND   = 37, /* no endpoint and the reject could not be built */
	REASON_DROP_CT_COLLISION = 38, /* reply tuple taken and no free translated port found: the
					* client's retry tries again */
	REASON_DROP_SPOOFED      = 39, /* a pod sent with a source address that is not its own */
	REASON_DROP_NO_LOCAL     = 40, /* traffic policy Local (external or internal), no endpoint
					* here (or an ingress node's request with none) */
	REASON_DROP_NO_NODE      = 41, /* remote backend whose node address is unknown */
	REASON_DROP_ENCAP        = 42, /* encapsulation or decapsulation failed */
	REASON_DROP_TOO_BIG      = 43, /* too big once encapsulated, and no ICMP could be built */
	REASON_MAX               = 64,
};

/* VXLAN as sluice builds it between nodes (no kernel tunnel device): outer IPv4 + UDP + VXLAN +
 * the inner Ethernet header. */
#define VXLAN_OVERHEAD    50
#define VXLAN_FLAG_VNI    0x08000000 /* the I flag: the VNI field is valid */

/* sl_ctev_v1 index: conntrack entry events the datapath counts (occupancy and evictions are
 * derived by the daemon from these and the map's size). */
enum ct_event {
	CT_EV_CREATED    = 0, /* entries inserted by the datapath */
	CT_EV_DELETED    = 1, /* entries deleted by the datapath */
	CT_EV_GC_DELETED = 2, /* entries the daemon's GC expired (written by the daemon) */
	CT_EV_GC_CREATED = 3, /* legs the daemon's GC re-created for half flows (likewise) */
	CT_EV_MAX        = 4,
};

#endif
