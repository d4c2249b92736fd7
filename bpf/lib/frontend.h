/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Finding a packet's frontend: its exact address (ClusterIP, LoadBalancer IP, external IP), or the
 * NodePort that every node address serves (key address 0). */
#ifndef SLUICE_LIB_FRONTEND_H
#define SLUICE_LIB_FRONTEND_H

#include "common.h"

/* An address of a node of the cluster (this one: NODE_F_SELF in *flags). */
static __always_inline int np_is_node(__be32 addr, __u32 *flags)
{
	struct node_value *n = bpf_map_lookup_elem(&sl_node_v1, &addr);

	if (!n)
		return 0;
	if (flags)
		*flags = n->flags;
	return 1;
}

/* The frontend of a packet: its exact address, else (@wildcard) the NodePort on every node
 * address. */
static __always_inline struct frontend_value *np_frontend(const struct packet *pkt, int wildcard)
{
	struct frontend_key fk = { .addr = pkt->daddr, .port = pkt->dport, .proto = pkt->proto };
	struct frontend_value *fe = bpf_map_lookup_elem(&sl_fe_v2, &fk);

	if (fe || !wildcard)
		return fe;
	fk.addr = 0;
	return bpf_map_lookup_elem(&sl_fe_v2, &fk);
}

#endif
