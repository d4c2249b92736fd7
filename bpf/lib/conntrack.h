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

#define TCPF_ENDED (TCPF_FIN | TCPF_RST)

/* The reverse key a forward entry implies (mirrored by userspace in conntrack.rs). */
static __always_inline void ct_rev_key_of_fwd(const struct ct_key *fkey, const struct ct_value *fwd,
					      struct ct_key *rkey)
{
	rkey->saddr = fwd->nat_daddr;
	rkey->daddr = (fwd->flags & CT_F_HAIRPIN) ? fwd->nat_saddr : fkey->saddr;
	rkey->sport = fwd->nat_dport;
	rkey->dport = fkey->sport;
	rkey->proto = fkey->proto;
}

/* The forward key a reverse entry implies. */
static __always_inline void ct_fwd_key_of_rev(const struct ct_key *rkey, const struct ct_value *rev,
					      struct ct_key *fkey)
{
	fkey->saddr = (rev->flags & CT_F_HAIRPIN) ? rev->nat_daddr : rkey->daddr;
	fkey->daddr = rev->nat_saddr;
	fkey->sport = rkey->dport;
	fkey->dport = rev->nat_sport;
	fkey->proto = rkey->proto;
}

/* Whether a TCP flow saw FIN or RST in either direction (its other leg may be gone: ended). */
static __always_inline int ct_ended(const struct ct_value *leg, const struct ct_key *other_key)
{
	const struct ct_value *other;

	if (leg->tcp_flags_seen & TCPF_ENDED)
		return 1;
	other = bpf_map_lookup_elem(&sl_ct_v1, other_key);
	return !other || (other->tcp_flags_seen & TCPF_ENDED);
}

/* A fresh SYN on a flow that has ended (FIN or RST from either side) reuses the port: a new flow.
 * Only a SYN pays the second lookup. */
static __always_inline int ct_is_port_reuse(const struct ct_key *fkey, const struct ct_value *fwd,
					    const struct packet *pkt)
{
	struct ct_key rkey = {};

	if (pkt->proto != IPPROTO_TCP || (pkt->tcp_flags & (TCPF_SYN | TCPF_ACK)) != TCPF_SYN)
		return 0;
	ct_rev_key_of_fwd(fkey, fwd, &rkey);
	return ct_ended(fwd, &rkey);
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
