/* ipmasq-legacy eBPF datapath: source NAT (masquerade) on tc (clsact).
 *
 * Four programs. Two are attached by ipmasq_legacy/backends/ebpf/ to every interface
 * that matches `egress-masquerade-interfaces` (ports of a bridge or bond excepted):
 *
 *   ipmq_egress   tc egress:  the decision (README "The decision") for a flow's first
 *                             packet, then source NAT of every packet of a translated
 *                             TCP, UDP or ICMP echo flow;
 *   ipmq_ingress  tc ingress: replies (and ICMP errors about translated flows) are
 *                             translated back before netfilter sees them.
 *
 * The third, ipmq_nf, is a socket filter that an iptables rule asks (`-m bpf
 * --object-pinned`, nat POSTROUTING, `-j MASQUERADE`): it says yes for what the tc
 * programs do not translate but the decision masquerades: every protocol but TCP, UDP
 * and ICMP echo (SCTP among them: netfilter rewrites its CRC32c), and every packet
 * leaving a matching interface the tc programs are not attached to yet (a link that
 * just appeared). Conntrack then keeps such a flow's NAT; the tc programs pass it.
 * A fourth, ipmq_guard, asked by a mangle rule, drops packets of flows the tc programs
 * translated that leave a link they are not on (conntrack would let them out untranslated).
 *
 * Only forwarded packets are ever masqueraded (skb->ingress_ifindex != 0). The node's
 * own TCP and UDP flows that use a port we hand out reserve their reply tuple, and a
 * node flow whose reply tuple a pod's translation already holds gets another port (what
 * netfilter's NAT does to keep tuples unique), so node sockets never lose replies to
 * a pod. A forwarded packet whose source already is an address of the node was
 * masqueraded by netfilter (ipmq_nf, a backend switch, another tool): left alone.
 * Decision 1 and the port ranges live in `ipmq_cfg`, decision 2 is the set of
 * interfaces with the programs attached (an entry in `ipmq_ifaces` with IF_ATTACHED,
 * which also holds the address to translate to), 3 is `ipmq_src4/6`, 4 is
 * `ipmq_local4/6`, 5 is `ipmq_exempt4/6`.
 *
 * A config change is atomic: the loader writes the next generation of `ipmq_cfg` and of
 * the LPM tries (the generation is the first byte of every trie key), then flips
 * `ipmq_ctl.gen`. A packet reads the generation once.
 *
 * NAT state: `ipmq_nat_fwd` (original tuple -> translated address and port) and
 * `ipmq_nat_rev` (reply tuple -> original address and port), both LRU hashes shared by
 * both families (the key carries the family). A port is claimed by inserting the reply
 * tuple into ipmq_nat_rev with BPF_NOEXIST, so two CPUs never hand out the same one.
 *
 * Return codes: TC_ACT_UNSPEC ("next filter, else pass") everywhere, so filters after
 * ours still run; TC_ACT_SHOT only when no port is left (counted). The tc programs
 * never drop for want of an address: an out-interface without an address of the family
 * (as `ipmq_ifaces` says) is left to netfilter's MASQUERADE by ipmq_nf.
 *
 * Build: clang -O2 -g -target bpf -I/usr/include/$(uname -m)-linux-gnu -c masq.c -o masq.o
 */
/* Debian 11's linux/stddef.h defines __always_inline as plain __inline__ (libbpf 0.3's
 * bpf_helpers.h keeps it), which does not force inlining, and a BPF call takes at most
 * five arguments: force it, as newer headers do (both define it only if undefined). */
#define __always_inline inline __attribute__((always_inline))
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef NULL
#define NULL ((void *)0)
#endif

#define MAX_RETRIES 64 /* the verifier walks every iteration: ~80k instructions at 64 */
#define PORTS 65536
#define REFRESH_NS 1000000000ULL /* refresh `seen` and re-check the pair at most once a second */

/* cfg.flags */
#define F_V4 0x01          /* masquerade IPv4 (decision 1) */
#define F_V6 0x02          /* masquerade IPv6 */
#define F_ANY_SRC4 0x04    /* no IPv4 pod CIDR: any source (decision 3) */
#define F_ANY_SRC6 0x08
#define F_RANDOM 0x10      /* iptables-random-fully: never keep the original port */
#define F_DRAIN 0x20       /* another backend took over: no new flows, keep the old ones */

/* iface.flags */
#define IF_HAS4 0x01
#define IF_HAS6 0x02
#define IF_DRAIN 0x04      /* no longer matched: translate existing flows only */
#define IF_ATTACHED 0x08   /* both tc programs are on it: ipmq_nf leaves TCP/UDP/echo to them */

/* nat_val.flags */
#define N_FOREIGN 0x01     /* reply tuple reserved for a flow netfilter translated */
#define N_CLOSED 0x02      /* TCP FIN or RST seen */
#define N_NODE 0x04        /* with N_FOREIGN: reply tuple of a flow of the node's own sockets */

/* ipmq_stats slots (per CPU) */
enum {
	S_NEW_FLOWS = 0,   /* flows translated */
	S_EXHAUSTED = 1,   /* packets dropped: no free port after the retries */
	S_NO_ADDR = 2,     /* new flows left to netfilter: the out-interface had no address of the family */
	S_REPLIES = 3,     /* reply packets translated back */
	S_ICMP_ERR = 4,    /* ICMP errors about translated flows rewritten (both ways) */
	S_FRAGS = 5,       /* non-first fragments translated */
	S_FRAG_MISS = 6,   /* non-first fragments of unknown flows (passed as they are) */
	S_FOREIGN = 7,     /* reply tuples reserved for netfilter-translated flows */
	S_RETRIES = 8,     /* ports tried that were taken */
	S_FAILED = 9,      /* packets dropped: a rewrite failed (should never happen) */
	S_NODE_REMAP = 10, /* node flows given another port: a pod's translation held theirs */
	S_SLOTS = 16,
};

struct cfg {
	__u32 flags;
	__u32 retries;           /* <= MAX_RETRIES */
	__u32 total;             /* how many translated source ports (ipmq_ports) */
	__u32 ports_crc;         /* for the loader: crc32 of the port list */
	__u8 tries_sha256[32];   /* for the loader: what this generation's tries hold */
};

struct ctl {
	__u32 gen; /* 0 or 1: the live generation of ipmq_cfg and the tries */
};

struct iface {
	__u32 addr4;       /* network order */
	__u8 addr6[16];
	__u32 flags;
	__u32 l2len;       /* 14 on Ethernet, 0 on L3 devices */
};

struct lpm4 {
	__u32 prefixlen;   /* 8 (the generation byte) + the prefix length */
	__u8 gen;
	__u8 addr[4];
} __attribute__((packed));

struct lpm6 {
	__u32 prefixlen;
	__u8 gen;
	__u8 addr[16];
} __attribute__((packed));

struct nat_key {
	__u8 saddr[16];    /* IPv4: the address in the last 4 bytes */
	__u8 daddr[16];
	__be16 sport;      /* ICMP echo: the identifier, in both */
	__be16 dport;
	__u8 proto;
	__u8 family;       /* 4 or 6 */
	__u8 pad[2];
};

