/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Parsing: Ethernet + IPv4 (+ options) + the TCP/UDP ports. Reads straight from the skb's linear
 * area, where the headers of nearly every frame are (a helper call per header cost more than the
 * rest of the parse), and with bpf_skb_load_bytes otherwise, so non-linear frames parse too. */
#ifndef SLUICE_LIB_PARSE_H
#define SLUICE_LIB_PARSE_H

#include "common.h"

#define TCP_HDR_MIN 20
#define UDP_HDR_LEN 8

/* @len bytes at @off of the frame into @to, as bpf_skb_load_bytes. Pointers to the packet are
 * taken afresh on every call: kept across calls they would cost stack, which the deepest call
 * chains (uplink.bpf.c) do not have to spare. */
static __always_inline int load_hdr(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + off + len <= data_end) {
		__builtin_memcpy(to, data + off, len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

/**
 * parse_packet - fill @pkt from @skb.
 * Return: CONTINUE for IPv4 worth looking at (fragments included, marked), else the reason that
 * ends processing (non-IPv4 passes; malformed or truncated IPv4 drops). A first fragment must
 * hold the whole TCP/UDP header (RFC 1858: a tiny first fragment is an attack, not a packet).
 */
static __always_inline int parse_packet(struct __sk_buff *skb, struct packet *pkt)
{
	struct iphdr ip;
	__be16 h_proto;
	__u32 ip_len, hdr_len;
	__u16 frag_off;

	pkt->len = skb->len;
	if (load_hdr(skb, offsetof(struct ethhdr, h_proto), &h_proto, sizeof(h_proto)) < 0)
		return REASON_PASS_NON_IPV4;
	if (h_proto != bpf_htons(ETH_P_IP))
		return REASON_PASS_NON_IPV4;
	if (load_hdr(skb, IP_OFF, &ip, sizeof(ip)) < 0)
		return REASON_DROP_TRUNCATED;
	if (ip.version != 4 || ip.ihl < 5)
		return REASON_DROP_MALFORMED;

	hdr_len = ip.ihl * 4;
	ip_len = bpf_ntohs(ip.tot_len);
	if (ip_len == 0 && skb->gso_size)      /* BIG TCP super-packet: length is the skb's */
		ip_len = skb->len - ETH_HLEN;
	if (ip_len < hdr_len)
		return REASON_DROP_MALFORMED;
	if (skb->len < ETH_HLEN + ip_len)
		return REASON_DROP_TRUNCATED;

	pkt->ihl = ip.ihl;
	pkt->l4_off = ETH_HLEN + hdr_len;
	pkt->ip_end = ETH_HLEN + ip_len;
	pkt->saddr = ip.saddr;
	pkt->daddr = ip.daddr;
	pkt->proto = ip.protocol;
	pkt->ip_id = ip.id;
	frag_off = bpf_ntohs(ip.frag_off);
	if (frag_off & IP_OFFSET) {
		pkt->frag = FRAG_LATER;
		return CONTINUE;
	}
	if (frag_off & IP_MF)
		pkt->frag = FRAG_FIRST;

	if (ip.protocol == IPPROTO_TCP) {
		__u8 hdr[14]; /* ports, seq, ack, data offset, flags */

		if (ip_len < hdr_len + TCP_HDR_MIN)
			return pkt->frag ? REASON_DROP_MALFORMED : REASON_DROP_TRUNCATED;
		if (load_hdr(skb, pkt->l4_off, hdr, sizeof(hdr)) < 0)
			return REASON_DROP_TRUNCATED;
		__builtin_memcpy(&pkt->sport, hdr, 2);
		__builtin_memcpy(&pkt->dport, hdr + 2, 2);
		pkt->tcp_flags = hdr[13];
	} else if (ip.protocol == IPPROTO_UDP) {
		__be16 ports[2];

		if (ip_len < hdr_len + UDP_HDR_LEN)
			return pkt->frag ? REASON_DROP_MALFORMED : REASON_DROP_TRUNCATED;
		if (load_hdr(skb, pkt->l4_off, ports, sizeof(ports)) < 0)
			return REASON_DROP_TRUNCATED;
		pkt->sport = ports[0];
		pkt->dport = ports[1];
	}
	return CONTINUE;
}

#endif
