/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Conntrack entries. A NATed flow has two, one per direction, each keyed by the 5-tuple its packets
 * carry and saying how to rewrite them; either can be derived from the other (ct_inverse), so a
 * missing leg is repaired rather than lost. A local pod's direct flow has one DIRECT entry, keyed
 * by the direction that reaches the pod, so that no NATed flow ever takes its tuple.
 *
 * The datapath records what it sees (TCP flags per direction, a last-seen time) and decides, with
 * the same timeouts as the daemon's GC (config.h), whether a flow that holds a tuple is over.
 * Userspace mirrors this file in services/conntrack.rs.
 */
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
	key->pad[0] = key->pad[1] = key->pad[2] = 0;
}

/* The other direction of a tuple. */
static __always_inline void ct_key_swap(const struct ct_key *in, struct ct_key *out)
{
	out->saddr = in->daddr;
	out->daddr = in->saddr;
	out->sport = in->dport;
	out->dport = in->sport;
	out->proto = in->proto;
	out->pad[0] = out->pad[1] = out->pad[2] = 0;
}

/*
 * The other leg of a NATed flow: packets of the other direction come from where this leg's
 * packets go after rewriting and go to where they came from, and are rewritten back. Works both
 * ways (FWD -> REV, REV -> FWD), for DNAT, hairpin SNAT and translated source ports alike.
 */
static __always_inline void ct_inverse(const struct ct_key *k, const struct ct_value *v,
				       struct ct_key *ok, struct ct_value *ov)
{
	ok->saddr = v->nat_daddr ? v->nat_daddr : k->daddr;
	ok->daddr = v->nat_saddr ? v->nat_saddr : k->saddr;
	ok->sport = v->nat_dport ? v->nat_dport : k->dport;
	ok->dport = v->nat_sport ? v->nat_sport : k->sport;
	ok->proto = k->proto;
	ok->pad[0] = ok->pad[1] = ok->pad[2] = 0;
	if (!ov)
		return;
	ov->nat_saddr = v->nat_daddr ? k->daddr : 0;
	ov->nat_daddr = v->nat_saddr ? k->saddr : 0;
	ov->nat_sport = v->nat_dport ? k->dport : 0;
	ov->nat_dport = v->nat_sport ? k->sport : 0;
	ov->set_id = v->set_id;
	ov->gen = v->gen;
	ov->tun_addr = v->tun_addr;
	ov->type = v->type == CT_TYPE_FWD ? CT_TYPE_REV : CT_TYPE_FWD;
	ov->flags = v->flags;
}

/* The flag bits a packet adds to an entry: its TCP flags and "a packet crossed". */
static __always_inline __u32 ct_bits_of(const struct packet *pkt)
{
	return (pkt->proto == IPPROTO_TCP ? (pkt->tcp_flags & TCPF_TRACKED) : 0) | CT_SEEN_PKT;
}

/* Record what this packet shows (@shift: 0, or CT_SEEN_PEER_SHIFT for the peer's direction of a
 * DIRECT entry); write last_seen only when it has aged by ct_refresh_ns. */
static __always_inline void ct_touch(struct ct_value *ct, const struct packet *pkt, __u32 shift,
				     __u64 now)
{
	__u32 bits = ct_bits_of(pkt) << shift;

	if (bits & ~(__u32)ct->seen)
		__sync_fetch_and_or((__u32 *)&ct->seen, bits);
	if (sl_age(now, ct->last_seen_ns) > ct_refresh_ns)
		ct->last_seen_ns = now;
}

/* The idle timeout of a flow whose directions saw @a and @b (mirrored by conntrack.rs state()). */
static __always_inline __u64 ct_timeout(__u8 proto, __u32 a, __u32 b)
{
	if (proto != IPPROTO_TCP)
		return (b & CT_SEEN_PKT) && (a & CT_SEEN_PKT) ? ct_udp_stream_ns : ct_udp_ns;
	if ((a | b) & TCPF_RST)
		return ct_rst_ns;
	if ((a & TCPF_FIN) && (b & TCPF_FIN))
		return ct_closed_ns;
	if ((a | b) & TCPF_FIN)
		return ct_fin_ns;
	if ((a & TCPF_ACK) && (b & TCPF_ACK))
		return ct_established_ns;
	return ct_syn_ns;
}

/* Whether a flow may give up its tuples to another: reset, closed by both sides, or idle past its
 * state's timeout. (A half-closed TCP flow still carries data one way: it keeps them.) */
static __always_inline int ct_gone(__u8 proto, __u32 a, __u32 b, __u64 last_seen, __u64 now)
{
	if (proto == IPPROTO_TCP &&
	    (((a | b) & TCPF_RST) || ((a & TCPF_FIN) && (b & TCPF_FIN))))
		return 1;
	return sl_age(now, last_seen) > ct_timeout(proto, a, b);
}

/* Whether a TCP flow saw FIN or RST either way: a fresh SYN on its tuple starts a new flow. */
static __always_inline int ct_ended(__u32 a, __u32 b)
{
	return (a | b) & TCPF_ENDED;
}