struct nat_val {
	__u8 addr[16];
	__be16 port;
	__u16 flags;
	__u32 ifindex;     /* out-interface of the flow (fwd entries) */
	__u64 seen;        /* bpf_ktime_get_ns() of the last refresh */
};

struct frag_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 id;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

struct frag_val {
	__be16 sport;
	__be16 dport;
};

struct ifstat_key {
	__u32 ifindex;
	__u32 family;
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

_Static_assert(sizeof(struct cfg) == 48, "cfg layout");
_Static_assert(sizeof(struct lpm4) == 9, "lpm4 layout");
_Static_assert(sizeof(struct lpm6) == 21, "lpm6 layout");
_Static_assert(sizeof(struct iface) == 28, "iface layout");
_Static_assert(sizeof(struct nat_key) == 40, "nat_key layout");
_Static_assert(sizeof(struct nat_val) == 32, "nat_val layout");
_Static_assert(sizeof(struct frag_key) == 40, "frag_key layout");

/* Sizes of the NAT maps are set by the loader (rules/ebpf.yaml); these are defaults. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct cfg);
	__uint(max_entries, 2);
} ipmq_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ctl);
	__uint(max_entries, 1);
} ipmq_ctl SEC(".maps");

/* The translated source ports of each generation, as two tables: gen*65536 + i -> the
 * i-th port (i < cfg.total), and gen*65536 + port -> i + 1 (0: not a translated port). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 2 * PORTS);
} ipmq_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 2 * PORTS);
} ipmq_portidx SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct iface);
	__uint(max_entries, 1024);
} ipmq_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u8);
	__uint(max_entries, 4096);
} ipmq_local4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct { __u8 a[16]; });
	__type(value, __u8);
	__uint(max_entries, 4096);
} ipmq_local6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lpm4);
	__type(value, __u8);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ipmq_exempt4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lpm6);
	__type(value, __u8);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ipmq_exempt6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lpm4);
	__type(value, __u8);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ipmq_src4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lpm6);
	__type(value, __u8);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ipmq_src6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct nat_key);
	__type(value, struct nat_val);
	__uint(max_entries, 65536);
} ipmq_nat_fwd SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct nat_key);
	__type(value, struct nat_val);
	__uint(max_entries, 65536);
} ipmq_nat_rev SEC(".maps");

/* UDP (and other handshake-less) flows seen entering the node through an attached
 * interface, by their tuple as they entered: a packet leaving with the reverse tuple is
 * a reply, never a new flow to masquerade (what conntrack tells netfilter). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct nat_key);
	__type(value, __u8);
	__uint(max_entries, 65536);
} ipmq_pass SEC(".maps");

/* Connections that entered the node addressed to it (published ports, NodePorts), by
 * the client's end (address, port, protocol; destination fields zero): DNAT keeps that
 * end, so their packets leaving towards a container are known and never masqueraded
 * (not pod egress), as the netfilter backends' conntrack mark tells them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct nat_key);
	__type(value, __u8);
	__uint(max_entries, 65536);
} ipmq_inbound SEC(".maps");

/* Ports of fragmented datagrams, by (source, destination, IP id, protocol). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_val);
	__uint(max_entries, 8192);
} ipmq_frag SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, S_SLOTS);
} ipmq_stats SEC(".maps");

/* The slow path of a new flow works on a copy of its context here, so that the many
 * ways of parsing a packet reach the port search in the same verifier state. */
struct scratch {
	struct pkt_copy {
		__u8 raw[72];
	} p;
	struct nat_key key;
	struct nat_val val;
	struct nat_val rval;
	__u32 gen;
	__u32 ifindex;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct scratch);
	__uint(max_entries, 1);
} ipmq_scratch SEC(".maps");

/* For the loader only (the programs never read them): the sha256 of the object the
 * pinned programs came from, and the links whose clsact qdisc the loader added. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct { __u8 sha256[32]; });
	__uint(max_entries, 1);
} ipmq_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 4096);
} ipmq_owned SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct ifstat_key);
	__type(value, struct counter);
	__uint(max_entries, 2048);
} ipmq_ifstats SEC(".maps");

/* ---------------------------------------------------------------- packet parsing */

#define IPPROTO_ICMPV6_ 58

struct pkt {
	__u32 l3off;
	__u32 l4off;       /* 0 for a non-first fragment */
	__u32 len;         /* skb->len */
	__u8 family;
	__u8 proto;
	__u8 frag;         /* 0 none, 1 first fragment, 2 later fragment */
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 has_ports;    /* sport/dport valid (TCP, UDP, ICMP echo) */
	__u8 pad[2];
	__u32 frag_id;
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
};

static __always_inline void stat_add(__u32 slot, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&ipmq_stats, &slot);
	if (v)
		*v += n;
}

static __always_inline void stat_inc(__u32 slot)
{
	stat_add(slot, 1);
}


static __always_inline int is_echo_request(__u8 family, __u8 type)
{
	return family == 4 ? type == 8 : type == 128;
}

static __always_inline int is_echo_reply(__u8 family, __u8 type)
{
	return family == 4 ? type == 0 : type == 129;
}

static __always_inline int is_icmp_error(__u8 family, __u8 type)
{
	if (family == 4)
		return type == 3 || type == 4 || type == 11 || type == 12;
	return type >= 1 && type <= 4;
}

/* Ports (or the echo id) of the L4 header at `off`. Returns 0 when read. */
static __always_inline int read_ports(struct __sk_buff *skb, __u32 off, __u8 family, __u8 proto,
				      struct pkt *p)
{
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		__be16 ports[2];
		if (bpf_skb_load_bytes(skb, off, ports, 4) < 0)
			return -1;
		p->sport = ports[0];
		p->dport = ports[1];
		p->has_ports = 1;
		if (proto == IPPROTO_TCP) {
			__u8 flags;
			if (bpf_skb_load_bytes(skb, off + 13, &flags, 1) < 0)
				return -1;
			p->tcp_flags = flags;
		}
		return 0;
	}
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6_) {
		__u8 hdr[8];
		if (bpf_skb_load_bytes(skb, off, hdr, 8) < 0)
			return -1;
		p->icmp_type = hdr[0];
		if (is_echo_request(family, hdr[0]) || is_echo_reply(family, hdr[0])) {
			__be16 id = *(__be16 *)&hdr[4];
			p->sport = id;
			p->dport = id;
			p->has_ports = 1;
		}
		return 0;
	}
	return 0; /* another protocol: addresses only */
}

