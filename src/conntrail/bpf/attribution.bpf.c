// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * conntrail: process attribution at packet time (the eBPF tier of issue 3).
 *
 * Compiled by conntrail at first use (clang -target bpf, CO-RE against the running kernel's
 * BTF: vmlinux.h from `bpftool btf dump file /sys/kernel/btf/vmlinux format c`) and loaded
 * through libbpf from Python (src/conntrail/kernel/bpf.py, which also decodes the records:
 * keep the layouts below and the struct formats there in step).
 *
 * Hooks
 *   cgroup_skb/egress on the cgroup v2 root      one FLOW record per new locally generated flow
 *     egress      the current task's identity (kernels that let cgroup_skb call
 *                 bpf_get_current_pid_tgid & co, as 6.18 does): the first packet of a
 *                 flow, a TCP SYN from connect() or a datagram from sendmsg(), is sent
 *                 synchronously inside the sender's system call, so `current` is the sender.
 *     egress_sk   the same without those helpers (older kernels): the identity kept in the
 *                 socket's local storage by the process-context hooks below.
 *   cgroup/sock_create, cgroup/connect4/6, cgroup/sendmsg4/6
 *                 process context: remember who created / last connected / last sent to an
 *                 address with each socket (BPF_MAP_TYPE_SK_STORAGE). At egress that tells a
 *                 user socket from a kernel one, and the owner must be the sending task: a
 *                 packet sent from softirq or a timer names a bystander as `current`, which
 *                 F_OWNER_DIFFERS then flags (connect/sendmsg ran in the sender's own call).
 *   tp_btf/sched_process_exec    one EXEC record: pid, ppid, uid/gid, comm, filename, argv.
 *   tp_btf/sched_process_fork    one FORK record per new process (not per thread).
 *
 * Every program that can affect traffic returns 1 (allow): conntrail only observes.
 *
 * "First packet of a new flow": a TCP SYN without ACK; a UDP/UDP-Lite datagram whose tuple
 * this socket has not sent for `idle` (30 s, the UDP conntrack timeout; set in ct_config); an
 * ICMP/ICMPv6 echo request. The same socket's SYN again is never reported (retransmissions).
 *
 * A flow's tuple is the packet as it leaves (after the OUTPUT and POSTROUTING hooks, so after
 * any NAT): it equals the conntrack entry's REPLY tuple reversed, with or without NAT. The
 * connect/sendmsg hooks run before the kernel picks the source port (autobind) and address
 * (routing), so they emit nothing: they key the identity by socket (socket local storage),
 * and the egress program, where the tuple is complete, joins the two through skb->sk. The
 * socket cookie and the netns cookie come along so a consumer can tell sockets and
 * namespaces apart.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

#define REC_FLOW 1
#define REC_EXEC 2
#define REC_FORK 3

#define COMM_LEN 16
#define ARGV_LEN 256
#define FILENAME_LEN 128

/* flow_rec.source: where the identity fields come from */
#define SRC_NONE 0
#define SRC_EGRESS_TASK 1 /* the task sending the packet (current at egress) */
#define SRC_SOCK_HOOK 2   /* the socket's owner record (sock_create/connect/sendmsg) */

/* owner.hook / flow_rec.owner_hook: the hook that last wrote the socket's owner record */
#define HOOK_NONE 0
#define HOOK_SOCK_CREATE 1
#define HOOK_CONNECT 2
#define HOOK_SENDMSG 3

/* flow_rec.flags */
#define F_KTHREAD 0x1       /* the sending task is a kernel thread */
#define F_NO_OWNER 0x2      /* no owner record: kernel socket, or created before attach */
#define F_OWNER_DIFFERS 0x4 /* the owner record names another process than the sender */

/* drops[] slots: records lost because the ring buffer was full */
#define DROP_FLOW 0
#define DROP_EXEC 1
#define DROP_FORK 2
#define DROP_SLOTS 4

/* config[] slots */
#define CFG_IDLE_NS 0
#define CFG_SLOTS 4
#define DEFAULT_IDLE_NS (30ULL * 1000000000ULL) /* nf_conntrack_udp_timeout */

#define PF_KTHREAD 0x00200000
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_ICMPV6 58
#define IPPROTO_UDPLITE 136

