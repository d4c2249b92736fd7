/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Source-port translation, as the kernel's NAT does when a new flow's reply tuple is taken: the
 * new flow's client port is rewritten to one from [xlate_port_min, xlate_port_max] whose reply
 * tuple is free, and rewritten back on its replies. Both legs carry CT_F_XLATE.
 */
#ifndef SLUICE_LIB_XLATE_H
#define SLUICE_LIB_XLATE_H

#include "common.h"
#include "conntrack.h"

/* Random picks before giving up (the client's retransmission then tries again). */
#define XLATE_TRIES 8

static __always_inline __be16 xlate_port_pick(void)
{
	__u32 span = (__u32)xlate_port_max - xlate_port_min + 1;

	return bpf_htons(xlate_port_min + bpf_get_prandom_u32() % span);
}

/**
 * xlate_insert_reverse - give the flow whose forward leg is @fk/@fwd a translated client port:
 * sets fwd->nat_sport and CT_F_XLATE and inserts the matching reply leg (its tuple free), built
 * in the caller's @rk/@rev (left holding it).
 * Return: 0, or REASON_DROP_CT_COLLISION when no free port was found.
 */
static __always_inline int xlate_insert_reverse(const struct ct_key *fk, struct ct_value *fwd,
						__u64 now, struct ct_key *rk, struct ct_value *rev)
{
	fwd->flags |= CT_F_XLATE;
	for (int i = 0; i < XLATE_TRIES; i++) {
		fwd->nat_sport = xlate_port_pick();
		ct_inverse(fk, fwd, rk, rev);
		rev->created_ns = rev->last_seen_ns = now;
		rev->seen = 0;
		if (ct_insert(rk, rev, BPF_NOEXIST) == 0)
			return 0;
	}
	return REASON_DROP_CT_COLLISION;
}

#endif