static __always_inline int parse(struct __sk_buff *skb, __u32 l3off, struct pkt *p)
{
	__builtin_memset(p, 0, sizeof(*p));
	p->l3off = l3off;
	p->len = skb->len;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u8 h[20];
		if (bpf_skb_load_bytes(skb, l3off, h, 20) < 0)
			return -1;
		if ((h[0] >> 4) != 4)
			return -1;
		__u32 ihl = (h[0] & 0x0f) * 4;
		if (ihl < 20)
			return -1;
		p->family = 4;
		p->proto = h[9];
		__builtin_memcpy(&p->saddr[12], &h[12], 4);
		__builtin_memcpy(&p->daddr[12], &h[16], 4);
		__u16 frag_off = ((__u16)h[6] << 8) | h[7];
		p->frag_id = ((__u32)h[4] << 8) | h[5];
		if (frag_off & 0x1fff)
			p->frag = 2;
		else if (frag_off & 0x2000)
			p->frag = 1;
		if (p->frag == 2)
			return 0;
		p->l4off = l3off + ihl;
		return read_ports(skb, p->l4off, 4, p->proto, p);
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		__u8 h[40];
		if (bpf_skb_load_bytes(skb, l3off, h, 40) < 0)
			return -1;
		if ((h[0] >> 4) != 6)
			return -1;
		p->family = 6;
		__builtin_memcpy(p->saddr, &h[8], 16);
		__builtin_memcpy(p->daddr, &h[24], 16);
		__u8 next = h[6];
		__u32 off = l3off + 40;
		/* Hop-by-hop, routing, destination options and fragment headers. */
#pragma clang loop unroll(full)
		for (int i = 0; i < 4; i++) {
			if (next == 0 || next == 43 || next == 60) {
				__u8 ext[2];
				if (bpf_skb_load_bytes(skb, off, ext, 2) < 0)
					return -1;
				next = ext[0];
				off += ((__u32)ext[1] + 1) * 8;
			} else if (next == 44) {
				__u8 fh[8];
				if (bpf_skb_load_bytes(skb, off, fh, 8) < 0)
					return -1;
				next = fh[0];
				__u16 fo = ((__u16)fh[2] << 8) | fh[3];
				p->frag_id = ((__u32)fh[4] << 24) | ((__u32)fh[5] << 16) | ((__u32)fh[6] << 8) | fh[7];
				if (fo & 0xfff8)
					p->frag = 2;
				else if (fo & 1)
					p->frag = 1;
				off += 8;
			} else {
				break;
			}
		}
		p->proto = next;
		if (p->frag == 2)
			return 0;
		if (next == 0 || next == 43 || next == 60 || next == 44)
			return -1; /* too many extension headers: leave it */
		p->l4off = off;
		return read_ports(skb, off, 6, next, p);
	}
	return -1;
}

static __always_inline void make_key(struct nat_key *k, const struct pkt *p)
{
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->family = p->family;
	k->pad[0] = 0;
	k->pad[1] = 0;
}

static __always_inline void reverse_key(struct nat_key *r, const struct nat_key *k)
{
	__builtin_memcpy(r->saddr, k->daddr, 16);
	__builtin_memcpy(r->daddr, k->saddr, 16);
	r->sport = k->dport;
	r->dport = k->sport;
	r->proto = k->proto;
	r->family = k->family;
	r->pad[0] = 0;
	r->pad[1] = 0;
}

static __always_inline void make_client_key(struct nat_key *k, const __u8 *addr, __be16 port, __u8 proto,
					    __u8 family)
{
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->saddr, addr, 16);
	k->sport = port;
	k->proto = proto;
	k->family = family;
}

static __always_inline void make_frag_key(struct frag_key *k, const struct pkt *p)
{
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
	k->id = p->frag_id;
	k->proto = p->proto;
	k->family = p->family;
	k->pad[0] = 0;
	k->pad[1] = 0;
}

/* ---------------------------------------------------------------- checksums and rewrites */

static __always_inline __u32 fold32(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return s;
}

/* Accumulate the change of one 16-bit word (RFC 1624: HC' = ~(~HC + ~m + m')). */
static __always_inline __u32 acc16(__u32 acc, __u16 old, __u16 new)
{
	return acc + (__u16)~old + new;
}

static __always_inline __u32 acc_addr(__u32 acc, const __u8 *old, const __u8 *new, __u8 family)
{
	const __u16 *o = (const __u16 *)old;
	const __u16 *n = (const __u16 *)new;
	if (family == 4)
		return acc16(acc16(acc, o[6], n[6]), o[7], n[7]);
#pragma clang loop unroll(full)
	for (int i = 0; i < 8; i++)
		acc = acc16(acc, o[i], n[i]);
	return acc;
}

static __always_inline __u16 csum_apply(__u16 csum, __u32 acc)
{
	return ~fold32((__u16)~csum + fold32(acc));
}

static __always_inline __u32 addr_off(const struct pkt *p, int src)
{
	if (p->family == 4)
		return p->l3off + (src ? 12 : 16);
	return p->l3off + (src ? 8 : 24);
}

/* Rewrite the source (src=1) or destination address, with the IP and L4 checksums. */
static __always_inline int rewrite_addr(struct __sk_buff *skb, struct pkt *p, int src, const __u8 *addr)
{
	__u8 *old = src ? p->saddr : p->daddr;
	__u32 l4csum = 0, l4flags = 0;
	int have_l4 = p->l4off != 0;
	if (have_l4) {
		if (p->proto == IPPROTO_TCP) {
			l4csum = p->l4off + 16;
		} else if (p->proto == IPPROTO_UDP) {
			l4csum = p->l4off + 6;
			l4flags = BPF_F_MARK_MANGLED_0;
		} else if (p->proto == IPPROTO_ICMPV6_) {
			l4csum = p->l4off + 2;
		}
	}
	if (p->family == 4) {
		__be32 from, to;
		__builtin_memcpy(&from, &old[12], 4);
		__builtin_memcpy(&to, &addr[12], 4);
		if (l4csum && bpf_l4_csum_replace(skb, l4csum, from, to, BPF_F_PSEUDO_HDR | l4flags | 4) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, p->l3off + 10, from, to, 4) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off(p, src), &to, 4, 0) < 0)
			return -1;
	} else {
		__u8 n[16];
		__builtin_memcpy(n, addr, 16);
		if (l4csum) {
			__s64 diff = bpf_csum_diff((__be32 *)old, 16, (__be32 *)n, 16, 0);
			if (bpf_l4_csum_replace(skb, l4csum, 0, diff, BPF_F_PSEUDO_HDR | l4flags) < 0)
				return -1;
		}
		if (bpf_skb_store_bytes(skb, addr_off(p, src), n, 16, 0) < 0)
			return -1;
	}
	__builtin_memcpy(old, addr, 16);
	return 0;
}

/* Rewrite the source (src=1) or destination port; for ICMP echo, the identifier. */
static __always_inline int rewrite_port(struct __sk_buff *skb, struct pkt *p, int src, __be16 port)
{
	__be16 old = src ? p->sport : p->dport;
	if (old == port || !p->l4off)
		return 0;
	__u32 off, csum, flags = 2;
	if (p->proto == IPPROTO_TCP) {
		off = p->l4off + (src ? 0 : 2);
		csum = p->l4off + 16;
	} else if (p->proto == IPPROTO_UDP) {
		off = p->l4off + (src ? 0 : 2);
		csum = p->l4off + 6;
		flags |= BPF_F_MARK_MANGLED_0;
	} else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6_) {
		off = p->l4off + 4;
		csum = p->l4off + 2;
	} else {
		return 0;
	}
	if (bpf_l4_csum_replace(skb, csum, old, port, flags) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, off, &port, 2, 0) < 0)
		return -1;
	if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6_) {
		p->sport = port;
		p->dport = port;
	} else if (src) {
		p->sport = port;
	} else {
		p->dport = port;
	}
	return 0;
}

