/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Attach point: the node's uplink (each --nodeport-iface).
 *   from_net - TC ingress: external frontends (NodePort, LoadBalancer IPs, external IPs) for
 *              clients outside the cluster, and sluice's encapsulation from other nodes.
 *   to_net   - TC egress: replies of external flows this node DNATed.
 * Shares every map with pod_veth (pinned). All logic lives in lib/ (nodeport.h).
 */
#include "lib/common.h"
#include "lib/parse.h"
#include "lib/frag.h"
#include "lib/frontend.h"
#include "lib/nodeport.h"

/* An ingress node's encapsulated packet, decapsulated: a request for an endpoint here, or a
 * tunnelled reply this node (the ingress node) sends on to the client. */
static __always_inline int from_node(struct __sk_buff *skb, struct packet *pkt, __be32 peer,
				     int reply)
{
	int reason;

	if (vxlan_decap(skb) < 0)
		return REASON_DROP_ENCAP;
	__builtin_memset(pkt, 0, sizeof(*pkt));
	reason = parse_packet(skb, pkt);
	if (reason != CONTINUE)
		return reason;
	if (reply) {
		pkt->redirect_neigh = 1;
		return REASON_NP_TUNNEL_REPLY;
	}
	if (pkt->frag == FRAG_LATER) {
		reason = frag_later(skb, pkt, 0);
		return reason == CONTINUE ? REASON_DROP_FRAG_ORPHAN : reason;
	}
	if (pkt->proto != IPPROTO_TCP && pkt->proto != IPPROTO_UDP)
		return REASON_DROP_NO_LOCAL;
	return np_backend(skb, pkt, peer);
}

SEC("tc")
int from_net(struct __sk_buff *skb)
{
	struct packet pkt = {};
	struct frontend_value *fe;
	__u32 node_flags = 0;
	__be32 peer = 0;
	int reason, reply = 0;

	reason = parse_packet(skb, &pkt);
	if (reason != CONTINUE)
		return finish(skb, &pkt, reason);
	if (pkt.frag == FRAG_LATER) {
		reason = np_later_fragment(skb, &pkt, vxlan_vni);
		return finish(skb, &pkt, reason == CONTINUE ? REASON_PASS_FRAGMENT : reason);
	}
	if (vxlan_is_ours(skb, &pkt, &peer, &reply))
		return finish(skb, &pkt, from_node(skb, &pkt, peer, reply));
	if (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP)
		return finish(skb, &pkt, REASON_PASS);
	/* NodePorts on this node's addresses; LoadBalancer and external IPs wherever routed here. */
	fe = np_frontend(&pkt, np_is_node(pkt.daddr, &node_flags) && (node_flags & NODE_F_SELF));
	if (fe && (fe->flags & FE_F_EXTERNAL))
		return finish(skb, &pkt, np_forward(skb, &pkt, fe));
	return finish(skb, &pkt, REASON_PASS);
}

SEC("tc")
int to_net(struct __sk_buff *skb)
{
	struct packet pkt = {};
	int reason;

	reason = parse_packet(skb, &pkt);
	if (reason != CONTINUE)
		return finish(skb, &pkt, reason);
	if (pkt.frag == FRAG_LATER) {
		reason = np_later_fragment(skb, &pkt, vxlan_vni + 1);
		return finish(skb, &pkt, reason == CONTINUE ? REASON_PASS_FRAGMENT : reason);
	}
	if (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP)
		return finish(skb, &pkt, REASON_PASS);
	return finish(skb, &pkt, np_reply(skb, &pkt));
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
