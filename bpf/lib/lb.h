/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Service load balancing on the forward leg: conntrack hit, or backend choice + new CT pair. */
#ifndef SLUICE_LIB_LB_H
#define SLUICE_LIB_LB_H

#include "common.h"
#include "conntrack.h"
#include "frag.h"
#include "nat.h"
#include "reject.h"
#include "xlate.h"

/* The backend set a frontend's new flows use. */
struct lb_set {
	__u32 id;
	__u32 count;
};

/* For a client on a local pod: internalTrafficPolicy for ClusterIPs; NodePorts, LoadBalancer and
 * external IPs reached from inside the cluster use every endpoint, as kube-proxy does. */
static __always_inline struct lb_set lb_set_for_pod(const struct frontend_value *fe)
{
	struct lb_set s = { .id = fe->cluster_id, .count = fe->cluster_count };

	if ((fe->flags & (FE_F_ITP_LOCAL | FE_F_EXTERNAL)) == FE_F_ITP_LOCAL) {
		s.id = fe->local_id;
		s.count = fe->local_count;
	}
	return s;
}

/* Whether @addr:@port still receives new flows of set @set_id. */
static __always_inline int lb_member(__u32 set_id, __be32 addr, __be16 port)
{
	struct member_key mk = { .set_id = set_id, .addr = addr, .port = port };

	return bpf_map_lookup_elem(&sl_bm_v1, &mk) != 0;
}

/* Pick a backend for a new flow: the client's remembered one (sessionAffinity, while it is still
 * a member of the set) or a random slot. */
static __always_inline int lb_pick(const struct frontend_value *fe, struct lb_set set,
				   const struct packet *pkt, __u64 now, struct backend_value *out)
{
	struct backend_key bk = { .set_id = set.id };
	struct affinity_key ak = { .client = pkt->saddr, .svc_id = set.id };
	struct backend_value *be;

	if (fe->flags & FE_F_AFFINITY) {
		struct affinity_value *av = bpf_map_lookup_elem(&sl_aff_v1, &ak);

		if (av && sl_age(now, av->last_used_ns) < (__u64)fe->affinity_timeout * 1000000000ULL &&
		    lb_member(set.id, av->addr, av->port)) {
			out->addr = av->addr;
			out->port = av->port;
			out->flags = 0;
			out->node = 0;
			av->last_used_ns = now;
			return REASON_AFFINITY_HIT;
		}
	}

	bk.slot = bpf_get_prandom_u32() % set.count;
	be = bpf_map_lookup_elem(&sl_be_v2, &bk);
	if (!be)
		return REASON_DROP_NO_BACKEND; /* slot removed under us: the client retransmits */
	*out = *be;

	if (fe->flags & FE_F_AFFINITY) {
		struct affinity_value av = { .last_used_ns = now, .addr = be->addr, .port = be->port };

		bpf_map_update_elem(&sl_aff_v1, &ak, &av, BPF_ANY);
	}
	return REASON_NAT_NEW;
}

/* Whether @ok (derived from a reply leg) is the forward tuple @fk: that reply leg is this very
 * flow's, left from before (its forward leg was lost or is being replaced). */
static __always_inline int ct_key_eq(const struct ct_key *a, const struct ct_key *b)
{
	return a->saddr == b->saddr && a->daddr == b->daddr && a->sport == b->sport &&
	       a->dport == b->dport && a->proto == b->proto;
}

/* What a new flow is made of: lb_new_flow's arguments (more than a BPF call takes; kept small,
 * the callers are short of stack). */
struct new_flow {
	struct backend_value be; /* lb_pick's choice */
	__u32 set_id;
	__be32 tun_addr;         /* external flows: the peer node */
	__u8 reason;             /* lb_pick's */
	__u8 reused;             /* the caller's restart reason (FLOW_REPLACED, UDP_REBALANCED), or 0 */
	__u8 replace;            /* insert the forward leg over a non-forward entry */
	__u8 flow_flags;         /* recorded on both legs (external flows) */
};

static __always_inline struct new_flow new_flow_of(struct lb_set set,
						   const struct backend_value *be, int reason,
						   __u64 update, int reused)
{
	struct new_flow nf = {
		.be = *be,
		.set_id = set.id,
		.reason = reason,
		.reused = reused,
		.replace = update == BPF_ANY,
	};
	return nf;
}