static __always_inline void count_if(struct __sk_buff *skb, __u8 family)
{
	struct ifstat_key k = { .ifindex = skb->ifindex, .family = family };
	struct counter *c = bpf_map_lookup_elem(&ipmq_ifstats, &k);
	if (!c) {
		struct counter zero = {};
		bpf_map_update_elem(&ipmq_ifstats, &k, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&ipmq_ifstats, &k);
		if (!c)
			return;
	}
	c->packets += 1;
	c->bytes += skb->len;
}

/* ---------------------------------------------------------------- lookups for the decision */

static __always_inline int is_local(const struct pkt *p, const __u8 *addr)
{
	if (p->family == 4) {
		__u32 a;
		__builtin_memcpy(&a, &addr[12], 4);
		return bpf_map_lookup_elem(&ipmq_local4, &a) != NULL;
	}
	struct { __u8 a[16]; } k;
	__builtin_memcpy(k.a, addr, 16);
	return bpf_map_lookup_elem(&ipmq_local6, &k) != NULL;
}

static __always_inline int in_trie(void *trie4, void *trie6, __u8 family, __u8 gen, const __u8 *addr)
{
	if (family == 4) {
		struct lpm4 k = { .prefixlen = 40, .gen = gen };
		__builtin_memcpy(k.addr, &addr[12], 4);
		return bpf_map_lookup_elem(trie4, &k) != NULL;
	}
	struct lpm6 k = { .prefixlen = 136, .gen = gen };
	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(trie6, &k) != NULL;
}

/* Spec section 3, conditions 1, 3, 4 and 5 (2 is where the program is attached). */
static __always_inline int must_masquerade(const struct cfg *cfg, __u8 gen, const struct pkt *p)
{
	if (!(cfg->flags & (p->family == 4 ? F_V4 : F_V6)))
		return 0;
	if (!(cfg->flags & (p->family == 4 ? F_ANY_SRC4 : F_ANY_SRC6)) &&
	    !in_trie(&ipmq_src4, &ipmq_src6, p->family, gen, p->saddr))
		return 0;
	if (is_local(p, p->daddr))
		return 0;
	if (in_trie(&ipmq_exempt4, &ipmq_exempt6, p->family, gen, p->daddr))
		return 0;
	return 1;
}

/* ---------------------------------------------------------------- port allocation */

/* Claim a reply tuple for the flow `fwd` translated to `addr`: the original port when it
 * is a translated port and free (unless random-fully), else random ones (taken ports
 * cluster: kept ports are often consecutive, so a linear probe would get stuck), at
 * most cfg->retries tries; a range no larger than that is scanned port by port, so it
 * is used completely. Returns the port (network order) or 0. */
static __always_inline __be16 claim_port(const struct cfg *cfg, __u32 gen, const struct nat_key *fwd,
					 const __u8 *addr, struct nat_val *rval, __u8 has_ports)
{
	struct nat_key rkey;
	__builtin_memcpy(rkey.saddr, fwd->daddr, 16);
	__builtin_memcpy(rkey.daddr, addr, 16);
	rkey.sport = fwd->dport;
	rkey.proto = fwd->proto;
	rkey.family = fwd->family;
	rkey.pad[0] = 0;
	rkey.pad[1] = 0;
	if (!has_ports) {
		rkey.sport = 0;
		rkey.dport = 0;
		return bpf_map_update_elem(&ipmq_nat_rev, &rkey, rval, BPF_NOEXIST) == 0 ? 0xffff : 0;
	}
	__u32 total = cfg->total;
	if (total == 0 || total > PORTS)
		return 0;
	int is_icmp = fwd->proto == IPPROTO_ICMP || fwd->proto == IPPROTO_ICMPV6_;
	__u32 base = (gen & 1) * PORTS;
	__u32 kept = 0; /* index + 1 of the original port */
	if (!(cfg->flags & F_RANDOM)) {
		__u32 k = base + bpf_ntohs(fwd->sport);
		__u32 *ix = bpf_map_lookup_elem(&ipmq_portidx, &k);
		if (ix)
			kept = *ix;
	}
	__u32 retries = cfg->retries;
	if (retries > MAX_RETRIES)
		retries = MAX_RETRIES;
	/* One try for the original port, then the loop: its body has no branch but its
	 * exits, so each verifier walks 64 short iterations whatever the clang (a body that
	 * chose between the kept, scanned and random index cost 6.18's verifier 190k
	 * instructions, and clang 11 merged the exits into a test 5.10 could not bound). */
	__u32 first = 0;
	if (kept && retries) {
		__u32 k = base + ((kept - 1) & (PORTS - 1));
		__u32 *pp = bpf_map_lookup_elem(&ipmq_ports, &k);
		if (pp) {
			__be16 port = bpf_htons((__u16)*pp);
			rkey.dport = port;
			if (is_icmp)
				rkey.sport = port;
			if (bpf_map_update_elem(&ipmq_nat_rev, &rkey, rval, BPF_NOEXIST) == 0)
				return port;
			stat_inc(S_RETRIES);
		}
		first = 1;
	}
	__u32 start = bpf_get_prandom_u32() % total;
	__u32 scan = total <= retries; /* a small range: try every port once */
	for (__u32 i = first; i < MAX_RETRIES; i++) {
		asm volatile("" : "+r"(retries)); /* keep the bound `i < 64` the verifier sees */
		if (i >= retries)
			break;
		/* scan: start + i; else a random index (computed either way: no branch) */
		__u32 idx = (scan * (start + i) + (1 - scan) * bpf_get_prandom_u32()) % total;
		__u32 k = base + (idx & (PORTS - 1));
		__u32 *pp = bpf_map_lookup_elem(&ipmq_ports, &k);
		if (!pp)
			break;
		__be16 port = bpf_htons((__u16)*pp);
		rkey.dport = port;
		rkey.sport = is_icmp ? port : rkey.sport;
		if (bpf_map_update_elem(&ipmq_nat_rev, &rkey, rval, BPF_NOEXIST) == 0)
			return port;
		stat_inc(S_RETRIES);
	}
	return 0;
}

/* ---------------------------------------------------------------- ICMP errors */

/* The packet quoted in an ICMP error: its addresses and ports, and where they are. */
struct inner {
	__u32 l3off;
	__u32 l4off;
	__u32 l4len;       /* bytes of the quoted L4 header present */
	__u8 proto;
	__u8 pad[3];
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
};

