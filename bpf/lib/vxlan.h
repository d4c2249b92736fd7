/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Node-to-node encapsulation, built and stripped here (no kernel tunnel device: kernels differ in
 * what they have, and every byte is then testable with PROG_TEST_RUN). VXLAN (RFC 7348): outer
 * IPv4 from this node to the peer, UDP to vxlan_port from a source port hashed from the inner flow
 * (ECMP entropy), checksum 0, sluice's VNI, then the inner Ethernet header (addresses zero) and
 * the packet as it was. Only packets from a known node, to an address of this node, with sluice's
 * VNI are taken apart.
 */
#ifndef SLUICE_LIB_VXLAN_H
#define SLUICE_LIB_VXLAN_H

#include <linux/udp.h>
#include "common.h"
#include "csum.h"

struct vxlan_outer {
	struct iphdr ip;
	struct udphdr udp;
	__be32 flags;           /* VXLAN_FLAG_VNI */
	__be32 vni;             /* VNI << 8 */
	struct ethhdr inner;
} __attribute__((packed));

_Static_assert(sizeof(struct vxlan_outer) == VXLAN_OVERHEAD, "VXLAN overhead");

/**
 * vxlan_encap - wrap the packet (as it is) for node @peer, with @vni. The caller checked the size.
 * Return: 0, or REASON_DROP_ENCAP.
 */
static __always_inline int vxlan_encap(struct __sk_buff *skb, const struct packet *pkt,
				       __be32 peer, __u32 vni)
{
	struct vxlan_outer o = {};
	struct iphdr in, ip = {};
	__u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
		      BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN);
	__u32 hash = bpf_get_hash_recalc(skb);

	if (bpf_skb_load_bytes(skb, IP_OFF, &in, sizeof(in)) < 0)
		return REASON_DROP_ENCAP;
	/* UDP GSO segments are datagrams: their size must not change. TCP's may shrink. */
	if (pkt->proto == IPPROTO_UDP)
		flags |= BPF_F_ADJ_ROOM_FIXED_GSO;
	if (bpf_skb_adjust_room(skb, VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, flags) < 0)
		return REASON_DROP_ENCAP;

	ip.version = 4;
	ip.ihl = 5;
	ip.tos = in.tos;
	ip.tot_len = bpf_htons(skb->len - ETH_HLEN);
	ip.id = in.id;
	ip.frag_off = in.frag_off & bpf_htons(IP_DF);
	ip.ttl = 64;
	ip.protocol = IPPROTO_UDP;
	ip.saddr = node_addr;
	ip.daddr = peer;
	ip.check = ip_hdr_csum(&ip);
	o.ip = ip;
	o.udp.source = bpf_htons(0xc000 | (hash & 0x3fff));
	o.udp.dest = bpf_htons(vxlan_port);
	o.udp.len = bpf_htons(skb->len - ETH_HLEN - sizeof(struct iphdr));
	o.udp.check = 0;
	o.flags = bpf_htonl(VXLAN_FLAG_VNI);
	o.vni = bpf_htonl(vni << 8);
	o.inner.h_proto = bpf_htons(ETH_P_IP);
	if (bpf_skb_store_bytes(skb, IP_OFF, &o, sizeof(o), 0) < 0)
		return REASON_DROP_ENCAP;
	return 0;
}

/* Whether the UDP packet @pkt is sluice's encapsulation from another node to this one. Reads the
 * VXLAN header; sets *@peer to the sending node and *@reply to whether it carries a tunnelled
 * reply (vxlan_vni + 1) rather than a request (vxlan_vni). */
static __always_inline int vxlan_is_ours(struct __sk_buff *skb, const struct packet *pkt,
					 __be32 *peer, int *reply)
{
	struct node_value *from, *to;
	__be32 hdr[2];
	__be32 saddr = pkt->saddr, daddr = pkt->daddr;

	if (pkt->proto != IPPROTO_UDP || pkt->dport != bpf_htons(vxlan_port) || pkt->frag)
		return 0;
	to = bpf_map_lookup_elem(&sl_node_v1, &daddr);
	if (!to || !(to->flags & NODE_F_SELF))
		return 0;
	from = bpf_map_lookup_elem(&sl_node_v1, &saddr);
	if (!from || (from->flags & NODE_F_SELF))
		return 0;
	if (bpf_skb_load_bytes(skb, pkt->l4_off + sizeof(struct udphdr), hdr, sizeof(hdr)) < 0)
		return 0;
	if (!(hdr[0] & bpf_htonl(VXLAN_FLAG_VNI)))
		return 0;
	if (hdr[1] == bpf_htonl(vxlan_vni << 8))
		*reply = 0;
	else if (hdr[1] == bpf_htonl((vxlan_vni + 1) << 8))
		*reply = 1;
	else
		return 0;
	if (pkt->ihl != 5) /* we never send options */
		return 0;
	*peer = saddr;
	return 1;
}

/* Strips the outer IPv4, UDP, VXLAN and inner Ethernet headers: the inner packet follows the outer
 * Ethernet header. Return: 0 or -1. */
static __always_inline int vxlan_decap(struct __sk_buff *skb)
{
	return bpf_skb_adjust_room(skb, -VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, 0);
}

#endif