/* The two legs of a flow as one: which direction saw what, and when it was last alive. */
struct ct_flow {
	__u32 a;         /* client direction */
	__u32 b;         /* reply direction */
	__u64 last_seen;
	int   half;      /* the other leg is missing */
};

/* @k/@v is one leg (FWD or REV) of a NATed flow: look up its other leg. */
static __always_inline struct ct_flow ct_flow_of(const struct ct_key *k, const struct ct_value *v)
{
	struct ct_key ok;
	struct ct_value *o;
	struct ct_flow f = {};

	ct_inverse(k, v, &ok, 0);
	o = bpf_map_lookup_elem(&sl_ct_v2, &ok);
	if (o && o->type == CT_TYPE_FWD + CT_TYPE_REV - v->type) {
		f.a = v->type == CT_TYPE_FWD ? v->seen : o->seen;
		f.b = v->type == CT_TYPE_FWD ? o->seen : v->seen;
		f.last_seen = v->last_seen_ns > o->last_seen_ns ? v->last_seen_ns : o->last_seen_ns;
	} else {
		f.a = v->type == CT_TYPE_FWD ? v->seen : 0;
		f.b = v->type == CT_TYPE_FWD ? 0 : v->seen;
		f.last_seen = v->last_seen_ns;
		f.half = 1;
	}
	return f;
}

/* Whether the holder of a tuple (any entry type) may give it up. A global function: callers
 * building new flows are short of stack. */
SL_GLOBAL int ct_entry_gone(const struct ct_key *k, const struct ct_value *v, __u64 now)
{
	struct ct_flow f;

	if (!k || !v)
		return 0;
	if (v->type == CT_TYPE_DIRECT)
		return ct_gone(k->proto, v->seen & 0xff, v->seen >> CT_SEEN_PEER_SHIFT,
			       v->last_seen_ns, now);
	if (v->type != CT_TYPE_FWD && v->type != CT_TYPE_REV)
		return 0;
	f = ct_flow_of(k, v);
	return ct_gone(k->proto, f.a, f.b, f.last_seen, now);
}

/* Deletes an entry and, for a NATed flow's leg, its other leg. */
SL_GLOBAL int ct_delete_flow(const struct ct_key *k, const struct ct_value *v)
{
	struct ct_key ok;
	__u32 n = 0;

	if (!k || !v)
		return 0;
	if (v->type == CT_TYPE_FWD || v->type == CT_TYPE_REV) {
		ct_inverse(k, v, &ok, 0);
		if (bpf_map_delete_elem(&sl_ct_v2, &ok) == 0)
			n++;
	}
	if (bpf_map_delete_elem(&sl_ct_v2, k) == 0)
		n++;
	if (n)
		ct_event(CT_EV_DELETED, n);
	return n;
}

static __always_inline int ct_insert(const struct ct_key *k, const struct ct_value *v, __u64 flags)
{
	int err = bpf_map_update_elem(&sl_ct_v2, k, v, flags);

	if (!err && flags == BPF_NOEXIST)
		ct_event(CT_EV_CREATED, 1);
	return err;
}

/*
 * A forward packet of a live flow whose reply leg is missing (LRU evicted it, or a crash left the
 * flow half): re-create it from @fk/@fwd before any reply can come. Return: 1 if re-created.
 */
static __always_inline int ct_repair_reverse(const struct ct_key *fk, const struct ct_value *fwd,
					     __u64 now)
{
	struct ct_key rk;
	struct ct_value rev = {};

	ct_inverse(fk, fwd, &rk, &rev);
	rev.created_ns = rev.last_seen_ns = now;
	return ct_insert(&rk, &rev, BPF_NOEXIST) == 0;
}

/**
 * ct_reverse - a packet towards a local pod (or, hairpin, from it to hairpin_addr): the reply leg
 * of a NATed flow is rewritten back; a DIRECT flow's entry records it.
 * Return: REASON_REV_NAT / REASON_XLATE (rewritten), REASON_DIRECT, REASON_PASS, or a drop reason.
 */
SL_GLOBAL int ct_reverse(struct __sk_buff *skb, struct packet *pkt)
{
	struct ct_key key;
	struct ct_value *ct;
	__u64 now;
	int err;

	if (!pkt)
		return REASON_DROP_REWRITE;

	ct_key_of(pkt, &key);
	ct = bpf_map_lookup_elem(&sl_ct_v2, &key);
	if (!ct)
		return REASON_PASS;
	now = sl_now();
	if (ct->type == CT_TYPE_DIRECT) {
		ct_touch(ct, pkt, CT_SEEN_PEER_SHIFT, now);
		return REASON_DIRECT;
	}
	if (ct->type != CT_TYPE_REV)
		return REASON_PASS;
	ct_touch(ct, pkt, 0, now);
	err = nat_apply(skb, pkt, nat_of(ct));
	if (err)
		return err;
	if (ct->flags & CT_F_HAIRPIN)
		pkt->redirect_back = 1;
	return ct->nat_saddr ? REASON_REV_NAT : REASON_XLATE;
}

#endif