static __always_inline int parse_inner(struct __sk_buff *skb, const struct pkt *p, struct inner *in)
{
	__builtin_memset(in, 0, sizeof(*in));
	in->l3off = p->l4off + 8;
	if (p->family == 4) {
		__u8 h[20];
		if (bpf_skb_load_bytes(skb, in->l3off, h, 20) < 0)
			return -1;
		__u32 ihl = (h[0] & 0x0f) * 4;
		if ((h[0] >> 4) != 4 || ihl < 20)
			return -1;
		in->proto = h[9];
		__builtin_memcpy(&in->saddr[12], &h[12], 4);
		__builtin_memcpy(&in->daddr[12], &h[16], 4);
		in->l4off = in->l3off + ihl;
	} else {
		__u8 h[40];
		if (bpf_skb_load_bytes(skb, in->l3off, h, 40) < 0)
			return -1;
		if ((h[0] >> 4) != 6)
			return -1;
		in->proto = h[6];
		__builtin_memcpy(in->saddr, &h[8], 16);
		__builtin_memcpy(in->daddr, &h[24], 16);
		in->l4off = in->l3off + 40;
	}
	if (in->l4off >= p->len)
		return -1;
	in->l4len = p->len - in->l4off;
	__u8 l4[8];
	if (bpf_skb_load_bytes(skb, in->l4off, l4, 8) < 0)
		return -1;
	if (in->proto == IPPROTO_TCP || in->proto == IPPROTO_UDP) {
		in->sport = *(__be16 *)&l4[0];
		in->dport = *(__be16 *)&l4[2];
	} else if (in->proto == IPPROTO_ICMP || in->proto == IPPROTO_ICMPV6_) {
		if (!is_echo_request(p->family, l4[0]) && !is_echo_reply(p->family, l4[0]))
			return -1;
		in->sport = *(__be16 *)&l4[4];
		in->dport = in->sport;
	} else {
		return -1;
	}
	return 0;
}

/* Rewrite the error: the outer address (source on egress, destination on ingress),
 * and in the quoted packet the matching address and port, with the quoted checksums
 * and the ICMP checksum. `outer_src`: which outer address; the quoted packet's
 * opposite one (it travelled the other way) is rewritten. */
static __always_inline int rewrite_icmp_error(struct __sk_buff *skb, struct pkt *p, struct inner *in,
					      int outer_src, const __u8 *addr, __be16 port)
{
	int inner_src = !outer_src;
	__u8 *iold = inner_src ? in->saddr : in->daddr;
	__be16 iold_port = inner_src ? in->sport : in->dport;
	__u32 icmp_acc = 0;
	__u8 n[16];
	__builtin_memcpy(n, addr, 16);

	/* quoted L4 checksum: UDP always quoted; TCP when 18 bytes are; ICMP echo: id only */
	__u32 l4csum_off = 0;
	int pseudo = 0;
	if (in->proto == IPPROTO_UDP) {
		l4csum_off = in->l4off + 6;
		pseudo = 1;
	} else if (in->proto == IPPROTO_TCP && in->l4len >= 18) {
		l4csum_off = in->l4off + 16;
		pseudo = 1;
	} else if (in->proto == IPPROTO_ICMP || in->proto == IPPROTO_ICMPV6_) {
		l4csum_off = in->l4off + 2;
		pseudo = in->proto == IPPROTO_ICMPV6_;
	}
	if (l4csum_off) {
		__u16 c;
		if (bpf_skb_load_bytes(skb, l4csum_off, &c, 2) < 0)
			return -1;
		if (!(in->proto == IPPROTO_UDP && c == 0 && p->family == 4)) {
			__u32 acc = 0;
			if (pseudo)
				acc = acc_addr(acc, iold, n, p->family);
			acc = acc16(acc, iold_port, port);
			__u16 nc = csum_apply(c, acc);
			if (in->proto == IPPROTO_UDP && nc == 0)
				nc = 0xffff;
			icmp_acc = acc16(icmp_acc, c, nc);
			if (bpf_skb_store_bytes(skb, l4csum_off, &nc, 2, 0) < 0)
				return -1;
		}
	}
	/* quoted port (or echo id) */
	__u32 port_off = in->l4off + (in->proto == IPPROTO_TCP || in->proto == IPPROTO_UDP ? (inner_src ? 0 : 2) : 4);
	icmp_acc = acc16(icmp_acc, iold_port, port);
	if (bpf_skb_store_bytes(skb, port_off, &port, 2, 0) < 0)
		return -1;
	/* quoted address, and the quoted IPv4 header checksum */
	icmp_acc = acc_addr(icmp_acc, iold, n, p->family);
	if (p->family == 4) {
		__u16 c;
		if (bpf_skb_load_bytes(skb, in->l3off + 10, &c, 2) < 0)
			return -1;
		__u16 nc = csum_apply(c, acc_addr(0, iold, n, 4));
		icmp_acc = acc16(icmp_acc, c, nc);
		if (bpf_skb_store_bytes(skb, in->l3off + 10, &nc, 2, 0) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, in->l3off + (inner_src ? 12 : 16), &n[12], 4, 0) < 0)
			return -1;
	} else {
		if (bpf_skb_store_bytes(skb, in->l3off + (inner_src ? 8 : 24), n, 16, 0) < 0)
			return -1;
	}
	/* the ICMPv6 checksum also covers the outer addresses (pseudo-header) */
	__u8 *oold = outer_src ? p->saddr : p->daddr;
	if (p->family == 6)
		icmp_acc = acc_addr(icmp_acc, oold, n, 6);
	__u16 ic;
	if (bpf_skb_load_bytes(skb, p->l4off + 2, &ic, 2) < 0)
		return -1;
	__u16 nic = csum_apply(ic, icmp_acc);
	if (bpf_skb_store_bytes(skb, p->l4off + 2, &nic, 2, 0) < 0)
		return -1;
	/* the outer address: IPv4 header checksum only (ICMP has no pseudo-header; for
	 * ICMPv6 it was counted above) */
	if (p->family == 4) {
		__be32 from, to;
		__builtin_memcpy(&from, &oold[12], 4);
		__builtin_memcpy(&to, &n[12], 4);
		if (bpf_l3_csum_replace(skb, p->l3off + 10, from, to, 4) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off(p, outer_src), &to, 4, 0) < 0)
			return -1;
	} else {
		if (bpf_skb_store_bytes(skb, addr_off(p, outer_src), n, 16, 0) < 0)
			return -1;
	}
	stat_inc(S_ICMP_ERR);
	return 0;
}

/* ---------------------------------------------------------------- egress */

static __always_inline void reserve_foreign(const struct pkt *p)
{
	/* netfilter translated this forwarded packet (its source is ours): keep its reply
	 * tuple out of our port allocation, and leave its replies to netfilter. */
	if (!p->has_ports)
		return;
	if ((p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6_) && !is_echo_request(p->family, p->icmp_type))
		return;
	struct nat_key fk, rk;
	make_key(&fk, p);
	reverse_key(&rk, &fk);
	if (bpf_map_lookup_elem(&ipmq_nat_rev, &rk))
		return;
	struct nat_val v = {};
	v.flags = N_FOREIGN;
	v.seen = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&ipmq_nat_rev, &rk, &v, BPF_NOEXIST) == 0)
		stat_inc(S_FOREIGN);
}

/* Translate with an existing or new mapping; `val` holds the translated address/port. */
static __always_inline int snat(struct __sk_buff *skb, struct pkt *p, const struct nat_val *val)
{
	if (p->has_ports && rewrite_port(skb, p, 1, val->port) < 0)
		return -1;
	if (rewrite_addr(skb, p, 1, val->addr) < 0)
		return -1;
	count_if(skb, p->family);
	return 0;
}