/**
 * lb_new_flow - create the forward (@fwd, filled in) and reply legs of the new flow @nf. When the
 * reply tuple belongs to a live flow, the client port is translated; when it belongs to a flow
 * that is over, that flow's entries give way.
 * Return: REASON_NAT_NEW / _AFFINITY_HIT / _NAT_NEW_XLATE / _FLOW_REPLACED (or @reused when the
 * caller is replacing this tuple's ended flow), REASON_NAT_ESTABLISHED when another CPU created the
 * flow first, or a drop reason.
 */
SL_GLOBAL int lb_new_flow(const struct packet *pkt, const struct frontend_value *fe,
			  const struct new_flow *nf, struct ct_value *fwd)
{
	struct ct_key fk = {}, rk = {}, ok = {};
	struct ct_value rev = {};
	struct ct_value *x, *winner;
	__u64 now, fwd_update_flags;
	int hairpin, err, reason, reused;

	if (!pkt || !fe || !nf || !fwd)
		return REASON_DROP_CT_CREATE;
	now = sl_now();
	fwd_update_flags = nf->replace ? BPF_ANY : BPF_NOEXIST;
	reason = nf->reason;
	reused = nf->reused;
	if (reused)
		reason = reused;
	hairpin = nf->be.addr == pkt->saddr;

	fwd->created_ns = fwd->last_seen_ns = now;
	fwd->nat_saddr = hairpin ? hairpin_addr : 0;
	fwd->nat_daddr = nf->be.addr;
	fwd->nat_sport = 0;
	fwd->nat_dport = nf->be.port;
	fwd->set_id = nf->set_id;
	fwd->gen = fe->gen;
	fwd->tun_addr = nf->tun_addr;
	fwd->seen = ct_bits_of(pkt);
	fwd->type = CT_TYPE_FWD;
	fwd->flags = (hairpin ? CT_F_HAIRPIN : 0) | nf->flow_flags;

	ct_key_of(pkt, &fk);
	ct_inverse(&fk, fwd, &rk, &rev);
	rev.created_ns = rev.last_seen_ns = now;

	x = bpf_map_lookup_elem(&sl_ct_v2, &rk);
	if (x) {
		ct_inverse(&rk, x, &ok, 0);
		if (x->type == CT_TYPE_REV && ct_key_eq(&ok, &fk)) {
			/* This flow's own reply leg: refresh it. */
			err = bpf_map_update_elem(&sl_ct_v2, &rk, &rev, BPF_ANY);
		} else if (ct_entry_gone(&rk, x, now)) {
			/* A flow that is over holds the tuple: it gives way. */
			ct_delete_flow(&rk, x);
			if (!reused)
				reason = REASON_FLOW_REPLACED;
			err = ct_insert(&rk, &rev, BPF_NOEXIST);
		} else {
			err = -1; /* a live flow: translate */
		}
	} else {
		err = ct_insert(&rk, &rev, BPF_NOEXIST);
	}
	if (err) {
		/* Taken by a live flow (or by another CPU just now): a port of our own. */
		err = xlate_insert_reverse(&fk, fwd, now, &rk, &rev);
		if (err)
			return err;
		reason = REASON_NAT_NEW_XLATE;
	}

	if (ct_insert(&fk, fwd, fwd_update_flags) == 0)
		return reason;

	/* Another CPU created this flow first: follow its choice, drop our reply leg if unused. */
	winner = bpf_map_lookup_elem(&sl_ct_v2, &fk);
	if (!winner || winner->type != CT_TYPE_FWD) {
		if (bpf_map_delete_elem(&sl_ct_v2, &rk) == 0)
			ct_event(CT_EV_DELETED, 1);
		return REASON_DROP_CT_CREATE;
	}
	ct_inverse(&fk, winner, &ok, 0);
	if (!ct_key_eq(&ok, &rk) && bpf_map_delete_elem(&sl_ct_v2, &rk) == 0)
		ct_event(CT_EV_DELETED, 1);
	*fwd = *winner;
	return REASON_NAT_ESTABLISHED;
}

