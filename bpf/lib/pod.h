/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The pod behind a host-side veth: its traffic counters and its address. */
#ifndef SLUICE_LIB_POD_H
#define SLUICE_LIB_POD_H

#include "common.h"

/* Counts the packet for the pod on this veth; returns the pod's entry (the daemon creates it when
 * it attaches; none in tests that did not set one up). */
static __always_inline struct pod_info *pod_account(struct __sk_buff *skb, int towards_pod)
{
	__u32 ifindex = skb->ifindex;
	struct pod_info *p = bpf_map_lookup_elem(&sl_pod_v2, &ifindex);

	if (!p)
		return 0;
	if (towards_pod) {
		p->rx_packets++;
		p->rx_bytes += skb->len;
	} else {
		p->tx_packets++;
		p->tx_bytes += skb->len;
	}
	return p;
}

/* A pod may only send from its own addresses (this interface's, or one of its other sluice
 * interfaces' along the sibling ring): a forged source could plant or hijack another pod's
 * conntrack entries (and its replies). */
static __always_inline int pod_source_ok(const struct pod_info *p, const struct packet *pkt,
					 __u32 self)
{
	__u32 idx, i;

	if (!p || !p->addr || p->addr == pkt->saddr)
		return 1;
	idx = p->sibling;
	for (i = 0; i < POD_SIBLINGS_MAX && idx && idx != self; i++) {
		const struct pod_info *s = bpf_map_lookup_elem(&sl_pod_v2, &idx);

		if (!s)
			return 0;
		if (s->addr == pkt->saddr)
			return 1;
		idx = s->sibling;
	}
	return 0;
}

#endif
