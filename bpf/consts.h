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

/*
 * The enums below type struct fields in types.h, so they reach BTF and the Rust skeleton: userspace
 * never copies a value by hand. Packed enums are one byte.
 */

/* frontend_value.flags (bits) */
enum frontend_flags {
	FE_F_AFFINITY     = 1 << 0, /* sessionAffinity: ClientIP */
};

/* ct_value.type: which leg of a NATed flow this entry describes */
enum ct_type {
	CT_TYPE_FWD = 1, /* client -> frontend, rewritten towards the backend */
	CT_TYPE_REV = 2, /* backend -> client, rewritten back to the frontend */
} __attribute__((packed));

/* ct_value.flags (bits) */
enum ct_flags {
	CT_F_HAIRPIN = 1 << 0, /* client is its own backend: source NATed to hairpin_addr */
} __attribute__((packed));

/* ct_value.tcp_flags_seen (bits): TCP flags as in byte 13 of the TCP header */
enum tcp_flag_bits {
	TCPF_FIN = 0x01,
	TCPF_SYN = 0x02,
	TCPF_RST = 0x04,
	TCPF_ACK = 0x10,
};

#define IP_MF             0x2000
#define IP_OFFSET         0x1FFF

/*
 * One reason enum for every packet outcome; it is also the index of the per-CPU counter array
 * (sl_rsn_v1). Values below REASON_FIRST_DROP let the packet through (possibly rewritten); the rest
 * drop it. Append only: userspace names them by number.
 */
enum reason {
	REASON_PASS              = 0,  /* not service traffic: untouched */
	REASON_PASS_NON_IPV4     = 1,  /* not IPv4: untouched */
	REASON_PASS_FRAGMENT     = 2,  /* IPv4 fragment not addressed to a VIP: untouched */
	REASON_NAT_NEW           = 3,  /* new service flow: backend chosen, DNAT, CT created */
	REASON_NAT_ESTABLISHED   = 4,  /* CT hit on the forward leg: DNAT */
	REASON_REV_NAT           = 5,  /* CT hit on the reply leg: source restored to the frontend */
	REASON_HAIRPIN           = 6,  /* client was its own backend: SNAT to hairpin_addr, redirect */
	REASON_NO_BACKEND        = 7,  /* service without endpoints: ICMP port unreachable sent back */
	REASON_AFFINITY_HIT      = 8,  /* new flow sent to the client's remembered backend */
	REASON_REV_NAT_ICMP      = 9,  /* ICMP error about a service flow: quoted packet and source
					* restored to the frontend */
	REASON_FIRST_DROP        = 16,
	REASON_DROP_MALFORMED    = 16, /* bad IP version/IHL/total length */
	REASON_DROP_TRUNCATED    = 17, /* headers end before they should */
	REASON_DROP_FRAG_TO_VIP  = 18, /* IPv4 fragment to a VIP: ports unknown, cannot be NATed */
	REASON_DROP_CT_CREATE    = 19, /* conntrack insert failed */
	REASON_DROP_REWRITE      = 20, /* a store/checksum helper failed */
	REASON_DROP_NO_BACKEND   = 21, /* no endpoint and the reject could not be built */
	REASON_DROP_CT_COLLISION = 22, /* the reply tuple belongs to another live flow (same client
					* port to another frontend with the same backend): the
					* client retries the SYN, which may pick another backend */
	REASON_MAX               = 32,
};

#endif
