/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Runtime configuration: read-only globals the daemon sets in .rodata before load. */
#ifndef SLUICE_CONFIG_H
#define SLUICE_CONFIG_H

#include <linux/types.h>
#include <bpf/bpf_endian.h>
#include "consts.h"

/* Source address given to a client that is its own backend (hairpin): the backend must not see its
 * own address as the source, or its reply would never leave the pod. Default 169.254.42.1. */
const volatile __be32 hairpin_addr = bpf_htonl(0xa9fe2a01);

/* A conntrack entry's last_seen_ns is written at most this often: an established flow costs a
 * lookup per packet, not a write. */
const volatile __u64 ct_refresh_ns = 1000000000ULL;

/* Read by no program: carries enum reason into BTF, hence into the Rust skeleton's types (an
 * array map's key must be a plain integer, so the counter map cannot carry it). */
const volatile enum reason reason_btf_anchor = REASON_PASS;

#endif
