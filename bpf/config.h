/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Runtime configuration: read-only globals the daemon sets in .rodata before load. */
#ifndef SLUICE_CONFIG_H
#define SLUICE_CONFIG_H

#include <linux/types.h>
#include <bpf/bpf_endian.h>
#include "consts.h"

#define SEC_NS(s) ((__u64)(s) * 1000000000ULL)

/* Source address given to a client that is its own backend (hairpin): the backend must not see its
 * own address as the source, or its reply would never leave the pod. Default 169.254.42.1. */
const volatile __be32 hairpin_addr = bpf_htonl(0xa9fe2a01);

/* A conntrack entry's last_seen_ns is written at most this often: an established flow costs a
 * lookup per packet, not a write. */
const volatile __u64 ct_refresh_ns = 1000000000ULL;

/*
 * Conntrack idle timeouts by state, the same the daemon's GC applies (sluiced --ct-timeout-*):
 * the datapath uses them to decide whether a flow that holds a tuple a new flow needs is still
 * alive. Defaults as kube-proxy sets the kernel's: established 24 h, half-closed 1 h.
 */
const volatile __u64 ct_syn_ns         = SEC_NS(60);    /* TCP, no reply yet */
const volatile __u64 ct_established_ns = SEC_NS(86400); /* TCP, both directions acknowledged */
const volatile __u64 ct_fin_ns         = SEC_NS(3600);  /* TCP, FIN from one side (half-closed) */
const volatile __u64 ct_closed_ns      = SEC_NS(10);    /* TCP, FIN from both sides */
const volatile __u64 ct_rst_ns         = SEC_NS(10);    /* TCP, RST seen */
const volatile __u64 ct_udp_ns         = SEC_NS(30);    /* UDP, one direction only */
const volatile __u64 ct_udp_stream_ns  = SEC_NS(120);   /* UDP, both directions */

/* Translated source ports (reply tuple clashes) come from [xlate_port_min, xlate_port_max]
 * (host order): below Linux's default ip_local_port_range (32768-60999) and the NodePort range
 * (30000-32767), so a client's own ephemeral ports never meet them. */
const volatile __u16 xlate_port_min = 20000;
const volatile __u16 xlate_port_max = 29999;

/* This node's address: the outer source of what it encapsulates (sluiced --node-ip). */
const volatile __be32 node_addr = 0;

/* How external flows to remote backends are answered (sluiced --lb-mode). */
const volatile enum lb_mode lb_mode = LB_MODE_DSR;

/* Node-to-node VXLAN: UDP port (host order; IANA's 4789) and sluice's VNI. */
const volatile __u16 vxlan_port = 4789;
const volatile __u32 vxlan_vni = 0x5c1ce;

/* A remembered first fragment is ignored after this long (Linux's ipfrag_time). */
const volatile __u64 frag_timeout_ns = SEC_NS(30);

/* Read by no program: carries the enums into BTF, hence into the Rust skeleton's types (an
 * array map's key must be a plain integer, so the counter maps cannot carry them). */
const volatile enum reason reason_btf_anchor = REASON_PASS;
const volatile enum ct_event ct_event_btf_anchor = CT_EV_CREATED;
const volatile enum node_flags node_flags_btf_anchor = NODE_F_SELF;
const volatile enum backend_flags backend_flags_btf_anchor = BE_F_LOCAL;

#endif
