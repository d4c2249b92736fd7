/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Service load balancing on the forward leg: conntrack hit, or backend choice + new CT pair. */
#ifndef SLUICE_LIB_LB_H
#define SLUICE_LIB_LB_H

#include "common.h"
#include "conntrack.h"
#include "nat.h"
#include "reject.h"

/* Pick a backend for a new flow: the client's remembered one (sessionAffinity) or a random slot. */
static __always_inline int lb_pick(const struct frontend_value *fe, const struct packet *pkt,
				   __u64 now, struct backend_value *out)
{
	struct backend_key bk = { .svc_id = fe->svc_id };
	struct backend_value *be;

	if (fe->flags & FE_F_AFFINITY) {
		struct affinity_key ak = { .client = pkt->saddr, .svc_id = fe->svc_id };
		struct affinity_value *av = bpf_map_lookup_elem(&sl_aff_v1, &ak);

		if (av && now - av->last_used_ns < (__u64)fe->affinity_timeout * 1000000000ULL) {
			out->addr = av->addr;
			out->port = av->port;
			av->last_used_ns = now;
			return REASON_AFFINITY_HIT;
		}
	}

	bk.slot = bpf_get_prandom_u32() % fe->backend_count;
	be = bpf_map_lookup_elem(&sl_be_v1, &bk);
	if (!be)
		return REASON_DROP_NO_BACKEND; /* slot removed under us: the client retransmits */
	*out = *be;

	if (fe->flags & FE_F_AFFINITY) {
		struct affinity_key ak = { .client = pkt->saddr, .svc_id = fe->svc_id };
		struct affinity_value av = { .last_used_ns = now, .addr = be->addr, .port = be->port };

		bpf_map_update_elem(&sl_aff_v1, &ak, &av, BPF_ANY);
	}
	return REASON_NAT_NEW;
}

/**
 * lb_new_flow - choose a backend and create the forward (@fwd, filled in) and reverse entries.
 * Return: REASON_NAT_NEW / REASON_AFFINITY_HIT, or a drop reason.
 */
static __always_inline int lb_new_flow(const struct frontend_value *fe, const struct packet *pkt,
				       __u64 now, struct ct_value *fwd, __u64 fwd_update_flags)
{
	struct ct_key fkey = {}, rkey = {};
	struct ct_value rev = {};
	struct backend_value be = {};
	struct ct_value *winner, *clash;
	int hairpin, reason;

	reason = lb_pick(fe, pkt, now, &be);
	if (reason >= REASON_FIRST_DROP)
		return reason;
	hairpin = be.addr == pkt->saddr;

	fwd->created_ns = fwd->last_seen_ns = now;
	fwd->nat_saddr = hairpin ? hairpin_addr : 0;
	fwd->nat_daddr = be.addr;
	fwd->nat_dport = be.port;
	fwd->svc_id = fe->svc_id;
	fwd->tcp_flags_seen = pkt->tcp_flags & (TCPF_FIN | TCPF_SYN | TCPF_RST | TCPF_ACK);
	fwd->type = CT_TYPE_FWD;
	fwd->flags = hairpin ? CT_F_HAIRPIN : 0;

	/* The reply leg: backend -> client (or -> hairpin address). */
	rkey.saddr = be.addr;
	rkey.daddr = hairpin ? hairpin_addr : pkt->saddr;
	rkey.sport = be.port;
	rkey.dport = pkt->sport;
	rkey.proto = pkt->proto;
	rev.created_ns = rev.last_seen_ns = now;
	rev.nat_saddr = pkt->daddr;
	rev.nat_sport = pkt->dport;
	rev.nat_daddr = hairpin ? pkt->saddr : 0;
	rev.svc_id = fe->svc_id;
	rev.type = CT_TYPE_REV;
	rev.flags = fwd->flags;

	/* The reply tuple may already belong to another live flow: the same client port towards
	 * another frontend with this backend. Overwriting it would break that flow's replies; this
	 * one is refused instead (no source-port NAT here). An ended flow's entry may be reused. */
	clash = bpf_map_lookup_elem(&sl_ct_v1, &rkey);
	if (clash && clash->type == CT_TYPE_REV &&
	    (clash->nat_saddr != rev.nat_saddr || clash->nat_sport != rev.nat_sport ||
	     clash->nat_daddr != rev.nat_daddr)) {
		struct ct_key clash_fkey = {};

		ct_fwd_key_of_rev(&rkey, clash, &clash_fkey);
		if (pkt->proto != IPPROTO_TCP || !ct_ended(clash, &clash_fkey))
			return REASON_DROP_CT_COLLISION;
	}

	/* Reverse first: once the forward entry exists, replies may come. */
	if (bpf_map_update_elem(&sl_ct_v1, &rkey, &rev, BPF_ANY) < 0)
		return REASON_DROP_CT_CREATE;
	ct_key_of(pkt, &fkey);
	if (bpf_map_update_elem(&sl_ct_v1, &fkey, fwd, fwd_update_flags) == 0)
		return reason;

	/* Another CPU created this flow first: follow its choice, drop our reverse leg if unused. */
	winner = bpf_map_lookup_elem(&sl_ct_v1, &fkey);
	if (!winner || winner->type != CT_TYPE_FWD) {
		bpf_map_delete_elem(&sl_ct_v1, &rkey);
		return REASON_DROP_CT_CREATE;
	}
	if (winner->nat_daddr != fwd->nat_daddr || winner->nat_dport != fwd->nat_dport)
		bpf_map_delete_elem(&sl_ct_v1, &rkey);
	*fwd = *winner;
	return REASON_NAT_ESTABLISHED;
}

/**
 * lb_forward - a TCP/UDP packet to a frontend: DNAT it towards its flow's backend.
 * Return: the reason; sets pkt->redirect_back for hairpin and reject.
 */
static __always_inline int lb_forward(struct __sk_buff *skb, struct packet *pkt,
				      const struct frontend_value *fe)
{
	struct ct_key key = {};
	struct ct_value flow = {};
	struct ct_value *ct;
	__u64 now = bpf_ktime_get_ns();
	int reason, err;

	ct_key_of(pkt, &key);
	ct = bpf_map_lookup_elem(&sl_ct_v1, &key);
	if (ct && ct->type == CT_TYPE_FWD && !ct_is_port_reuse(&key, ct, pkt)) {
		ct_touch(ct, pkt, now);
		flow = *ct;
		reason = REASON_NAT_ESTABLISHED;
	} else {
		if (fe->backend_count == 0)
			return reject_port_unreachable(skb, pkt);
		/* A reused port overwrites its ended flow; otherwise the first CPU to insert wins. */
		reason = lb_new_flow(fe, pkt, now, &flow, ct ? BPF_ANY : BPF_NOEXIST);
		if (reason >= REASON_FIRST_DROP)
			return reason;
	}

	counter_add(&sl_svc_v1, fe->svc_id, pkt->len);
	err = nat_apply(skb, pkt, &flow);
	if (err)
		return err;
	if (flow.flags & CT_F_HAIRPIN) {
		pkt->redirect_back = 1;
		if (reason == REASON_NAT_NEW)
			reason = REASON_HAIRPIN;
	}
	return reason;
}

#endif