static __always_inline int egress_icmp_error(struct __sk_buff *skb, struct pkt *p)
{
	struct inner in;
	if (parse_inner(skb, p, &in) < 0)
		return TC_ACT_UNSPEC;
	/* The quoted packet came to the pod: remote -> pod. Its flow is pod -> remote. */
	struct nat_key k;
	__builtin_memcpy(k.saddr, in.daddr, 16);
	__builtin_memcpy(k.daddr, in.saddr, 16);
	k.sport = in.dport;
	k.dport = in.sport;
	k.proto = in.proto;
	k.family = p->family;
	k.pad[0] = 0;
	k.pad[1] = 0;
	struct nat_val *v = bpf_map_lookup_elem(&ipmq_nat_fwd, &k);
	if (!v)
		return TC_ACT_UNSPEC;
	struct nat_val val = *v;
	rewrite_icmp_error(skb, p, &in, 1, val.addr, val.port);
	return TC_ACT_UNSPEC;
}

/* A new flow to masquerade: claim a port, record both halves, translate. Everything
 * comes from the scratch copy (see struct scratch). */
static __always_inline int new_flow(struct __sk_buff *skb, struct scratch *sc, __u64 now)
{
	__u32 gen = sc->gen & 1;
	struct cfg *cfg = bpf_map_lookup_elem(&ipmq_cfg, &gen);
	if (!cfg)
		return TC_ACT_UNSPEC;
	struct pkt *sp = (struct pkt *)&sc->p;
	__u8 has_ports = sp->has_ports;
	int icmp = sc->key.proto == IPPROTO_ICMP || sc->key.proto == IPPROTO_ICMPV6_;
	__builtin_memset(&sc->rval, 0, sizeof(sc->rval));
	__builtin_memcpy(sc->rval.addr, sc->key.saddr, 16);
	sc->rval.port = sc->key.sport;
	sc->rval.ifindex = sc->ifindex;
	sc->rval.seen = now;
	__be16 port = claim_port(cfg, gen, &sc->key, sc->val.addr, &sc->rval, has_ports);
	if (!port) {
		stat_inc(S_EXHAUSTED);
		return TC_ACT_SHOT;
	}
	sc->val.port = has_ports ? port : 0;
	sc->val.ifindex = sc->ifindex;
	sc->val.seen = now;
	if (bpf_map_update_elem(&ipmq_nat_fwd, &sc->key, &sc->val, BPF_NOEXIST) != 0) {
		/* another CPU translated the same flow first: give our port back, use theirs */
		struct nat_key rk;
		__builtin_memcpy(rk.saddr, sc->key.daddr, 16);
		__builtin_memcpy(rk.daddr, sc->val.addr, 16);
		rk.sport = icmp ? port : sc->key.dport;
		rk.dport = has_ports ? port : 0;
		if (!has_ports)
			rk.sport = 0;
		rk.proto = sc->key.proto;
		rk.family = sc->key.family;
		rk.pad[0] = 0;
		rk.pad[1] = 0;
		bpf_map_delete_elem(&ipmq_nat_rev, &rk);
		struct nat_val *v = bpf_map_lookup_elem(&ipmq_nat_fwd, &sc->key);
		if (!v) {
			stat_inc(S_FAILED);
			return TC_ACT_SHOT;
		}
		sc->val = *v;
	} else {
		stat_inc(S_NEW_FLOWS);
	}
	struct pkt p;
	__builtin_memcpy(&p, sp, sizeof(p));
	if (p.frag == 1) {
		struct frag_key fk;
		make_frag_key(&fk, &p);
		struct frag_val fv = { .sport = sc->key.sport, .dport = sc->key.dport };
		bpf_map_update_elem(&ipmq_frag, &fk, &fv, BPF_ANY);
	}
	struct nat_val val = sc->val;
	if (snat(skb, &p, &val) < 0) {
		stat_inc(S_FAILED);
		return TC_ACT_SHOT;
	}
	return TC_ACT_UNSPEC;
}

/* A packet of the node's own. Its TCP and UDP flows that use a port we hand out (any
 * other port is never handed out: no collision) reserve their reply tuple, so no pod
 * flow is given it; when a pod's translation already holds it (the node socket came
 * second), the node's flow must get another port, as netfilter's NAT gives one to keep
 * tuples unique: returns 1 then. 0: pass (reserved, or translated here already). */
static __always_inline int node_flow(struct __sk_buff *skb, struct pkt *p, __u32 gen, __u64 now)
{
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return 0;
	if (!is_local(p, p->saddr))
		return 0;
	__u32 k = (gen & 1) * PORTS + bpf_ntohs(p->sport);
	__u32 *ix = bpf_map_lookup_elem(&ipmq_portidx, &k);
	if (!ix || !*ix)
		return 0;
	struct nat_key key, rk;
	make_key(&key, p);
	struct nat_val *v = bpf_map_lookup_elem(&ipmq_nat_fwd, &key);
	if (v) { /* given another port before */
		struct nat_val val = *v;
		if (now - val.seen > REFRESH_NS)
			v->seen = now;
		snat(skb, p, &val);
		return 0;
	}
	reverse_key(&rk, &key);
	struct nat_val *r = bpf_map_lookup_elem(&ipmq_nat_rev, &rk);
	if (!r) {
		struct nat_val nv = {};
		nv.flags = N_FOREIGN | N_NODE;
		nv.seen = now;
		bpf_map_update_elem(&ipmq_nat_rev, &rk, &nv, BPF_NOEXIST);
		return 0;
	}
	if (r->flags & N_FOREIGN) {
		if (now - r->seen > REFRESH_NS)
			r->seen = now;
		return 0;
	}
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & 0x12) != 0x02)
		return 0; /* only a connection's first packet can take another port */
	return 1;
}

/* The forwarded path before a new flow: translate a known flow, or tell a new one to
 * masquerade (returns 1; 0: done, pass). */
