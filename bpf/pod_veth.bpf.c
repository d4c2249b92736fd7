/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Attach point: the host side of a pod's veth.
 *   from_pod - TC ingress (packets the pod sends): source check, service DNAT, direct-flow
 *              tracking, hairpin reply leg.
 *   to_pod   - TC egress (packets to the pod): reverse NAT of replies and of ICMP errors.
 * Both count the pod's traffic. All logic lives in lib/.
 */
#include "lib/common.h"
#include "lib/parse.h"
#include "lib/pod.h"
#include "lib/conntrack.h"
#include "lib/frag.h"
#include "lib/frontend.h"
#include "lib/lb.h"
#include "lib/direct.h"
#include "lib/icmp.h"

/* A later fragment: rewritten as its first was, or passed; one for a VIP cannot be NATed. */
static __always_inline int later_fragment(struct __sk_buff *skb, struct packet *pkt)
{
	__be32 vip = pkt->daddr;
	int reason = frag_later(skb, pkt, 0);

	if (reason != CONTINUE)
		return reason;
	if (bpf_map_lookup_elem(&sl_vip_v1, &vip))
		return REASON_DROP_FRAG_ORPHAN;
	return REASON_PASS_FRAGMENT;
}

SEC("tc")
int from_pod(struct __sk_buff *skb)
{
	struct packet pkt = {};
	struct frontend_value *fe;
	struct pod_info *pod;
	__be32 saddr, daddr;
	int reason;

	pod = pod_account(skb, 0);
	reason = parse_packet(skb, &pkt);
	if (reason != CONTINUE)
		return finish(skb, &pkt, reason);
	if (!pod_source_ok(pod, &pkt, skb->ifindex))
		return finish(skb, &pkt, REASON_DROP_SPOOFED);
	if (pkt.frag == FRAG_LATER)
		return finish(skb, &pkt, later_fragment(skb, &pkt));
	if (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP)
		return finish(skb, &pkt, REASON_PASS);

	/* The one lookup every other packet pays before direct tracking (a second for a node
	 * address: the NodePort on every node). */
	fe = np_frontend(&pkt, 0);
	if (!fe && np_is_node(pkt.daddr, 0))
		fe = np_frontend(&pkt, 1);
	if (fe)
		return finish(skb, &pkt, lb_forward(skb, &pkt, fe));
	/* A backend answering a hairpinned client: turn the reply around here. */
	if (pkt.daddr == hairpin_addr) {
		saddr = pkt.saddr;
		daddr = pkt.daddr;
		reason = ct_reverse(skb, &pkt);
		if (reason < REASON_FIRST_DROP)
			frag_remember(&pkt, saddr, daddr);
		return finish(skb, &pkt, reason);
	}
	return finish(skb, &pkt, direct_track(skb, &pkt));
}

SEC("tc")
int to_pod(struct __sk_buff *skb)
{
	struct packet pkt = {};
	__be32 saddr, daddr;
	int reason;

	pod_account(skb, 1);
	reason = parse_packet(skb, &pkt);
	if (reason != CONTINUE)
		return finish(skb, &pkt, reason);
	if (pkt.frag == FRAG_LATER)
		return finish(skb, &pkt, later_fragment(skb, &pkt));
	/* An ICMP error about a NATed flow: make its quote match the client's socket. */
	if (pkt.proto == IPPROTO_ICMP)
		return finish(skb, &pkt, icmp_error_rev_nat(skb, &pkt));
	if (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP)
		return finish(skb, &pkt, REASON_PASS);
	/* A reply: restore the frontend as its source. */
	saddr = pkt.saddr;
	daddr = pkt.daddr;
	reason = ct_reverse(skb, &pkt);
	if (reason < REASON_FIRST_DROP)
		frag_remember(&pkt, saddr, daddr);
	return finish(skb, &pkt, reason);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
