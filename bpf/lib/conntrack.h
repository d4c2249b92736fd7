/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Conntrack: one LRU entry per direction of a NATed flow. The datapath only records what it sees
 * (TCP flags per direction, last-seen time); the daemon turns that into states and timeouts. */
#ifndef SLUICE_LIB_CONNTRACK_H
#define SLUICE_LIB_CONNTRACK_H

#include "common.h"
#include "nat.h"

static __always_inline void ct_key_of(const struct packet *pkt, struct ct_key *key)
{
	key->saddr = pkt->saddr;
	key->daddr = pkt->daddr;
	key->sport = pkt->sport;
	key->dport = pkt->dport;
	key->proto = pkt->proto;
}

/* Record what this packet shows; write last_seen only when it has aged by ct_refresh_ns. */
static __always_inline void ct_touch(struct ct_value *ct, const struct packet *pkt, __u64 now)
{
	__u32 flags = pkt->tcp_flags & (TCPF_FIN | TCPF_SYN | TCPF_RST | TCPF_ACK);

	if (pkt->proto == IPPROTO_TCP && (flags & ~ct->tcp_flags_seen))
		__sync_fetch_and_or(&ct->tcp_flags_seen, flags);
	if (now - ct->last_seen_ns > ct_refresh_ns)
		ct->last_seen_ns = now;
}

/* A fresh SYN on a forward entry whose connection has ended reuses the port: start a new flow. */
static __always_inline int ct_is_port_reuse(const struct ct_value *ct, const struct packet *pkt)
{
	return pkt->proto == IPPROTO_TCP &&
	       (pkt->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN &&
	       (ct->tcp_flags_seen & (TCPF_FIN | TCPF_RST));
}

/**
 * ct_reverse - reply leg: restore the frontend as the source (and, for hairpin, the client as
 * the destination).
 * Return: REASON_REV_NAT (rewritten), REASON_PASS (no NATed flow), or a drop reason.
 */
static __always_inline int ct_reverse(struct __sk_buff *skb, struct packet *pkt)
{
	struct ct_key key = {};
	struct ct_value *ct;
	int err;

	ct_key_of(pkt, &key);
	ct = bpf_map_lookup_elem(&sl_ct_v1, &key);
	if (!ct || ct->type != CT_TYPE_REV)
		return REASON_PASS;
	ct_touch(ct, pkt, bpf_ktime_get_ns());
	err = nat_apply(skb, pkt, ct);
	if (err)
		return err;
	if (ct->flags & CT_F_HAIRPIN)
		pkt->redirect_back = 1;
	return REASON_REV_NAT;
}

#endif
