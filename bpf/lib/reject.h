/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Reject a connection at once, as kube-proxy does for a service without endpoints: turn the packet
 * into an ICMP port unreachable and send it back to the client, which fails connect() with
 * ECONNREFUSED (TCP) or gets the error on its next recv (connected UDP). */
#ifndef SLUICE_LIB_REJECT_H
#define SLUICE_LIB_REJECT_H

#include "common.h"
#include "csum.h"

/* linux/icmp.h drags in libc's socket headers; the values we need, from RFC 792. */
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define ICMP_FRAG_NEEDED  4
#define IP_HDR_MAX_LEN    60 /* IHL 15 */
/*
 * Quoted after the original IP header: RFC 792's 8 bytes for UDP, the whole fixed TCP header for
 * TCP. A packet the pod sent with checksum offload (CHECKSUM_PARTIAL) cannot be cut before the
 * end of its L4 checksum field (bpf_skb_change_tail refuses), and that field sits at TCP offset
 * 16; RFC 1812 allows quoting more than 8 bytes anyway.
 */
#define QUOTE_UDP         8
#define QUOTE_TCP         20
#define QUOTE_CSUM_UDP    6
#define QUOTE_CSUM_TCP    16

struct icmp_unreach_hdr {
	__u8   type;
	__u8   code;
	__sum16 checksum;
	__be16 unused;
	__be16 mtu;             /* fragmentation needed: the next hop's MTU (RFC 1191) */
};

struct icmp_reject {
	struct iphdr ip;
	struct icmp_unreach_hdr icmp;
	/* The original IP header, options included, then the start of its payload. */
	__u8 quote[IP_HDR_MAX_LEN + QUOTE_TCP];
};

/*
 * The value for the quoted L4 checksum field that checksum completion leaves as it is.
 *
 * A SYN sent with checksum offload is CHECKSUM_PARTIAL: the kernel still has to sum the L4 bytes
 * from csum_start and store the result in the checksum field. Rewriting the packet into an ICMP
 * error keeps that state, and csum_start still points at the (now quoted) L4 header: a device
 * without TX checksum offload (or skb_checksum_help anywhere on the way) would overwrite the
 * quote's field and break the ICMP checksum. No BPF helper can clear CHECKSUM_PARTIAL, so the
 * field is given the one value F with fold(S + F) = ~F (S: the sum of the quoted L4 bytes without
 * it): completing it again writes F, and the ICMP is valid whether or not anything completes it.
 * S + 2F = 0 (mod 0xffff), so F = (0xffff - S) / 2 = (0xffff - S) * 0x8000 (mod 0xffff); 0 is
 * written as 0xffff (CSUM_MANGLED_0), which is the same number in one's complement.
 */
static __always_inline __u16 csum_fixed_point(__u32 sum_without_field)
{
	__u32 s = csum_fold16(sum_without_field);
	__u32 f = ((0xffff - s) * 0x8000U) % 0xffff;

	return f ? (__u16)f : 0xffff;
}

/**
 * icmp_unreachable_reply - rewrite @skb in place into an ICMP destination unreachable (@code:
 * port unreachable, or fragmentation needed with @mtu) for its sender, from the address it was
 * sent to. The quote is the original IP header with its options and the start of the payload, so
 * the sender finds its socket from the quoted ports whatever the header length.
 * Return: 0 with pkt->redirect_back set, or -1 when the packet cannot be turned around (helper
 * failure).
 */
