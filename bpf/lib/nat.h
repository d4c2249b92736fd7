/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Address and port rewriting with incremental IP and L4 checksum fixes. */
#ifndef SLUICE_LIB_NAT_H
#define SLUICE_LIB_NAT_H

#include <linux/tcp.h>
#include <linux/udp.h>
#include "common.h"
#include "csum.h"

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

/* The L4 checksum's share of a rewrite, a precomputed difference, through the kernel's helper: it
 * alone knows whether the skb's checksum is partial (offloaded: only the pseudo header's sum is
 * in the field) or complete. */
static __always_inline int l4_csum_by_diff(struct __sk_buff *skb, const struct packet *pkt,
					   __u32 diff, __u64 flags)
{
	return bpf_l4_csum_replace(skb, l4_csum_off(pkt), 0, diff, l4_csum_flags(pkt) | flags);
}

/**
 * nat_apply - rewrite the fields @n names (0 = keep) and update @pkt to match. A later fragment
 * has no ports: only its addresses change (the L4 checksum, which covers them, travelled in the
 * first fragment).
 * The fields are written in place (the headers pulled into the linear area first if they are not
 * there) with the IP checksum computed here; the L4 checksum takes one helper call for the
 * addresses and one for the ports.
 * Return: 0, or a drop reason when a helper failed.
 */
static __always_inline int nat_apply(struct __sk_buff *skb, struct packet *pkt, struct nat n)
{
	int later = pkt->frag == FRAG_LATER;
	__u32 l4_off = pkt->l4_off & 0x7f; /* 14 + at most 60: bounded for the verifier */
	__u32 end = later ? ETH_HLEN + sizeof(struct iphdr) : l4_off + 4;
	__u32 addr_diff = 0, port_diff = 0;
	struct iphdr *ip;
	__be16 *ports;
	void *data_end;

	if (n.saddr == pkt->saddr)
		n.saddr = 0;
	if (n.daddr == pkt->daddr)
		n.daddr = 0;
	if (later || n.sport == pkt->sport)
		n.sport = 0;
	if (later || n.dport == pkt->dport)
		n.dport = 0;
	if (!(n.saddr | n.daddr | n.sport | n.dport))
		return 0;

	if ((void *)(long)skb->data + end > (void *)(long)skb->data_end &&
	    bpf_skb_pull_data(skb, end) < 0)
		return REASON_DROP_REWRITE;
	ip = (void *)(long)skb->data + ETH_HLEN;
	data_end = (void *)(long)skb->data_end;
	if ((void *)(ip + 1) > data_end)
		return REASON_DROP_REWRITE;
	if (n.saddr) {
		addr_diff = csum_add32(~pkt->saddr, n.saddr);
		ip->check = csum_replace4(ip->check, pkt->saddr, n.saddr);
		ip->saddr = pkt->saddr = n.saddr;
	}
	if (n.daddr) {
		addr_diff = csum_add32(addr_diff, csum_add32(~pkt->daddr, n.daddr));
		ip->check = csum_replace4(ip->check, pkt->daddr, n.daddr);
		ip->daddr = pkt->daddr = n.daddr;
	}
	if (later)
		return 0;

	ports = (void *)ip - ETH_HLEN + l4_off;
	if ((void *)(ports + 2) > data_end)
		return REASON_DROP_REWRITE;
	if (n.sport) {
		port_diff = csum_add32(~(__u32)pkt->sport, n.sport);
		ports[0] = pkt->sport = n.sport;
	}
	if (n.dport) {
		port_diff = csum_add32(port_diff, csum_add32(~(__u32)pkt->dport, n.dport));
		ports[1] = pkt->dport = n.dport;
	}
	/* The L4 checksum: the addresses' change as one difference (the pseudo header's), the
	 * ports' as another (the two stay apart for an offloaded checksum). */
	if ((n.saddr | n.daddr) && l4_csum_by_diff(skb, pkt, addr_diff, BPF_F_PSEUDO_HDR) < 0)
		return REASON_DROP_REWRITE;
	if ((n.sport | n.dport) && l4_csum_by_diff(skb, pkt, port_diff, 0) < 0)
		return REASON_DROP_REWRITE;
	return 0;
}

#endif
