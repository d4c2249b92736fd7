/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* TCP MSS clamping for tunnelled flows: a client's full-size segment plus the encapsulation would
 * not fit the underlay, and path MTU discovery fails wherever ICMP is filtered. The MSS option of
 * a SYN or SYN-ACK is lowered to what fits; segments then never need fragmentation. */
#ifndef SLUICE_LIB_MSS_H
#define SLUICE_LIB_MSS_H

#include <linux/tcp.h>
#include "common.h"
#include "nat.h"
#include "parse.h"

#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_MSS 2
#define TCP_OPTS_MAX 40

/**
 * mss_clamp - if @pkt is a SYN or SYN-ACK whose MSS option exceeds @max, lower it (the TCP
 * checksum updated). Return: 1 if clamped, 0 if not, -1 on a helper failure.
 *
 * The options are walked in place in the packet (pulled into the linear area if they are not
 * there). An index into a stack copy whose size was the options' length made the verifier track
 * both exactly and walk every combination: 95 % of the uplink programs' verification, 2.6 s of
 * the start that loads them (an upgrade); walked in place, the load takes ~1 s (this loop is still
 * most of it).
 */
SL_GLOBAL int mss_clamp(struct __sk_buff *skb, const struct packet *pkt, __u32 max)
{
	__u32 off, hlen, len, i = 0;
	void *data, *data_end;
	__u8 *opts, doff;

	if (!pkt)
		return 0;
	if (pkt->proto != IPPROTO_TCP || !(pkt->tcp_flags & TCPF_SYN) || pkt->frag)
		return 0;
	off = pkt->l4_off & 0x7f; /* 14 + at most 60: bounded for the verifier */
	if (load_hdr(skb, off + 12, &doff, 1) < 0)
		return 0;
	hlen = ((doff >> 4) & 0xf) * 4;
	if (hlen <= 20)
		return 0;
	len = hlen - 20;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + off + hlen > data_end) {
		if (bpf_skb_pull_data(skb, off + hlen) < 0)
			return 0;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	opts = data + off + 20;
	for (int n = 0; n < TCP_OPTS_MAX; n++) {
		__u8 *p, kind, olen;

		if (i >= len)
			break;
		p = opts + i;
		if ((void *)(p + 1) > data_end)
			break;
		kind = p[0];
		if (kind == TCPOPT_EOL)
			break;
		if (kind == TCPOPT_NOP) {
			i++;
			continue;
		}
		if (i + 2 > len || (void *)(p + 2) > data_end)
			break;
		olen = p[1];
		if (olen < 2)
			break;
		if (kind == TCPOPT_MSS && olen == 4) {
			__be16 old, new = bpf_htons(max);

			if (i + 4 > len || (void *)(p + 4) > data_end)
				break;
			__builtin_memcpy(&old, p + 2, 2);
			if (bpf_ntohs(old) <= max)
				return 0;
			__builtin_memcpy(p + 2, &new, 2);
			if (bpf_l4_csum_replace(skb, l4_csum_off(pkt), old, new, sizeof(new)) < 0)
				return -1;
			return 1;
		}
		i += olen;
	}
	return 0;
}

#endif
