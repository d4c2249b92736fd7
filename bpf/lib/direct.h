/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * A local pod's traffic that is not for a service ("direct"). Two things can go wrong when NAT
 * and direct flows share the pod's ports, and the kernel's NAT handles both the same way:
 *  - the pod opens a direct flow whose tuple is the reply tuple of one of its live NATed flows
 *    (same source port, to the backend that flow was sent to): the new flow's source port is
 *    translated; if that NATed flow is over, its entries give way instead;
 *  - a NATed flow's reply tuple is a live direct flow's: lb_new_flow translates the NATed flow,
 *    which is why direct flows are tracked here (DIRECT entries) from their first packet: a TCP
 *    SYN, or any UDP datagram.
 * The pod's plain TCP segments pay one lookup (a port-translated flow's forward leg); SYN, FIN,
 * RST and UDP pay a second.
 */
#ifndef SLUICE_LIB_DIRECT_H
#define SLUICE_LIB_DIRECT_H

#include "common.h"
#include "conntrack.h"
#include "nat.h"
#include "xlate.h"

static __always_inline int direct_insert(const struct ct_key *rk, const struct packet *pkt,
					 __u64 now, __u64 flags)
{
	struct ct_value d = {
		.created_ns = now,
		.last_seen_ns = now,
		.seen = ct_bits_of(pkt),
		.type = CT_TYPE_DIRECT,
	};

	return ct_insert(rk, &d, flags);
}

/* A translated direct flow's forward leg @fk/@fwd: a SYN after it ended starts over (returns
 * CONTINUE); otherwise its source port is rewritten. */
static __always_inline int direct_xlated(struct __sk_buff *skb, struct packet *pkt,
					 const struct ct_key *fk, struct ct_value *fwd, __u64 now)
{
	struct ct_flow f = ct_flow_of(fk, fwd);
	int err, repaired = 0;

	if (is_tcp_syn(pkt) && ct_ended(f.a, f.b)) {
		ct_delete_flow(fk, fwd);
		return CONTINUE;
	}
	ct_touch(fwd, pkt, 0, now);
	if (f.half)
		repaired = ct_repair_reverse(fk, fwd, now);
	err = nat_apply(skb, pkt, nat_of(fwd));
	if (err)
		return err;
	return repaired ? REASON_CT_REPAIRED : REASON_XLATE;
}

/**
 * direct_track - a TCP/UDP packet from a local pod to no frontend.
 * Return: the reason (REASON_PASS when nothing was recorded).
 */
SL_GLOBAL int direct_track(struct __sk_buff *skb, struct packet *pkt)
{
	struct ct_key fk = {}, rk = {};
	struct ct_value *e, *x;
	struct ct_value fwd = {}, rev = {};
	__u64 now = sl_now();
	int opens, err;

	if (!pkt)
		return REASON_DROP_REWRITE;

	ct_key_of(pkt, &fk);
	e = bpf_map_lookup_elem(&sl_ct_v2, &fk);
	if (e && e->type == CT_TYPE_FWD && (e->flags & CT_F_XLATE) && !e->nat_daddr) {
		err = direct_xlated(skb, pkt, &fk, e, now);
		if (err != CONTINUE)
			return err;
	} else if (e && e->type == CT_TYPE_FWD) {
		/* A service flow whose frontend is gone: an established TCP connection keeps its
		 * backend (as the kernel's conntrack keeps NATing it when kube-proxy's rules go); a
		 * UDP flow is stale and dropped from conntrack (kube-proxy's cleanup). */
		if (pkt->proto != IPPROTO_TCP || is_tcp_syn(pkt)) {
			ct_delete_flow(&fk, e);
			return REASON_PASS;
		}
		ct_touch(e, pkt, 0, now);
		err = nat_apply(skb, pkt, nat_of(e));
		return err ? err : REASON_NAT_ESTABLISHED;
	} else if (e) {
		/* The packet is a reply leg's (a backend answering a NATed flow, rewritten where it
		 * reaches the client) or another pod's DIRECT entry (recorded where it reaches that
		 * pod): nothing to do here. */
		return REASON_PASS;
	}

	opens = is_tcp_syn(pkt) || pkt->proto == IPPROTO_UDP;
	if (!opens && !(pkt->tcp_flags & TCPF_ENDED))
		return REASON_PASS;

	ct_key_swap(&fk, &rk);
	x = bpf_map_lookup_elem(&sl_ct_v2, &rk);
	if (!x) {
		if (!opens)
			return REASON_PASS; /* FIN/RST of a flow that predates tracking */
		direct_insert(&rk, pkt, now, BPF_NOEXIST);
		return REASON_DIRECT_NEW;
	}
	if (x->type == CT_TYPE_DIRECT) {
		if (is_tcp_syn(pkt) && ct_ended(x->seen & 0xff, x->seen >> CT_SEEN_PEER_SHIFT)) {
			direct_insert(&rk, pkt, now, BPF_ANY); /* the port is reused */
			return REASON_DIRECT_NEW;
		}
		ct_touch(x, pkt, 0, now);
		return REASON_DIRECT;
	}
	if (x->type != CT_TYPE_REV || !opens)
		return REASON_PASS;

	/* The reply tuple of one of this pod's NATed flows. */
	if (ct_entry_gone(&rk, x, now)) {
		ct_delete_flow(&rk, x);
		direct_insert(&rk, pkt, now, BPF_NOEXIST);
		return REASON_FLOW_REPLACED;
	}
	fwd.created_ns = fwd.last_seen_ns = now;
	fwd.seen = ct_bits_of(pkt);
	fwd.type = CT_TYPE_FWD;
	err = xlate_insert_reverse(&fk, &fwd, now, &rk, &rev);
	if (err)
		return err;
	if (ct_insert(&fk, &fwd, BPF_NOEXIST) < 0) {
		if (bpf_map_delete_elem(&sl_ct_v2, &rk) == 0)
			ct_event(CT_EV_DELETED, 1);
		return REASON_DROP_CT_CREATE;
	}
	err = nat_apply(skb, pkt, nat_of(&fwd));
	return err ? err : REASON_DIRECT_XLATE_NEW;
}

#endif
