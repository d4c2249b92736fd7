/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Includes, the packet context every helper shares, and the single exit path with its counters. */
#ifndef SLUICE_LIB_COMMON_H
#define SLUICE_LIB_COMMON_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "consts.h"
#include "types.h"
#include "maps.h"
#include "config.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/*
 * A global function: the verifier checks it once, on its own, instead of at every call with the
 * caller's state, which keeps load time (and daemon start) short as the programs grow. Its pointer
 * arguments may be NULL as far as the verifier knows: it checks them.
 */
#define SL_GLOBAL __attribute__((noinline))

/*
 * The datapath's clock: CLOCK_MONOTONIC (the daemon's) at tick resolution. Every duration it
 * measures is a timeout of seconds; the coarse clock is a memory read where bpf_ktime_get_ns reads
 * the TSC (tens of ns in a VM, on every packet of a flow).
 */
static __always_inline __u64 sl_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

/* How long ago @t was at @now: 0 for a @t ahead of the coarse clock (the daemon and the tests
 * write times read from the fine one). */
static __always_inline __u64 sl_age(__u64 now, __u64 t)
{
	return now > t ? now - t : 0;
}

/* Helpers return a reason, or CONTINUE when the caller should go on. */
#define CONTINUE (-1)

#ifndef offsetof
#define offsetof(t, m) __builtin_offsetof(t, m)
#endif

/* Offsets of the IPv4 fields we rewrite (no VLAN: a pod veth carries untagged frames). */
#define IP_OFF         ETH_HLEN
#define IP_CSUM_OFF    (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SADDR_OFF   (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF   (ETH_HLEN + offsetof(struct iphdr, daddr))

/* What the parser learnt of one packet; everything in network order but tcp_flags. */
struct packet {
	__u32  len;             /* frame length as received: what the counters count */
	__u32  l4_off;          /* from the start of the frame; honours IP options */
	__u32  ip_end;          /* where the IP packet ends in the frame (padding may follow) */
	__be32 saddr;
	__be32 daddr;
	__be16 sport;           /* 0 for a later fragment */
	__be16 dport;
	__be16 ip_id;
	__u8   proto;
	__u8   tcp_flags;       /* byte 13 of the TCP header */
	__u8   ihl;             /* IP header length in 32-bit words */
	__u8   frag;            /* FRAG_* */
	__u8   redirect_back;   /* send out of the interface it came in on (MACs swapped) */
	__u8   redirect_ingress; /* with redirect_back: into the interface instead of out of it */
	__u8   redirect_neigh;  /* out of this interface to the next hop of its (new) destination */
	__u8   pad[3];
};

enum frag_kind {
	FRAG_NONE  = 0, /* a whole packet */
	FRAG_FIRST = 1, /* offset 0, more to come: carries the L4 header */
	FRAG_LATER = 2, /* offset > 0: no L4 header */
};

static __always_inline int is_tcp_syn(const struct packet *pkt)
{
	return pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN;
}

static __always_inline void counter_add(void *map, __u32 index, __u32 bytes)
{
	struct counter *c = bpf_map_lookup_elem(map, &index);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

/* What else a service's forward packet counts as (struct svc_stats). */
enum svc_path {
	SVC_POD       = 0, /* a pod client's: packets and bytes only */
	SVC_LOCAL     = 1, /* external, delivered to a local backend */
	SVC_FORWARDED = 2, /* external, encapsulated to a backend's node */
	SVC_DECAP     = 3, /* an ingress node's request served here */
};

static __always_inline void svc_account(__u32 id, __u32 bytes, enum svc_path path)
{
	struct svc_stats *s = bpf_map_lookup_elem(&sl_svc_v2, &id);

	if (!s)
		return;
	s->packets++;
	s->bytes += bytes;
	if (path == SVC_LOCAL)
		s->local++;
	else if (path == SVC_FORWARDED)
		s->forwarded++;
	else if (path == SVC_DECAP)
		s->decapsulated++;
}

/* The per-CPU scratch flow (see struct scratch), zeroed. */
static __always_inline struct ct_value *scratch_flow(void)
{
	__u32 zero = 0;
	struct scratch *s = bpf_map_lookup_elem(&sl_scratch_v1, &zero);

	if (!s)
		return 0;
	__builtin_memset(&s->flow, 0, sizeof(s->flow));
	return &s->flow;
}

static __always_inline void ct_event(__u32 ev, __u32 n)
{
	struct counter *c = bpf_map_lookup_elem(&sl_ctev_v1, &ev);

	if (c)
		c->packets += n;
}

/* Swap Ethernet source and destination: the frame goes back where it came from. */
static __always_inline int swap_macs(struct __sk_buff *skb)
{
	__u8 macs[2 * ETH_ALEN];
	__u8 swapped[2 * ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, macs, sizeof(macs)) < 0)
		return -1;
	__builtin_memcpy(swapped, macs + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(swapped + ETH_ALEN, macs, ETH_ALEN);
	return bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0);
}

/* The one exit: count the outcome (with the length the packet arrived with, not what a reject
 * turned it into), then pass, drop or bounce the packet. */
static __always_inline int finish(struct __sk_buff *skb, const struct packet *pkt, int reason)
{
	counter_add(&sl_rsn_v2, reason, pkt->len);
	if (reason >= REASON_FIRST_DROP)
		return TC_ACT_SHOT;
	if (pkt->redirect_back) {
		if (swap_macs(skb) < 0) {
			counter_add(&sl_rsn_v2, REASON_DROP_REWRITE, pkt->len);
			return TC_ACT_SHOT;
		}
		return bpf_redirect(skb->ifindex, pkt->redirect_ingress ? BPF_F_INGRESS : 0);
	}
	if (pkt->redirect_neigh)
		return bpf_redirect_neigh(skb->ifindex, 0, 0, 0);
	return TC_ACT_OK;
}

#endif
