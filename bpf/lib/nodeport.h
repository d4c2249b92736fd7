/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * External frontends (NodePort, LoadBalancer IPs, external IPs) on the uplink, with the client's
 * address kept: only the destination is ever rewritten.
 *
 *  ingress node, local backend:  DNAT here; the reply's source is restored at the uplink (np_reply).
 *  ingress node, remote backend: the packet, unchanged, is encapsulated to the backend's node; the
 *                                flow is pinned to that node (a one-direction TUN entry).
 *  backend node:                 decapsulates (only from known nodes, with sluice's VNI), picks
 *                                among its own endpoints, DNATs, and records the frontend (the
 *                                ingress node's address and port) as the reply's source.
 *  reply (DSR):                  leaves the backend's node straight to the client.
 *  reply (tunnel mode):          encapsulated back to the ingress node, which sends it on.
 * Requests use vxlan_vni, tunnelled replies vxlan_vni + 1: the two are never confused.
 * MTU: SYN and SYN-ACK MSS options of tunnelled flows are clamped; a packet that would not fit
 * once encapsulated is answered with ICMP fragmentation-needed from the address the client
 * targeted. GSO packets are judged by their segments (TCP segments shrink with the headroom).
 */
#ifndef SLUICE_LIB_NODEPORT_H
#define SLUICE_LIB_NODEPORT_H

#include "common.h"
#include "conntrack.h"
#include "frag.h"
#include "frontend.h"
#include "lb.h"
#include "mss.h"
#include "nat.h"
#include "reject.h"
#include "vxlan.h"

#define TCP_IP_HDRS 40 /* IPv4 + TCP without options: what an MSS leaves out of the MTU */

/* The uplink's MTU, and whether this packet fits it once encapsulated. GSO packets fit: TCP
 * segments shrink with the added headers, UDP segments are checked one by one. */
static __always_inline int np_fits(struct __sk_buff *skb, __u32 *mtu)
{
	__u32 len = 0;
	long ret = bpf_check_mtu(skb, skb->ifindex, &len, VXLAN_OVERHEAD,
				 skb->gso_size ? BPF_MTU_CHK_SEGS : 0);

	*mtu = len;
	return ret == BPF_MTU_CHK_RET_SUCCESS || (skb->gso_size && ret != BPF_MTU_CHK_RET_SEGS_TOOBIG);
}

/* Too big once encapsulated: tell the sender, from the address it sent to (the inner header is
 * quoted as it was). Sent back out (@back_in: back into the node, towards a local pod). */
static __always_inline int np_frag_needed(struct __sk_buff *skb, struct packet *pkt, __u32 mtu,
					  int back_in)
{
	if (icmp_unreachable_reply(skb, pkt, ICMP_FRAG_NEEDED, mtu - VXLAN_OVERHEAD) < 0)
		return REASON_DROP_TOO_BIG;
	pkt->redirect_ingress = back_in;
	return REASON_FRAG_NEEDED;
}

/* Encapsulates the packet to node @peer with @vni and sends it to that node. */
SL_GLOBAL int np_encap_send(struct __sk_buff *skb, struct packet *pkt, __be32 peer, __u32 vni,
			    int clamp)
{
	__u32 mtu;
	int err;

	if (!pkt)
		return REASON_DROP_ENCAP;
	if (!np_fits(skb, &mtu))
		return np_frag_needed(skb, pkt, mtu, 0);
	if (clamp && mtu > VXLAN_OVERHEAD + TCP_IP_HDRS &&
	    mss_clamp(skb, pkt, mtu - VXLAN_OVERHEAD - TCP_IP_HDRS) < 0)
		return REASON_DROP_REWRITE;
	err = vxlan_encap(skb, pkt, peer, vni);
	if (err)
		return err;
	pkt->redirect_neigh = 1;
	return 0;
}

static __always_inline __u8 np_mode_flags(void)
{
	return CT_F_EXTERNAL | (lb_mode == LB_MODE_TUNNEL ? CT_F_TUNNEL : CT_F_DSR);
}

/**
 * np_forward - uplink ingress: an external client's packet to an external frontend of this node.
 * Return: the reason (redirects set in @pkt).
 */
SL_GLOBAL int np_forward(struct __sk_buff *skb, struct packet *pkt,
			 const struct frontend_value *fe)
{
	struct ct_key key = {};
	struct ct_value *flow = scratch_flow();
	struct backend_value be = {};
	struct new_flow nf;
	struct ct_value *ct;
	struct lb_set set;
	__u64 now = sl_now();
	__u64 update = BPF_NOEXIST;
	__be32 saddr, daddr;
	int reason = 0, restart = 0, err;

	if (!pkt || !fe || !flow)
		return REASON_DROP_REWRITE;
	saddr = pkt->saddr;
	daddr = pkt->daddr;
	ct_key_of(pkt, &key);
	ct = bpf_map_lookup_elem(&sl_ct_v2, &key);
	if (ct && ct->type == CT_TYPE_TUN) {
		/* Pinned to a backend's node; a SYN after it ended may go elsewhere, and so does a UDP
		 * flow whose backend stopped receiving new flows (as on a pod's service flow). */
		if (is_tcp_syn(pkt) && ct_ended(ct->seen, 0)) {
			restart = REASON_FLOW_REPLACED;
			ct_delete_flow(&key, ct);
		} else if (pkt->proto == IPPROTO_UDP && ct->gen != fe->gen &&
			   !((ct->set_id == fe->cluster_id || ct->set_id == fe->local_id) &&
			     lb_member(ct->set_id, ct->nat_daddr, ct->nat_dport))) {
			restart = REASON_UDP_REBALANCED;
			ct_delete_flow(&key, ct);
		} else {
			if (ct->gen != fe->gen)
				ct->gen = fe->gen;
			ct_touch(ct, pkt, 0, now);
			svc_account(fe->cluster_id, pkt->len, SVC_FORWARDED);
			frag_remember_tun(pkt, saddr, daddr, ct->tun_addr);
			err = np_encap_send(skb, pkt, ct->tun_addr, vxlan_vni, 1);
			return err ? err : REASON_NP_FORWARD;
		}
	} else if (ct && ct->type == CT_TYPE_FWD) {
		reason = lb_hit(&key, ct, fe, pkt, now, flow, &restart);
	} else if (ct) {
		update = BPF_ANY;
	}

	if (!reason) {
		if (fe->flags & FE_F_ETP_LOCAL) {
			set.id = fe->local_id;
			set.count = fe->local_count;
			if (!set.count)
				return fe->cluster_count ? REASON_DROP_NO_LOCAL
							 : reject_port_unreachable(skb, pkt);
		} else {
			set.id = fe->cluster_id;
			set.count = fe->cluster_count;
			if (!set.count)
				return reject_port_unreachable(skb, pkt);
		}
		reason = lb_pick(fe, set, pkt, now, &be);
		if (reason >= REASON_FIRST_DROP)
			return reason;
		if (!(be.flags & BE_F_LOCAL)) {
			/* A remote backend: its node serves the flow; this node only forwards. */
			if (!be.node)
				return REASON_DROP_NO_NODE;
			struct ct_value *tun = flow;

			tun->created_ns = tun->last_seen_ns = now;
			tun->set_id = set.id;
			tun->gen = fe->gen;
			tun->tun_addr = be.node;
			tun->nat_daddr = be.addr; /* the backend: what UDP flows re-check */
			tun->nat_dport = be.port;
			tun->seen = ct_bits_of(pkt);
			tun->type = CT_TYPE_TUN;
			tun->flags = np_mode_flags();
			if (ct_insert(&key, tun, update) < 0 && ct_insert(&key, tun, BPF_ANY) < 0)
				return REASON_DROP_CT_CREATE;
			svc_account(fe->cluster_id, pkt->len, SVC_FORWARDED);
			frag_remember_tun(pkt, saddr, daddr, be.node);
			err = np_encap_send(skb, pkt, be.node, vxlan_vni, 1);
			return err ? err : REASON_NP_FORWARD;
		}
		nf = new_flow_of(set, &be, reason, update, restart);
		nf.flow_flags = CT_F_EXTERNAL;
		reason = lb_new_flow(pkt, fe, &nf, flow);
		if (reason >= REASON_FIRST_DROP)
			return reason;
	}

	svc_account(fe->cluster_id, pkt->len, SVC_LOCAL);
	err = lb_rewrite(skb, pkt, flow);
	if (err)
		return err;
	return reason == REASON_NAT_NEW || reason == REASON_NAT_ESTABLISHED ? REASON_NP_LOCAL
									    : reason;
}

/**
 * np_backend - uplink ingress, decapsulated: an ingress node's (@peer) request for one of this
 * node's endpoints. The inner destination is the frontend the client targeted at @peer.
 * Return: the reason.
 */
SL_GLOBAL int np_backend(struct __sk_buff *skb, struct packet *pkt, __be32 peer)
{
	struct ct_key key = {};
	struct ct_value *flow = scratch_flow();
	struct backend_value be = {};
	struct frontend_value *fe;
	struct new_flow nf;
	struct ct_value *ct;
	struct lb_set set;
	__u64 now = sl_now();
	__u64 update = BPF_NOEXIST;
	int reason = 0, restart = 0, err;

	if (!pkt || !flow)
		return REASON_DROP_REWRITE;
	fe = np_frontend(pkt, 1);
	if (!fe || !(fe->flags & FE_F_EXTERNAL))
		return REASON_DROP_NO_LOCAL;
	ct_key_of(pkt, &key);
	ct = bpf_map_lookup_elem(&sl_ct_v2, &key);
	if (ct && ct->type == CT_TYPE_FWD)
		reason = lb_hit(&key, ct, fe, pkt, now, flow, &restart);
	else if (ct)
		update = BPF_ANY;
	if (!reason) {
		set.id = fe->local_id;
		set.count = fe->local_count;
		if (!set.count)
			return REASON_DROP_NO_LOCAL;
		reason = lb_pick(fe, set, pkt, now, &be);
		if (reason >= REASON_FIRST_DROP)
			return reason;
		nf = new_flow_of(set, &be, reason, update, restart);
		nf.flow_flags = np_mode_flags();
		nf.tun_addr = peer;
		reason = lb_new_flow(pkt, fe, &nf, flow);
		if (reason >= REASON_FIRST_DROP)
			return reason;
	}
	svc_account(fe->cluster_id, pkt->len, SVC_DECAP);
	err = lb_rewrite(skb, pkt, flow);
	if (err)
		return err;
	return reason == REASON_NAT_NEW || reason == REASON_NAT_ESTABLISHED ? REASON_NP_DECAP
									    : reason;
}

/**
 * np_reply - uplink egress: the reply of an external flow this node DNATed. Its source becomes the
 * frontend again; in tunnel mode it is then encapsulated back to the ingress node.
 * Return: the reason, REASON_PASS when not such a reply.
 */
SL_GLOBAL int np_reply(struct __sk_buff *skb, struct packet *pkt)
{
	struct ct_key key = {};
	struct ct_value *ct;
	__be32 saddr, daddr, tun;
	__u32 mtu = 0;
	__u8 flags;
	int err;

	if (!pkt)
		return REASON_DROP_REWRITE;
	ct_key_of(pkt, &key);
	ct = bpf_map_lookup_elem(&sl_ct_v2, &key);
	if (!ct || ct->type != CT_TYPE_REV || !(ct->flags & CT_F_EXTERNAL))
		return REASON_PASS;
	flags = ct->flags;
	tun = ct->tun_addr;
	ct_touch(ct, pkt, 0, sl_now());
	if ((flags & CT_F_TUNNEL) && !np_fits(skb, &mtu))
		return np_frag_needed(skb, pkt, mtu, 1); /* to the backend, as it sent it */
	/* The SYN-ACK of a tunnelled flow: the client's segments come encapsulated. */
	if ((flags & (CT_F_DSR | CT_F_TUNNEL)) && (pkt->tcp_flags & TCPF_SYN)) {
		if (!mtu)
			np_fits(skb, &mtu);
		if (mtu > VXLAN_OVERHEAD + TCP_IP_HDRS &&
		    mss_clamp(skb, pkt, mtu - VXLAN_OVERHEAD - TCP_IP_HDRS) < 0)
			return REASON_DROP_REWRITE;
	}
	saddr = pkt->saddr;
	daddr = pkt->daddr;
	err = nat_apply(skb, pkt, nat_of(ct));
	if (err)
		return err;
	if (!(flags & CT_F_TUNNEL)) {
		frag_remember(pkt, saddr, daddr);
		return REASON_NP_REPLY;
	}
	frag_remember_tun(pkt, saddr, daddr, tun);
	err = vxlan_encap(skb, pkt, tun, vxlan_vni + 1);
	if (err)
		return err;
	pkt->redirect_neigh = 1;
	return REASON_NP_REPLY_TUNNEL;
}

/**
 * np_later_fragment - a later fragment on the uplink: rewritten and, when its first fragment was,
 * encapsulated (@vni) to the same node.
 * Return: the reason, or CONTINUE when no first fragment is remembered.
 */
static __always_inline int np_later_fragment(struct __sk_buff *skb, struct packet *pkt, __u32 vni)
{
	__be32 tun = 0;
	int reason = frag_later(skb, pkt, &tun), err;

	if (reason != REASON_NAT_FRAGMENT || !tun)
		return reason;
	err = np_encap_send(skb, pkt, tun, vni, 0);
	return err ? err : REASON_NAT_FRAGMENT;
}

#endif
