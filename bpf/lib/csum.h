/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* One's-complement checksum arithmetic the programs do themselves (the IP header's, a reject's
 * ICMP); L4 checksums of forwarded packets go through the kernel's helpers (offload state). */
#ifndef SLUICE_LIB_CSUM_H
#define SLUICE_LIB_CSUM_H

#include <linux/ip.h>
#include <linux/types.h>

static __always_inline __u32 csum_fold16(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return csum;
}

static __always_inline __sum16 csum_fold32(__u32 csum)
{
	return (__sum16)~csum_fold16(csum);
}

/* One's-complement 32-bit addition (the kernel's csum_add). */
static __always_inline __u32 csum_add32(__u32 a, __u32 b)
{
	__u32 r = a + b;

	return r + (r < a);
}

/* One's-complement incremental update of a 16-bit checksum for a 32-bit field (RFC 1624 eq. 3,
 * as the kernel's csum_replace4): byte-order neutral, the sum is of 16-bit words as stored. */
static __always_inline __sum16 csum_replace4(__sum16 check, __be32 from, __be32 to)
{
	__u32 sum = (__u16)~check;

	sum += (~from & 0xffff) + (~from >> 16) + (to & 0xffff) + (to >> 16);
	return (__sum16)~csum_fold16(sum);
}

/* The checksum of an IP header without options built from scratch (its check field 0). */
static __always_inline __u16 ip_hdr_csum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)sizeof(*ip) / 2; i++)
		sum += w[i];
	return csum_fold32(sum);
}

#endif