SL_GLOBAL int icmp_unreachable_reply(struct __sk_buff *skb, struct packet *pkt, __u32 code,
				     __u32 mtu)
{
	__u32 zero = 0, ip_hlen, l4_len, csum_at, quote_len, len;
	struct reject_room { struct icmp_reject r; __u8 l4[QUOTE_TCP]; } *room;
	struct icmp_reject *rp;
	__u8 *l4;
	__u16 field;
	__s64 sum;
	int tcp;

	_Static_assert(sizeof(struct reject_room) <= sizeof(((struct scratch *)0)->icmp), "scratch too small");
	room = bpf_map_lookup_elem(&sl_scratch_v1, &zero); /* its icmp part */
	if (!pkt || !room)
		return -1;
	__builtin_memset(room, 0, sizeof(*room));
	rp = &room->r;
	l4 = room->l4;
	/* parse_packet guarantees 5 <= ihl <= 15 and a full TCP/UDP header after it; the masks also
	 * bound the lengths below for the verifier. */
	ip_hlen = (pkt->ihl & 0xf) * 4;
	tcp = pkt->proto == IPPROTO_TCP;
	l4_len = tcp ? QUOTE_TCP : QUOTE_UDP;
	csum_at = tcp ? QUOTE_CSUM_TCP : QUOTE_CSUM_UDP;
	quote_len = ip_hlen + l4_len;
	len = sizeof(rp->ip) + sizeof(rp->icmp) + quote_len;

	if (bpf_skb_load_bytes(skb, IP_OFF, rp->quote, quote_len) < 0)
		return -1;
	if (tcp ? bpf_skb_load_bytes(skb, pkt->l4_off, l4, QUOTE_TCP)
		: bpf_skb_load_bytes(skb, pkt->l4_off, l4, QUOTE_UDP))
		return -1;
	/* The quoted L4 checksum field: see csum_fixed_point. */
	l4[csum_at] = l4[csum_at + 1] = 0;
	sum = tcp ? bpf_csum_diff(0, 0, (__be32 *)l4, QUOTE_TCP, 0)
		  : bpf_csum_diff(0, 0, (__be32 *)l4, QUOTE_UDP, 0);
	if (sum < 0)
		return -1;
	/* bpf_csum_diff sums in memory order, so F comes out in memory (network) order too. */
	field = csum_fixed_point((__u32)sum);
	if (ip_hlen + csum_at + 2 > sizeof(rp->quote))
		return -1;
	__builtin_memcpy(&rp->quote[ip_hlen + csum_at], &field, 2);

	/* Keep Ethernet + the quote, then open room for the new IP and ICMP headers before it. */
	if (bpf_skb_change_tail(skb, ETH_HLEN + quote_len, 0) < 0)
		return -1;
	if (bpf_skb_adjust_room(skb, sizeof(rp->ip) + sizeof(rp->icmp), BPF_ADJ_ROOM_MAC, 0) < 0)
		return -1;

	rp->ip.version = 4;
	rp->ip.ihl = 5;
	rp->ip.tot_len = bpf_htons(len);
	rp->ip.ttl = 64;
	rp->ip.protocol = IPPROTO_ICMP;
	rp->ip.saddr = pkt->daddr;
	rp->ip.daddr = pkt->saddr;
	sum = bpf_csum_diff(0, 0, (__be32 *)&rp->ip, sizeof(rp->ip), 0);
	if (sum < 0)
		return -1;
	rp->ip.check = csum_fold32((__u32)sum);

	rp->icmp.type = ICMP_DEST_UNREACH;
	rp->icmp.code = code;
	rp->icmp.mtu = bpf_htons(mtu);
	sum = bpf_csum_diff(0, 0, (__be32 *)&rp->icmp, sizeof(rp->icmp) + quote_len, 0);
	if (sum < 0)
		return -1;
	rp->icmp.checksum = csum_fold32((__u32)sum);

	if (bpf_skb_store_bytes(skb, IP_OFF, rp, len, 0) < 0)
		return -1;
	pkt->redirect_back = 1;
	return 0;
}

/* A service without endpoints: ICMP port unreachable. Return: REASON_NO_BACKEND, or
 * REASON_DROP_NO_BACKEND when it could not be built (the client then times out instead). */
static __always_inline int reject_port_unreachable(struct __sk_buff *skb, struct packet *pkt)
{
	return icmp_unreachable_reply(skb, pkt, ICMP_PORT_UNREACH, 0) ? REASON_DROP_NO_BACKEND
								       : REASON_NO_BACKEND;
}

#endif