struct flow_rec {
	__u8 type; /* REC_FLOW */
	__u8 family;
	__u8 proto;
	__u8 source; /* SRC_* */
	__u8 owner_hook; /* HOOK_* */
	__u8 _pad0[3];
	__u32 flags; /* F_* */
	__u32 netns_ino; /* from the owner record (socket's netns at creation), else 0 */
	__u64 ktime; /* CLOCK_BOOTTIME ns */
	__u64 sock_cookie;
	__u64 netns_cookie;
	__u64 cgroup_id; /* the task's cgroup v2 id */
	__u64 sk_cgroup_id; /* the socket's cgroup v2 id */
	__u32 pid; /* thread id */
	__u32 tgid; /* process id */
	__u32 uid;
	__u32 gid;
	__u16 sport; /* host order; ICMP: echo id */
	__u16 dport; /* host order; ICMP: type << 8 | code */
	__u32 _pad1;
	__u8 saddr[16]; /* IPv4: first 4 bytes */
	__u8 daddr[16];
	char comm[COMM_LEN];
};
_Static_assert(sizeof(struct flow_rec) == 128, "flow_rec layout is shared with bpf.py");

struct exec_rec {
	__u8 type; /* REC_EXEC */
	__u8 _pad0[3];
	__u32 pid; /* tgid */
	__u32 tid;
	__u32 ppid; /* real parent's tgid */
	__u32 uid;
	__u32 gid;
	__u64 ktime;
	__u64 cgroup_id;
	__u32 args_size; /* whole argument area (NUL-separated) */
	__u16 argv_len; /* bytes captured in argv */
	__u16 filename_len; /* bytes captured in filename, without the NUL */
	char comm[COMM_LEN];
	char filename[FILENAME_LEN];
	char argv[ARGV_LEN];
};
_Static_assert(sizeof(struct exec_rec) == 448, "exec_rec layout is shared with bpf.py");

struct fork_rec {
	__u8 type; /* REC_FORK */
	__u8 _pad0[3];
	__u32 pid; /* the new process */
	__u32 ppid; /* the forking process (tgid) */
	__u32 _pad1;
	__u64 ktime;
	char comm[COMM_LEN];
};
_Static_assert(sizeof(struct fork_rec) == 40, "fork_rec layout is shared with bpf.py");

struct owner {
	__u32 pid;
	__u32 tgid;
	__u32 uid;
	__u32 gid;
	__u64 cgroup_id;
	__u32 netns_ino;
	__u8 hook;
	__u8 _pad[3];
	char comm[COMM_LEN];
};

struct flow_key {
	__u64 netns_cookie;
	__u8 family;
	__u8 proto;
	__u16 sport;
	__u16 dport;
	__u16 _pad;
	__u8 saddr[16];
	__u8 daddr[16];
};

struct flow_seen {
	__u64 sock_cookie;
	__u64 last_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} ct_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct owner);
} ct_owners SEC(".maps");

/* Flows already reported: a packet is the first of a new flow when its tuple is not here, was
 * sent from another socket, or was idle longer than the conntrack timeout could keep it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 32768);
	__type(key, struct flow_key);
	__type(value, struct flow_seen);
} ct_seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} ct_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CFG_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} ct_config SEC(".maps");

static __always_inline void count_drop(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&ct_drops, &slot);

	if (n)
		*n += 1;
}

static __always_inline __u64 idle_ns(void)
{
	__u32 slot = CFG_IDLE_NS;
	__u64 *v = bpf_map_lookup_elem(&ct_config, &slot);

	return v && *v ? *v : DEFAULT_IDLE_NS;
}

/* ---- process-context socket hooks: remember who owns each socket ---- */

static __always_inline void fill_owner(struct owner *o, __u8 hook)
{
	struct task_struct *task = bpf_get_current_task_btf();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 uid_gid = bpf_get_current_uid_gid();

	o->pid = (__u32)pid_tgid;
	o->tgid = pid_tgid >> 32;
	o->uid = (__u32)uid_gid;
	o->gid = uid_gid >> 32;
	o->cgroup_id = bpf_get_current_cgroup_id();
	o->netns_ino = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
	o->hook = hook;
	bpf_get_current_comm(o->comm, sizeof(o->comm));
}