static __always_inline int forwarded(struct __sk_buff *skb, struct pkt *p, const struct nat_key *key,
				     struct cfg *cfg, __u32 gen, struct iface *ifc, __u64 now)
{
	if (is_local(p, p->saddr)) {
		reserve_foreign(p);
		return 0;
	}
	int icmp = p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6_;
	if (!icmp && p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return 0; /* ipmq_nf hands it to netfilter (SCTP, GRE, ...) */
	if (icmp && !p->has_ports)
		return 0; /* other ICMP messages are not flows (errors: see ipmq_egress) */
	if (icmp && !is_echo_request(p->family, p->icmp_type))
		return 0; /* echo replies leaving are replies, never new flows */

	struct nat_val *v = bpf_map_lookup_elem(&ipmq_nat_fwd, key);
	if (v) {
		struct nat_val val = *v;
		if (now - val.seen > REFRESH_NS) {
			v->seen = now;
			/* the LRU may have evicted the reply half: put it back */
			struct nat_key rk;
			__builtin_memcpy(rk.saddr, key->daddr, 16);
			__builtin_memcpy(rk.daddr, val.addr, 16);
			rk.sport = key->dport;
			rk.dport = val.port;
			rk.proto = key->proto;
			rk.family = key->family;
			rk.pad[0] = 0;
			rk.pad[1] = 0;
			if (icmp)
				rk.sport = val.port;
			struct nat_val *r = bpf_map_lookup_elem(&ipmq_nat_rev, &rk);
			if (r) {
				r->seen = now;
			} else {
				struct nat_val rv = {};
				__builtin_memcpy(rv.addr, key->saddr, 16);
				rv.port = key->sport;
				rv.ifindex = val.ifindex;
				rv.seen = now;
				bpf_map_update_elem(&ipmq_nat_rev, &rk, &rv, BPF_NOEXIST);
			}
		}
		if (p->proto == IPPROTO_TCP && (p->tcp_flags & 0x05))
			v->flags |= N_CLOSED;
		if (p->frag == 1) {
			struct frag_key fk;
			make_frag_key(&fk, p);
			struct frag_val fv = { .sport = key->sport, .dport = key->dport };
			bpf_map_update_elem(&ipmq_frag, &fk, &fv, BPF_ANY);
		}
		snat(skb, p, &val);
		return 0;
	}

	/* A new flow? TCP starts with a SYN; a UDP packet whose reverse flow we translated,
	 * or saw entering the node, is a reply. */
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & 0x12) != 0x02)
		return 0;
	if (p->proto == IPPROTO_UDP) {
		struct nat_key rk;
		reverse_key(&rk, key);
		if (bpf_map_lookup_elem(&ipmq_nat_fwd, &rk) || bpf_map_lookup_elem(&ipmq_pass, &rk))
			return 0;
	}
	if ((cfg->flags & F_DRAIN) || (ifc->flags & IF_DRAIN))
		return 0;
	struct nat_key ck;
	make_client_key(&ck, p->saddr, p->sport, p->proto, p->family);
	if (bpf_map_lookup_elem(&ipmq_inbound, &ck))
		return 0; /* a connection to the node, DNATed on: not pod egress */
	if (!must_masquerade(cfg, gen, p))
		return 0;
	if (!(ifc->flags & (p->family == 4 ? IF_HAS4 : IF_HAS6))) {
		stat_inc(S_NO_ADDR); /* no address of the family: ipmq_nf left it to MASQUERADE */
		return 0;
	}
	return 1;
}

SEC("tc/egress")
int ipmq_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct ctl *ctl = bpf_map_lookup_elem(&ipmq_ctl, &zero);
	if (!ctl)
		return TC_ACT_UNSPEC;
	__u32 gen = ctl->gen & 1;
	struct cfg *cfg = bpf_map_lookup_elem(&ipmq_cfg, &gen);
	__u32 ifindex = skb->ifindex;
	struct iface *ifc = bpf_map_lookup_elem(&ipmq_ifaces, &ifindex);
	if (!cfg || !ifc)
		return TC_ACT_UNSPEC;
	struct pkt p;
	if (parse(skb, ifc->l2len, &p) < 0)
		return TC_ACT_UNSPEC;
	__u64 now = bpf_ktime_get_ns();
	int node = skb->ingress_ifindex == 0;

	if (p.frag == 2) {
		if (node)
			return TC_ACT_UNSPEC;
		struct frag_key fk;
		make_frag_key(&fk, &p);
		struct frag_val *fv = bpf_map_lookup_elem(&ipmq_frag, &fk);
		if (!fv) {
			stat_inc(S_FRAG_MISS);
			return TC_ACT_UNSPEC;
		}
		p.sport = fv->sport;
		p.dport = fv->dport;
		p.has_ports = fv->sport || fv->dport;
		struct nat_key k;
		make_key(&k, &p);
		struct nat_val *v = bpf_map_lookup_elem(&ipmq_nat_fwd, &k);
		if (v) {
			struct nat_val val = *v;
			p.has_ports = 0; /* no L4 header in this fragment */
			if (rewrite_addr(skb, &p, 1, val.addr) == 0) {
				stat_inc(S_FRAGS);
				count_if(skb, p.family);
			}
		}
		return TC_ACT_UNSPEC;
	}
	if (!node && (p.proto == IPPROTO_ICMP || p.proto == IPPROTO_ICMPV6_) && !p.has_ports &&
	    is_icmp_error(p.family, p.icmp_type))
		return egress_icmp_error(skb, &p);

	struct nat_key key;
	make_key(&key, &p);
	if (node ? !node_flow(skb, &p, gen, now) : !forwarded(skb, &p, &key, cfg, gen, ifc, now))
		return TC_ACT_UNSPEC;

	/* A new flow: a pod's, translated to the out-interface's address; or a node flow
	 * given another port on its own address. */
	__u32 zero32 = 0;
	struct scratch *sc = bpf_map_lookup_elem(&ipmq_scratch, &zero32);
	if (!sc)
		return TC_ACT_UNSPEC;
	__builtin_memset(&sc->val, 0, sizeof(sc->val));
	if (node)
		__builtin_memcpy(sc->val.addr, p.saddr, 16);
	else if (p.family == 4)
		__builtin_memcpy(&sc->val.addr[12], &ifc->addr4, 4);
	else
		__builtin_memcpy(sc->val.addr, ifc->addr6, 16);
	_Static_assert(sizeof(struct pkt) <= sizeof(struct pkt_copy), "scratch pkt");
	__builtin_memcpy(&sc->p, &p, sizeof(p));
	sc->key = key;
	sc->gen = gen;
	sc->ifindex = ifindex;
	if (node)
		stat_inc(S_NODE_REMAP);
	return new_flow(skb, sc, now);
}

/* ---------------------------------------------------------------- netfilter's part */

/* Asked by the iptables rule of the netfilter assist (nat POSTROUTING, the first packet
 * of each connection; skb->data is the network header): 1 = masquerade it. */
SEC("socket")
int ipmq_nf(struct __sk_buff *skb)
{
	if (skb->ingress_ifindex == 0)
		return 0; /* the node's own traffic: never masqueraded */
	__u32 zero = 0;
	struct ctl *ctl = bpf_map_lookup_elem(&ipmq_ctl, &zero);
	if (!ctl)
		return 0;
	__u32 gen = ctl->gen & 1;
	struct cfg *cfg = bpf_map_lookup_elem(&ipmq_cfg, &gen);
	if (!cfg || (cfg->flags & F_DRAIN))
		return 0;
	struct pkt p;
	if (parse(skb, 0, &p) < 0)
		return 0;
	__u32 ifindex = skb->ifindex;
	struct iface *ifc = bpf_map_lookup_elem(&ipmq_ifaces, &ifindex);
	/* The tc programs translate TCP, UDP and echo on a link they are on that has an
	 * address of the family (as the map says). A link without one (as the map says: it
	 * may have got one since the last sync, or a new IPv6 address may still be
	 * tentative) is left to MASQUERADE, which takes the address at the packet and drops
	 * it when there is none, as the netfilter backends do: never a pod's address out. */
	if (ifc && (ifc->flags & IF_ATTACHED) && (ifc->flags & (p.family == 4 ? IF_HAS4 : IF_HAS6))) {
		if (ifc->flags & IF_DRAIN)
			return 0;
		int echo = (p.proto == IPPROTO_ICMP || p.proto == IPPROTO_ICMPV6_) && p.has_ports;
		if (p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP || echo)
			return 0;
	}
	if (is_local(&p, p.saddr))
		return 0;
	return must_masquerade(cfg, gen, &p);
}

