/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Reject a connection at once, as kube-proxy does for a service without endpoints: turn the packet
 * into an ICMP port unreachable and send it back to the client, which fails connect() with
 * ECONNREFUSED (TCP) or gets the error on its next recv (connected UDP). */
#ifndef SLUICE_LIB_REJECT_H
#define SLUICE_LIB_REJECT_H

#include "common.h"

/* linux/icmp.h drags in libc's socket headers; the three values we need, from RFC 792. */
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define IP_HDR_MAX_LEN    60 /* IHL 15 */
/*
 * Quoted after the original IP header: RFC 792's 8 bytes for UDP, the whole fixed TCP header for
 * TCP. A packet the pod sent with checksum offload (CHECKSUM_PARTIAL) cannot be cut before the
 * end of its L4 checksum field (bpf_skb_change_tail refuses), and that field sits at TCP offset
 * 16; RFC 1812 allows quoting more than 8 bytes anyway.
 */
#define QUOTE_UDP         8
#define QUOTE_TCP         20

struct icmp_unreach_hdr {
	__u8   type;
	__u8   code;
	__sum16 checksum;
	__be32 unused;
};

struct icmp_reject {
	struct iphdr ip;
	struct icmp_unreach_hdr icmp;
	/* The original IP header, options included, then the start of its payload. */
	__u8 quote[IP_HDR_MAX_LEN + QUOTE_TCP];
};

static __always_inline __sum16 csum_fold32(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__sum16)~csum;
}

/**
 * reject_port_unreachable - rewrite @skb in place into ICMP dest-unreachable/port for its sender.
 * The quote is the original IP header with its options and the start of the payload, so the
 * client finds its socket from the quoted ports whatever the header length.
 * Return: REASON_NO_BACKEND with pkt->redirect_back set, or REASON_DROP_NO_BACKEND when the packet
 * cannot be turned around (helper failure): the client then times out instead.
 */
static __always_inline int reject_port_unreachable(struct __sk_buff *skb, struct packet *pkt)
{
	struct icmp_reject r = {};
	/* parse_packet guarantees 5 <= ihl <= 15 and a full TCP/UDP header after it; the mask also
	 * bounds the lengths below for the verifier. */
	__u32 quote_len = (pkt->ihl & 0xf) * 4 + (pkt->proto == IPPROTO_TCP ? QUOTE_TCP : QUOTE_UDP);
	__u32 len = sizeof(r.ip) + sizeof(r.icmp) + quote_len;
	__s64 sum;

	if (bpf_skb_load_bytes(skb, IP_OFF, r.quote, quote_len) < 0)
		return REASON_DROP_NO_BACKEND;
	/* Keep Ethernet + the quote, then open room for the new IP and ICMP headers before it. */
	if (bpf_skb_change_tail(skb, ETH_HLEN + quote_len, 0) < 0)
		return REASON_DROP_NO_BACKEND;
	if (bpf_skb_adjust_room(skb, sizeof(r.ip) + sizeof(r.icmp), BPF_ADJ_ROOM_MAC, 0) < 0)
		return REASON_DROP_NO_BACKEND;

	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.tot_len = bpf_htons(len);
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.saddr = pkt->daddr;
	r.ip.daddr = pkt->saddr;
	sum = bpf_csum_diff(0, 0, (__be32 *)&r.ip, sizeof(r.ip), 0);
	if (sum < 0)
		return REASON_DROP_NO_BACKEND;
	r.ip.check = csum_fold32((__u32)sum);

	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = ICMP_PORT_UNREACH;
	sum = bpf_csum_diff(0, 0, (__be32 *)&r.icmp, sizeof(r.icmp) + quote_len, 0);
	if (sum < 0)
		return REASON_DROP_NO_BACKEND;
	r.icmp.checksum = csum_fold32((__u32)sum);

	if (bpf_skb_store_bytes(skb, IP_OFF, &r, len, 0) < 0)
		return REASON_DROP_NO_BACKEND;
	pkt->redirect_back = 1;
	return REASON_NO_BACKEND;
}

#endif
