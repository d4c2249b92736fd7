/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Attach point: the host side of a pod's veth.
 *   from_pod - TC ingress (packets the pod sends): service DNAT, hairpin reply leg.
 *   to_pod   - TC egress (packets to the pod): reverse NAT of service replies.
 * Both count the pod's traffic. All logic lives in lib/.
 */
#include "lib/common.h"
#include "lib/parse.h"
#include "lib/conntrack.h"
#include "lib/lb.h"
#include "lib/icmp.h"

/* Fragments carry no ports: they pass, unless they are for a VIP (cannot be NATed, so dropped). */
static __always_inline int fragment_reason(const struct packet *pkt)
{
	__be32 vip = pkt->daddr;

	if (bpf_map_lookup_elem(&sl_vip_v1, &vip))
		return REASON_DROP_FRAG_TO_VIP;
	return REASON_PASS_FRAGMENT;
}

SEC("tc")
int from_pod(struct __sk_buff *skb)
{
	struct packet pkt = {};
	struct frontend_key fk = {};
	struct frontend_value *fe;
	int reason;

	pod_account(skb, 0);
	reason = parse_packet(skb, &pkt);
	if (reason != CONTINUE)
		return finish(skb, &pkt, reason);
	if (pkt.is_frag)
		return finish(skb, &pkt, fragment_reason(&pkt));
	if (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP)
		return finish(skb, &pkt, REASON_PASS);

	/* The one lookup non-service traffic pays. */
	fk.vip = pkt.daddr;
	fk.port = pkt.dport;
	fk.proto = pkt.proto;
	fe = bpf_map_lookup_elem(&sl_fe_v1, &fk);
	if (fe)
		return finish(skb, &pkt, lb_forward(skb, &pkt, fe));
	/* A backend answering a hairpinned client: turn the reply around here. */
	if (pkt.daddr == hairpin_addr)
		return finish(skb, &pkt, ct_reverse(skb, &pkt));
	return finish(skb, &pkt, REASON_PASS);
}

SEC("tc")
int to_pod(struct __sk_buff *skb)
{
	struct packet pkt = {};
	int reason;

	pod_account(skb, 1);
	reason = parse_packet(skb, &pkt);
	if (reason != CONTINUE)
		return finish(skb, &pkt, reason);
	/* Fragments carry no ports; towards a pod they are never for a VIP. */
	if (pkt.is_frag)
		return finish(skb, &pkt, REASON_PASS_FRAGMENT);
	/* An ICMP error about a service flow: make its quote match the client's socket. */
	if (pkt.proto == IPPROTO_ICMP)
		return finish(skb, &pkt, icmp_error_rev_nat(skb, &pkt));
	if (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP)
		return finish(skb, &pkt, REASON_PASS);
	/* A service reply: restore the frontend as its source. */
	return finish(skb, &pkt, ct_reverse(skb, &pkt));
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