SEC("cgroup/sock_create")
int ct_sock_create(struct bpf_sock *ctx)
{
	struct owner *o = bpf_sk_storage_get(&ct_owners, ctx, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (o)
		fill_owner(o, HOOK_SOCK_CREATE);
	return 1;
}

static __always_inline void remember(struct bpf_sock_addr *ctx, __u8 hook)
{
	struct bpf_sock *sk = ctx->sk;
	struct owner *o;

	if (!sk)
		return;
	o = bpf_sk_storage_get(&ct_owners, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (o)
		fill_owner(o, hook);
}

SEC("cgroup/connect4")
int ct_connect4(struct bpf_sock_addr *ctx)
{
	remember(ctx, HOOK_CONNECT);
	return 1;
}

SEC("cgroup/connect6")
int ct_connect6(struct bpf_sock_addr *ctx)
{
	remember(ctx, HOOK_CONNECT);
	return 1;
}

SEC("cgroup/sendmsg4")
int ct_sendmsg4(struct bpf_sock_addr *ctx)
{
	remember(ctx, HOOK_SENDMSG);
	return 1;
}

SEC("cgroup/sendmsg6")
int ct_sendmsg6(struct bpf_sock_addr *ctx)
{
	remember(ctx, HOOK_SENDMSG);
	return 1;
}

/* ---- egress: the first packet of each new flow ---- */

/* Parse the packet into `k`; true when it can open a flow (TCP SYN without ACK, any UDP
 * datagram, an ICMP echo request). Non-first fragments and IPv6 extension headers: no. */
static __always_inline bool parse(struct __sk_buff *skb, struct flow_key *k, bool *is_tcp)
{
	__u32 l4;
	__u8 l4h[14];

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
			return false;
		if (ip.frag_off & bpf_htons(0x1fff))
			return false;
		k->family = AF_INET;
		k->proto = ip.protocol;
		__builtin_memcpy(k->saddr, &ip.saddr, 4);
		__builtin_memcpy(k->daddr, &ip.daddr, 4);
		l4 = ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			return false;
		k->family = AF_INET6;
		k->proto = ip6.nexthdr;
		__builtin_memcpy(k->saddr, &ip6.saddr, 16);
		__builtin_memcpy(k->daddr, &ip6.daddr, 16);
		l4 = sizeof(ip6);
	} else {
		return false;
	}

	switch (k->proto) {
	case IPPROTO_TCP:
		if (bpf_skb_load_bytes(skb, l4, l4h, 14))
			return false;
		/* flags byte: SYN 0x02, ACK 0x10 */
		if ((l4h[13] & 0x12) != 0x02)
			return false;
		*is_tcp = true;
		break;
	case IPPROTO_UDP:
	case IPPROTO_UDPLITE:
		if (bpf_skb_load_bytes(skb, l4, l4h, 4))
			return false;
		break;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if (bpf_skb_load_bytes(skb, l4, l4h, 6))
			return false;
		if (l4h[0] != (k->proto == IPPROTO_ICMP ? 8 : 128))
			return false;
		k->sport = ((__u16)l4h[4] << 8) | l4h[5];
		k->dport = ((__u16)l4h[0] << 8) | l4h[1];
		return true;
	default:
		return false;
	}
	k->sport = ((__u16)l4h[0] << 8) | l4h[1];
	k->dport = ((__u16)l4h[2] << 8) | l4h[3];
	return true;
}

static __always_inline void on_egress(struct __sk_buff *skb, const bool use_current)
{
	struct flow_key k;
	struct flow_seen *prev, now_seen;
	struct bpf_sock *sk;
	struct owner *o;
	struct flow_rec *r;
	bool is_tcp = false;
	__u64 now, cookie;

	__builtin_memset(&k, 0, sizeof(k));
	if (!parse(skb, &k, &is_tcp))
		return;
	k.netns_cookie = bpf_get_netns_cookie(skb);
	cookie = bpf_get_socket_cookie(skb);
	now = bpf_ktime_get_boot_ns();

	prev = bpf_map_lookup_elem(&ct_seen, &k);
	if (prev && prev->sock_cookie == cookie) {
		/* The same socket's SYN again is a retransmission, sent from a timer: never a new
		 * flow, and `current` there is whoever the timer interrupted. */
		if (is_tcp)
			return;
		/* Datagram flows stay known while they send. */
		if (now - prev->last_ns < idle_ns()) {
			prev->last_ns = now;
			return;
		}
	}
	now_seen.sock_cookie = cookie;
	now_seen.last_ns = now;
	bpf_map_update_elem(&ct_seen, &k, &now_seen, BPF_ANY);

	r = bpf_ringbuf_reserve(&ct_events, sizeof(*r), 0);
	if (!r) {
		count_drop(DROP_FLOW);
		return;
	}
	r->type = REC_FLOW;
	r->family = k.family;
	r->proto = k.proto;
	r->source = SRC_NONE;
	r->owner_hook = HOOK_NONE;
	r->_pad0[0] = r->_pad0[1] = r->_pad0[2] = 0;
	r->flags = 0;
	r->netns_ino = 0;
	r->ktime = now;
	r->sock_cookie = cookie;
	r->netns_cookie = k.netns_cookie;
	r->sk_cgroup_id = bpf_skb_cgroup_id(skb);
	r->cgroup_id = 0;
	r->pid = r->tgid = r->uid = r->gid = 0;
	r->sport = k.sport;
	r->dport = k.dport;
	r->_pad1 = 0;
	__builtin_memcpy(r->saddr, k.saddr, 16);
	__builtin_memcpy(r->daddr, k.daddr, 16);
	__builtin_memset(r->comm, 0, COMM_LEN);

	o = 0;
	sk = skb->sk;
	if (sk)
		sk = bpf_sk_fullsock(sk);
	if (sk)
		o = bpf_sk_storage_get(&ct_owners, sk, 0, 0);
	if (o) {
		r->owner_hook = o->hook;
		r->netns_ino = o->netns_ino;
	} else {
		r->flags |= F_NO_OWNER;
	}

	if (use_current) {
		struct task_struct *task = bpf_get_current_task_btf();
		__u64 pid_tgid = bpf_get_current_pid_tgid();
		__u64 uid_gid = bpf_get_current_uid_gid();

		r->source = SRC_EGRESS_TASK;
		r->pid = (__u32)pid_tgid;
		r->tgid = pid_tgid >> 32;
		r->uid = (__u32)uid_gid;
		r->gid = uid_gid >> 32;
		r->cgroup_id = bpf_get_current_cgroup_id();
		bpf_get_current_comm(r->comm, COMM_LEN);
		if (BPF_CORE_READ(task, flags) & PF_KTHREAD)
			r->flags |= F_KTHREAD;
		if (o && o->tgid != r->tgid)
			r->flags |= F_OWNER_DIFFERS;
	} else if (o) {
		r->source = SRC_SOCK_HOOK;
		r->pid = o->pid;
		r->tgid = o->tgid;
		r->uid = o->uid;
		r->gid = o->gid;
		r->cgroup_id = o->cgroup_id;
		__builtin_memcpy(r->comm, o->comm, COMM_LEN);
	}
	bpf_ringbuf_submit(r, 0);
}

SEC("cgroup_skb/egress")
int ct_egress(struct __sk_buff *skb)
{
	on_egress(skb, true);
	return 1;
}

SEC("cgroup_skb/egress")
int ct_egress_sk(struct __sk_buff *skb)
{
	on_egress(skb, false);
	return 1;
}

/* ---- processes: exec and fork ---- */

SEC("tp_btf/sched_process_exec")
int BPF_PROG(ct_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	struct exec_rec *r;
	__u64 uid_gid = bpf_get_current_uid_gid();
	unsigned long start, end, size;
	long n;

	r = bpf_ringbuf_reserve(&ct_events, sizeof(*r), 0);
	if (!r) {
		count_drop(DROP_EXEC);
		return 0;
	}
	r->type = REC_EXEC;
	r->_pad0[0] = r->_pad0[1] = r->_pad0[2] = 0;
	r->pid = BPF_CORE_READ(p, tgid);
	r->tid = BPF_CORE_READ(p, pid);
	r->ppid = BPF_CORE_READ(p, real_parent, tgid);
	r->uid = (__u32)uid_gid;
	r->gid = uid_gid >> 32;
	r->ktime = bpf_ktime_get_boot_ns();
	r->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(r->comm, COMM_LEN);

	n = bpf_probe_read_kernel_str(r->filename, FILENAME_LEN, BPF_CORE_READ(bprm, filename));
	r->filename_len = n > 0 ? n - 1 : 0;

	start = BPF_CORE_READ(p, mm, arg_start);
	end = BPF_CORE_READ(p, mm, arg_end);
	size = end > start ? end - start : 0;
	r->args_size = size;
	if (size > ARGV_LEN)
		size = ARGV_LEN;
	if (size && bpf_probe_read_user(r->argv, size, (void *)start) == 0)
		r->argv_len = size;
	else
		r->argv_len = 0;
	bpf_ringbuf_submit(r, 0);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(ct_fork, struct task_struct *parent, struct task_struct *child)
{
	struct fork_rec *r;
	__u32 pid = BPF_CORE_READ(child, pid);
	__u32 tgid = BPF_CORE_READ(child, tgid);

	if (pid != tgid) /* a new thread, not a new process */
		return 0;
	r = bpf_ringbuf_reserve(&ct_events, sizeof(*r), 0);
	if (!r) {
		count_drop(DROP_FORK);
		return 0;
	}
	r->type = REC_FORK;
	r->_pad0[0] = r->_pad0[1] = r->_pad0[2] = 0;
	r->pid = tgid;
	r->ppid = BPF_CORE_READ(parent, tgid);
	r->_pad1 = 0;
	r->ktime = bpf_ktime_get_boot_ns();
	BPF_CORE_READ_STR_INTO(&r->comm, child, comm);
	bpf_ringbuf_submit(r, 0);
	return 0;
}
