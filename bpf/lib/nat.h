/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Address and port rewriting with incremental IP and L4 checksum fixes. */
#ifndef SLUICE_LIB_NAT_H
#define SLUICE_LIB_NAT_H

#include <linux/tcp.h>
#include <linux/udp.h>
#include "common.h"

static __always_inline __u32 l4_csum_off(const struct packet *pkt)
{
	return pkt->l4_off + (pkt->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
							: offsetof(struct udphdr, check));
}

/* UDP checksum 0 means "none": keep it 0, and never produce 0 from a real sum. */
static __always_inline __u64 l4_csum_flags(const struct packet *pkt)
{
	return pkt->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* An address in the IP header; the L4 checksum too unless this is a later fragment (its L4
 * header, with the checksum covering the addresses, travelled in the first fragment). */
static __always_inline int rewrite_addr(struct __sk_buff *skb, const struct packet *pkt,
					__u32 off, __be32 old, __be32 new)
{
	if (pkt->frag != FRAG_LATER &&
	    bpf_l4_csum_replace(skb, l4_csum_off(pkt), old, new,
				l4_csum_flags(pkt) | BPF_F_PSEUDO_HDR | sizeof(new)) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, sizeof(new)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

static __always_inline int rewrite_port(struct __sk_buff *skb, const struct packet *pkt,
					__u32 off, __be16 old, __be16 new)
{
	if (bpf_l4_csum_replace(skb, l4_csum_off(pkt), old, new,
				l4_csum_flags(pkt) | sizeof(new)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

/* The fields of a rewrite; 0 = keep. */
struct nat {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

static __always_inline struct nat nat_of(const struct ct_value *ct)
{
	struct nat n = {
		.saddr = ct->nat_saddr,
		.daddr = ct->nat_daddr,
		.sport = ct->nat_sport,
		.dport = ct->nat_dport,
	};
	return n;
}

/**
 * nat_apply - rewrite the fields @n names (0 = keep) and update @pkt to match. A later fragment
 * has no ports: only its addresses change.
 * Return: 0, or a drop reason when a helper failed.
 */
static __always_inline int nat_apply(struct __sk_buff *skb, struct packet *pkt, struct nat n)
{
	if (n.saddr && n.saddr != pkt->saddr) {
		if (rewrite_addr(skb, pkt, IP_SADDR_OFF, pkt->saddr, n.saddr) < 0)
			return REASON_DROP_REWRITE;
		pkt->saddr = n.saddr;
	}
	if (n.daddr && n.daddr != pkt->daddr) {
		if (rewrite_addr(skb, pkt, IP_DADDR_OFF, pkt->daddr, n.daddr) < 0)
			return REASON_DROP_REWRITE;
		pkt->daddr = n.daddr;
	}
	if (pkt->frag == FRAG_LATER)
		return 0;
	if (n.sport && n.sport != pkt->sport) {
		if (rewrite_port(skb, pkt, pkt->l4_off, pkt->sport, n.sport) < 0)
			return REASON_DROP_REWRITE;
		pkt->sport = n.sport;
	}
	if (n.dport && n.dport != pkt->dport) {
		if (rewrite_port(skb, pkt, pkt->l4_off + 2, pkt->dport, n.dport) < 0)
			return REASON_DROP_REWRITE;
		pkt->dport = n.dport;
	}
	return 0;
}

#endif
