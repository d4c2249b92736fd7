/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* TCP MSS clamping for tunnelled flows: a client's full-size segment plus the encapsulation would
 * not fit the underlay, and path MTU discovery fails wherever ICMP is filtered. The MSS option of
 * a SYN or SYN-ACK is lowered to what fits; segments then never need fragmentation. */
#ifndef SLUICE_LIB_MSS_H
#define SLUICE_LIB_MSS_H

#include <linux/tcp.h>
#include "common.h"
#include "nat.h"

#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_MSS 2
#define TCP_OPTS_MAX 40

/**
 * mss_clamp - if @pkt is a SYN or SYN-ACK whose MSS option exceeds @max, lower it (the TCP
 * checksum updated). Return: 1 if clamped, 0 if not, -1 on a helper failure.
 */
SL_GLOBAL int mss_clamp(struct __sk_buff *skb, const struct packet *pkt, __u32 max)
{
	__u8 opts[TCP_OPTS_MAX] = {};
	__u8 doff;
	__u32 len, i = 0;

	if (!pkt)
		return 0;
	if (pkt->proto != IPPROTO_TCP || !(pkt->tcp_flags & TCPF_SYN) || pkt->frag)
		return 0;
	if (bpf_skb_load_bytes(skb, pkt->l4_off + 12, &doff, 1) < 0)
		return 0;
	len = ((doff >> 4) & 0xf) * 4;
	if (len <= 20)
		return 0;
	len -= 20;
	if (len > TCP_OPTS_MAX || bpf_skb_load_bytes(skb, pkt->l4_off + 20, opts, len) < 0)
		return 0;
	for (int n = 0; n < TCP_OPTS_MAX && i < len; n++) {
		__u8 kind, olen;

		if (i >= TCP_OPTS_MAX)
			break;
		kind = opts[i];
		if (kind == TCPOPT_EOL)
			break;
		if (kind == TCPOPT_NOP) {
			i++;
			continue;
		}
		if (i + 1 >= TCP_OPTS_MAX || i + 1 >= len)
			break;
		olen = opts[i + 1];
		if (olen < 2)
			break;
		if (kind == TCPOPT_MSS && olen == 4 && i + 3 < TCP_OPTS_MAX) {
			__be16 old, new = bpf_htons(max);

			__builtin_memcpy(&old, &opts[i + 2], 2);
			if (bpf_ntohs(old) <= max)
				return 0;
			if (bpf_l4_csum_replace(skb, l4_csum_off(pkt), old, new, sizeof(new)) < 0 ||
			    bpf_skb_store_bytes(skb, pkt->l4_off + 20 + i + 2, &new, sizeof(new), 0) < 0)
				return -1;
			return 1;
		}
		i += olen;
	}
	return 0;
}

#endif
