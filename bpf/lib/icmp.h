/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* ICMP errors about NATed flows. A backend (or a router on the way) answers the packet as it left
 * the client's node: its ICMP error quotes that packet (client -> backend:port, maybe from a
 * translated port), which the client's socket would never match. The quote is restored to what the
 * client sent (through the flow's reply leg, which undoes exactly that rewrite), and the error's
 * source becomes the frontend when the backend itself sent it, so port-unreachable reaches the
 * client as ECONNREFUSED and fragmentation-needed makes path MTU discovery work. */
#ifndef SLUICE_LIB_ICMP_H
#define SLUICE_LIB_ICMP_H

#include "common.h"
#include "nat.h"

#define ICMP_TIME_EXCEEDED 11
#ifndef ICMP_DEST_UNREACH
#define ICMP_DEST_UNREACH 3
#endif
#define ICMP_HDR_LEN 8

/* A 16-bit word of the quote changes: keep the ICMP checksum right (ICMP has no pseudo header). */
static __always_inline int quote_csum16(struct __sk_buff *skb, __u32 icmp_csum, __be16 old,
					__be16 new)
{
	return old == new ? 0 : bpf_l4_csum_replace(skb, icmp_csum, old, new, sizeof(new));
}

static __always_inline int quote_store16(struct __sk_buff *skb, __u32 icmp_csum, __u32 off,
					 __be16 old, __be16 new)
{
	if (old == new)
		return 0;
	if (quote_csum16(skb, icmp_csum, old, new) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

/* A quoted IP address changes: the quoted IP header checksum, the ICMP checksum, the field. */
static __always_inline int quote_addr(struct __sk_buff *skb, __u32 icmp_csum, __u32 in_off,
				      __u32 field, __be32 old, __be32 new)
{
	__u32 check_off = in_off + offsetof(struct iphdr, check);
	__be16 check_old, check_new;

	if (old == new)
		return 0;
	if (bpf_skb_load_bytes(skb, check_off, &check_old, 2) < 0 ||
	    bpf_l3_csum_replace(skb, check_off, old, new, sizeof(new)) < 0 ||
	    bpf_skb_load_bytes(skb, check_off, &check_new, 2) < 0 ||
	    quote_csum16(skb, icmp_csum, check_old, check_new) < 0 ||
	    bpf_l4_csum_replace(skb, icmp_csum, old, new, sizeof(new)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, in_off + field, &new, sizeof(new), 0);
}

/**
 * icmp_error_rev_nat - an ICMP dest-unreachable or time-exceeded towards a local pod about one of
 * its NATed (or port-translated) flows.
 * Return: REASON_REV_NAT_ICMP (rewritten), REASON_PASS (not about such a flow), or a drop reason.
 */
SL_GLOBAL int icmp_error_rev_nat(struct __sk_buff *skb, struct packet *pkt)
{
	struct { __u8 type, code; __sum16 csum; __be32 rest; } icmp;
	struct iphdr in;
	__be16 ports[2], old_sum, new_sum;
	__u32 in_off, in_l4, icmp_csum, sum_off;
	struct ct_key key = {};
	struct ct_value *ct;
	__be32 vip = 0;

	if (!pkt)
		return REASON_DROP_REWRITE;

	if (bpf_skb_load_bytes(skb, pkt->l4_off, &icmp, sizeof(icmp)) < 0)
		return REASON_PASS;
	if (icmp.type != ICMP_DEST_UNREACH && icmp.type != ICMP_TIME_EXCEEDED)
		return REASON_PASS;
	/* Everything quoted lies within the ICMP packet, not in padding after it. */
	in_off = pkt->l4_off + ICMP_HDR_LEN;
	if (in_off + sizeof(in) > pkt->ip_end ||
	    bpf_skb_load_bytes(skb, in_off, &in, sizeof(in)) < 0)
		return REASON_PASS;
	if (in.version != 4 || in.ihl < 5 || (in.protocol != IPPROTO_TCP && in.protocol != IPPROTO_UDP))
		return REASON_PASS;
	in_l4 = in_off + (in.ihl & 0xf) * 4;
	if (in_l4 + sizeof(ports) > pkt->ip_end ||
	    bpf_skb_load_bytes(skb, in_l4, ports, sizeof(ports)) < 0)
		return REASON_PASS;

	/* The quote went client -> backend; the flow's reply leg is backend -> client. */
	key.saddr = in.daddr;
	key.daddr = in.saddr;
	key.sport = ports[1];
	key.dport = ports[0];
	key.proto = in.protocol;
	ct = bpf_map_lookup_elem(&sl_ct_v2, &key);
	if (!ct || ct->type != CT_TYPE_REV || (ct->flags & CT_F_HAIRPIN))
		return REASON_PASS;

	icmp_csum = pkt->l4_off + offsetof(typeof(icmp), csum);

	/* The quoted transport checksum, when quoted (UDP 0 = none): pseudo header and ports. */
	sum_off = in_l4 + (in.protocol == IPPROTO_TCP ? 16 : 6);
	if (pkt->ip_end >= sum_off + 2 && bpf_skb_load_bytes(skb, sum_off, &old_sum, 2) == 0 &&
	    !(in.protocol == IPPROTO_UDP && old_sum == 0)) {
		__u64 mangled = in.protocol == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

		if ((ct->nat_saddr &&
		     bpf_l4_csum_replace(skb, sum_off, in.daddr, ct->nat_saddr,
					 mangled | BPF_F_PSEUDO_HDR | sizeof(__be32)) < 0) ||
		    (ct->nat_sport &&
		     bpf_l4_csum_replace(skb, sum_off, ports[1], ct->nat_sport,
					 mangled | sizeof(__be16)) < 0) ||
		    (ct->nat_dport &&
		     bpf_l4_csum_replace(skb, sum_off, ports[0], ct->nat_dport,
					 mangled | sizeof(__be16)) < 0) ||
		    bpf_skb_load_bytes(skb, sum_off, &new_sum, 2) < 0 ||
		    quote_csum16(skb, icmp_csum, old_sum, new_sum) < 0)
			return REASON_DROP_REWRITE;
	}

	/* Quoted ports, then the destination address: back to what the client sent. */
	if ((ct->nat_dport && quote_store16(skb, icmp_csum, in_l4, ports[0], ct->nat_dport) < 0) ||
	    (ct->nat_sport && quote_store16(skb, icmp_csum, in_l4 + 2, ports[1], ct->nat_sport) < 0) ||
	    (ct->nat_saddr && quote_addr(skb, icmp_csum, in_off, offsetof(struct iphdr, daddr),
					 in.daddr, ct->nat_saddr) < 0))
		return REASON_DROP_REWRITE;

	/* Sent by the backend itself: it speaks as the frontend. (ICMP has no pseudo header.) */
	vip = ct->nat_saddr;
	if (vip && pkt->saddr == in.daddr) {
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, pkt->saddr, vip, sizeof(vip)) < 0 ||
		    bpf_skb_store_bytes(skb, IP_SADDR_OFF, &vip, sizeof(vip), 0) < 0)
			return REASON_DROP_REWRITE;
		pkt->saddr = vip;
	}
	return REASON_REV_NAT_ICMP;
}

#endif