/**
 * lb_hit - a packet on a flow's forward leg @key/@ct, for frontend @fe. A SYN after the flow ended
 * (the port is reused) and a UDP packet whose backend left its set (the frontend's generation
 * moved and the backend is no member any more) start a new flow: the old one is deleted and
 * *@restart says why. Otherwise the flow goes on: touched, its reply leg repaired if missing.
 * Return: REASON_NAT_ESTABLISHED / REASON_CT_REPAIRED with *@flow filled, or 0 (start over).
 */
static __always_inline int lb_hit(const struct ct_key *key, struct ct_value *ct,
				  const struct frontend_value *fe, const struct packet *pkt, __u64 now,
				  struct ct_value *flow, int *restart)
{
	struct ct_flow f = ct_flow_of(key, ct);

	if (is_tcp_syn(pkt) && ct_ended(f.a, f.b)) {
		*restart = REASON_FLOW_REPLACED; /* the port is reused: a new flow */
	} else if (pkt->proto == IPPROTO_UDP && ct->gen != fe->gen) {
		if ((ct->set_id == fe->cluster_id || ct->set_id == fe->local_id) &&
		    lb_member(ct->set_id, ct->nat_daddr, ct->nat_dport))
			ct->gen = fe->gen;
		else
			*restart = REASON_UDP_REBALANCED; /* kube-proxy's stale UDP flow cleanup */
	}
	if (*restart) {
		ct_delete_flow(key, ct);
		return 0;
	}
	ct_touch(ct, pkt, 0, now);
	*flow = *ct;
	return f.half && ct_repair_reverse(key, ct, now) ? REASON_CT_REPAIRED
							 : REASON_NAT_ESTABLISHED;
}

/* The DNAT of a service flow, then what the first fragment of its packet did, remembered. */
static __always_inline int lb_rewrite(struct __sk_buff *skb, struct packet *pkt,
				      const struct ct_value *flow)
{
	__be32 saddr = pkt->saddr, daddr = pkt->daddr;
	int err = nat_apply(skb, pkt, nat_of(flow));

	if (err)
		return err;
	frag_remember(pkt, saddr, daddr);
	return 0;
}

/**
 * lb_forward - a TCP/UDP packet from a local pod to a frontend: DNAT it towards its flow's backend.
 * Return: the reason; sets pkt->redirect_back for hairpin and reject.
 */
SL_GLOBAL int lb_forward(struct __sk_buff *skb, struct packet *pkt,
			 const struct frontend_value *fe)
{
	struct ct_key key = {};
	struct ct_value *flow = scratch_flow();
	struct ct_value *ct;
	struct lb_set set;
	__u64 now = sl_now();
	__u64 update = BPF_NOEXIST;
	int reason = 0, restart = 0, err;

	if (!pkt || !fe || !flow)
		return REASON_DROP_REWRITE;
	set = lb_set_for_pod(fe);

	ct_key_of(pkt, &key);
	ct = bpf_map_lookup_elem(&sl_ct_v2, &key);
	if (ct && ct->type == CT_TYPE_FWD)
		reason = lb_hit(&key, ct, fe, pkt, now, flow, &restart);
	else if (ct)
		update = BPF_ANY; /* not a forward leg (cannot be a live flow's): replace it */
	if (!reason) {
		struct backend_value be = {};

		if (set.count == 0)
			/* internalTrafficPolicy Local with endpoints elsewhere only: dropped, as
			 * kube-proxy does; no endpoints at all: refused. */
			return set.id != fe->cluster_id && fe->cluster_count
				       ? REASON_DROP_NO_LOCAL
				       : reject_port_unreachable(skb, pkt);
		reason = lb_pick(fe, set, pkt, now, &be);
		if (reason >= REASON_FIRST_DROP)
			return reason;
		struct new_flow nf = new_flow_of(set, &be, reason, update, restart);

		reason = lb_new_flow(pkt, fe, &nf, flow);
		if (reason >= REASON_FIRST_DROP)
			return reason;
	}

	svc_account(fe->cluster_id, pkt->len, SVC_POD);
	err = lb_rewrite(skb, pkt, flow);
	if (err)
		return err;
	if (flow->flags & CT_F_HAIRPIN) {
		pkt->redirect_back = 1;
		if (reason == REASON_NAT_NEW)
			reason = REASON_HAIRPIN;
	}
	return reason;
}

#endif