/* ---------------------------------------------------------------- ingress */

static __always_inline int ingress_icmp_error(struct __sk_buff *skb, struct pkt *p)
{
	struct inner in;
	if (parse_inner(skb, p, &in) < 0)
		return TC_ACT_UNSPEC;
	/* The quoted packet is one we translated: node -> remote. Its reply tuple: */
	struct nat_key rk;
	__builtin_memcpy(rk.saddr, in.daddr, 16);
	__builtin_memcpy(rk.daddr, in.saddr, 16);
	rk.sport = in.dport;
	rk.dport = in.sport;
	rk.proto = in.proto;
	rk.family = p->family;
	rk.pad[0] = 0;
	rk.pad[1] = 0;
	struct nat_val *v = bpf_map_lookup_elem(&ipmq_nat_rev, &rk);
	if (!v || (v->flags & N_FOREIGN))
		return TC_ACT_UNSPEC;
	struct nat_val val = *v;
	rewrite_icmp_error(skb, p, &in, 0, val.addr, val.port);
	return TC_ACT_UNSPEC;
}

SEC("tc/ingress")
int ipmq_ingress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct iface *ifc = bpf_map_lookup_elem(&ipmq_ifaces, &ifindex);
	if (!ifc)
		return TC_ACT_UNSPEC;
	struct pkt p;
	if (parse(skb, ifc->l2len, &p) < 0)
		return TC_ACT_UNSPEC;
	if (p.frag == 2) {
		struct frag_key fk;
		make_frag_key(&fk, &p);
		struct frag_val *fv = bpf_map_lookup_elem(&ipmq_frag, &fk);
		if (!fv)
			return TC_ACT_UNSPEC;
		p.sport = fv->sport;
		p.dport = fv->dport;
		struct nat_key k;
		make_key(&k, &p);
		struct nat_val *v = bpf_map_lookup_elem(&ipmq_nat_rev, &k);
		if (v && !(v->flags & N_FOREIGN)) {
			struct nat_val val = *v;
			if (rewrite_addr(skb, &p, 0, val.addr) == 0)
				stat_inc(S_FRAGS);
		}
		return TC_ACT_UNSPEC;
	}
	int icmp = p.proto == IPPROTO_ICMP || p.proto == IPPROTO_ICMPV6_;
	if (icmp) {
		if (!p.has_ports) {
			if (is_icmp_error(p.family, p.icmp_type))
				return ingress_icmp_error(skb, &p);
			return TC_ACT_UNSPEC;
		}
		if (!is_echo_reply(p.family, p.icmp_type))
			return TC_ACT_UNSPEC;
	}
	struct nat_key key;
	make_key(&key, &p);
	struct nat_val *v = bpf_map_lookup_elem(&ipmq_nat_rev, &key);
	if (!v && (p.proto == IPPROTO_UDP || (p.proto == IPPROTO_TCP && (p.tcp_flags & 0x12) == 0x02)) &&
	    is_local(&p, p.daddr)) {
		/* a new connection to the node: if it is DNATed on, its packets towards a
		 * container are not pod egress (ipmq_inbound) */
		struct nat_key ck;
		make_client_key(&ck, p.saddr, p.sport, p.proto, p.family);
		__u8 one = 1;
		bpf_map_update_elem(&ipmq_inbound, &ck, &one, BPF_NOEXIST);
	}
	if (!v) {
		if (!icmp && p.proto != IPPROTO_TCP && !is_local(&p, p.daddr) &&
		    !bpf_map_lookup_elem(&ipmq_pass, &key)) {
			__u8 one = 1;
			bpf_map_update_elem(&ipmq_pass, &key, &one, BPF_NOEXIST);
		}
		return TC_ACT_UNSPEC;
	}
	if (v->flags & N_FOREIGN)
		return TC_ACT_UNSPEC; /* netfilter's: conntrack translates it */
	struct nat_val val = *v;
	__u64 now = bpf_ktime_get_ns();
	if (now - val.seen > REFRESH_NS) {
		v->seen = now;
		/* put the original half back if the LRU evicted it */
		struct nat_key fk;
		__builtin_memcpy(fk.saddr, val.addr, 16);
		__builtin_memcpy(fk.daddr, key.saddr, 16);
		fk.sport = val.port;
		fk.dport = icmp ? val.port : key.sport;
		fk.proto = key.proto;
		fk.family = key.family;
		fk.pad[0] = 0;
		fk.pad[1] = 0;
		if (!p.has_ports) {
			fk.sport = 0;
			fk.dport = 0;
		}
		if (!bpf_map_lookup_elem(&ipmq_nat_fwd, &fk)) {
			struct nat_val fv = {};
			__builtin_memcpy(fv.addr, key.daddr, 16);
			fv.port = p.has_ports ? key.dport : 0;
			fv.ifindex = val.ifindex;
			fv.seen = now;
			bpf_map_update_elem(&ipmq_nat_fwd, &fk, &fv, BPF_NOEXIST);
		}
	}
	if (p.frag == 1) {
		struct frag_key fk;
		make_frag_key(&fk, &p);
		struct frag_val fv = { .sport = p.sport, .dport = p.dport };
		bpf_map_update_elem(&ipmq_frag, &fk, &fv, BPF_ANY);
	}
	if ((p.has_ports && rewrite_port(skb, &p, 0, val.port) < 0) || rewrite_addr(skb, &p, 0, val.addr) < 0) {
		stat_inc(S_FAILED);
		return TC_ACT_SHOT;
	}
	stat_inc(S_REPLIES);
	return TC_ACT_UNSPEC;
}

/* Asked by the assist's mangle POSTROUTING rule (every packet; skb->data is the network
 * header): 1 = drop it. A packet of a flow the tc programs translated, leaving a link
 * they are not on (re-created, or its flow re-routed to a new link): conntrack holds the
 * flow as established and untranslated, so neither NAT hook would see it, and it would
 * leave with the pod's address. Dropped until the programs are on that link (`watch`:
 * milliseconds), then the flow goes on with its translation. */
SEC("socket")
int ipmq_guard(struct __sk_buff *skb)
{
	if (skb->ingress_ifindex == 0)
		return 0;
	__u32 ifindex = skb->ifindex;
	struct iface *ifc = bpf_map_lookup_elem(&ipmq_ifaces, &ifindex);
	if (ifc && (ifc->flags & IF_ATTACHED))
		return 0;
	struct pkt p;
	if (parse(skb, 0, &p) < 0 || !p.has_ports)
		return 0;
	struct nat_key key;
	make_key(&key, &p);
	return bpf_map_lookup_elem(&ipmq_nat_fwd, &key) != NULL;
}

char _license[] SEC("license") = "Dual BSD/GPL";
