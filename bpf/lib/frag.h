/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* IPv4 fragments of NATed flows. Only the first fragment carries ports, so only it can be matched
 * to a flow; what its flow did to the addresses is remembered by (source, destination, protocol,
 * IP id) and done again to the later fragments. A later fragment that arrives before its first is
 * passed (not for a VIP: nothing to undo) or dropped (for a VIP: it cannot be NATed). */
#ifndef SLUICE_LIB_FRAG_H
#define SLUICE_LIB_FRAG_H

#include "common.h"
#include "nat.h"

static __always_inline void frag_key_of(const struct packet *pkt, __be32 saddr, __be32 daddr,
					struct frag_key *k)
{
	k->saddr = saddr;
	k->daddr = daddr;
	k->id = pkt->ip_id;
	k->proto = pkt->proto;
	k->pad = 0;
}

/* After a first fragment was rewritten from (@saddr, @daddr) to its current addresses, and is
 * to be encapsulated to node @tun (0: not). */
SL_GLOBAL int frag_remember_tun(const struct packet *pkt, __be32 saddr, __be32 daddr, __be32 tun)
{
	struct frag_key k;
	struct frag_value v = {};

	if (!pkt)
		return 0;
	if (pkt->frag != FRAG_FIRST || (pkt->saddr == saddr && pkt->daddr == daddr && !tun))
		return 0;
	frag_key_of(pkt, saddr, daddr, &k);
	v.first_ns = sl_now();
	v.nat_saddr = pkt->saddr != saddr ? pkt->saddr : 0;
	v.nat_daddr = pkt->daddr != daddr ? pkt->daddr : 0;
	v.tun_addr = tun;
	return bpf_map_update_elem(&sl_frag_v1, &k, &v, BPF_ANY);
}

static __always_inline void frag_remember(const struct packet *pkt, __be32 saddr, __be32 daddr)
{
	if (pkt->frag == FRAG_FIRST)
		frag_remember_tun(pkt, saddr, daddr, 0);
}

/**
 * frag_later - a later fragment: rewrite it as its first fragment was; *@tun: the node to
 * encapsulate it to, if its first fragment was (0: none; may be NULL where nothing is).
 * Return: REASON_NAT_FRAGMENT, a drop reason, or CONTINUE when no first fragment was remembered.
 */
SL_GLOBAL int frag_later(struct __sk_buff *skb, struct packet *pkt, __be32 *tun)
{
	struct frag_key k;
	struct frag_value *v;
	struct nat n = {};
	int err;

	if (!pkt)
		return REASON_DROP_REWRITE;

	frag_key_of(pkt, pkt->saddr, pkt->daddr, &k);
	v = bpf_map_lookup_elem(&sl_frag_v1, &k);
	if (!v || sl_age(sl_now(), v->first_ns) > frag_timeout_ns)
		return CONTINUE;
	n.saddr = v->nat_saddr;
	n.daddr = v->nat_daddr;
	if (tun)
		*tun = v->tun_addr;
	err = nat_apply(skb, pkt, n);
	return err ? err : REASON_NAT_FRAGMENT;
}

#endif
