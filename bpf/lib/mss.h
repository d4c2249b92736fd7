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
 * The options are read with bpf_skb_load_bytes, a few bytes per option (a SYN carries about
 * five), so the walk's index is only ever a helper's offset, never pointer arithmetic: the
 * verifier then need not track it exactly and prunes the loop's states. Walked through packet
 * pointers, the index had to be exact and every (length, index) combination was verified: 95 %
 * of the uplink programs' verification (~1 s of an upgrade's start).
 */
SL_GLOBAL int mss_clamp(struct __sk_buff *skb, const struct packet *pkt, __u32 max)
{
	__u32 off, pos, end;
	__u8 doff;

	if (!pkt)
		return 0;
	if (pkt->proto != IPPROTO_TCP || !(pkt->tcp_flags & TCPF_SYN) || pkt->frag)
		return 0;
	off = pkt->l4_off & 0x7f; /* 14 + at most 60: bounded for the verifier */
	if (bpf_skb_load_bytes(skb, off + 12, &doff, 1) < 0)
		return 0;
	/* Absolute offsets: the first option's and the header's end. Both depend on the unknown
	 * l4_off, so no comparison of the two is decided by the verifier and neither becomes
	 * exact (a walk from index 0 to a length made it so). */
	pos = off + 20;
	end = off + ((doff >> 4) & 0xf) * 4;
	for (int n = 0; n < TCP_OPTS_MAX; n++) {
		__u8 opt[4];

		if (pos >= end || bpf_skb_load_bytes(skb, pos, opt, 1) < 0)
			break;
		if (opt[0] == TCPOPT_EOL)
			break;
		if (opt[0] == TCPOPT_NOP) {
			pos++;
			continue;
		}
		if (pos + 2 > end || bpf_skb_load_bytes(skb, pos, opt, 2) < 0 || opt[1] < 2)
			break;
		if (opt[0] == TCPOPT_MSS && opt[1] == 4) {
			__be16 old, new = bpf_htons(max);

			if (pos + 4 > end || bpf_skb_load_bytes(skb, pos, opt, 4) < 0)
				break;
			__builtin_memcpy(&old, &opt[2], 2);
			if (bpf_ntohs(old) <= max)
				return 0;
			if (bpf_skb_store_bytes(skb, pos + 2, &new, sizeof(new), 0) < 0 ||
			    bpf_l4_csum_replace(skb, l4_csum_off(pkt), old, new, sizeof(new)) < 0)
				return -1;
			return 1;
		}
		pos += opt[1];
	}
	return 0;
}

#endif
