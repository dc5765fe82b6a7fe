/*
 * loadgen: send UDP datagrams with fresh 5-tuples at a paced rate, so that every datagram
 * creates one new conntrack entry on the router it crosses.
 *
 * Tuples: NSOCK sockets bound to SRC:SPORT_BASE+i, each sending to DST:DPORT_LO..DPORT_HI.
 * Datagram k goes from source port SPORT_BASE + k / NPORTS to destination port
 * DPORT_LO + k % NPORTS, so COUNT datagrams are COUNT distinct tuples as long as
 * COUNT <= NSOCK * NPORTS (checked). Pacing: every loop computes how many datagrams are due
 * at RATE since the start (clock_gettime(CLOCK_MONOTONIC)), sends up to BATCH of them with
 * one sendmmsg, and sleeps until the next one is due. RATE 0 means as fast as possible.
 * The run stops after COUNT datagrams or MAX_SECONDS, whichever comes first.
 *
 * Usage: loadgen -d DST [-s SRC] -r RATE -n COUNT -t MAX_SECONDS
 *                [-p SPORT_BASE] [-l DPORT_LO] [-h DPORT_HI] [-b BATCH]
 * Output (stdout, one line, key=value): attempted, sent (accepted by the kernel), errors
 * (datagrams whose send failed), seconds, rate (sent / seconds), sockets.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 256
#define MAX_SOCKS 1024

struct opts {
	const char *dst;
	const char *src;
	double rate;
	long count;
	double max_seconds;
	int sport_base;
	int dport_lo;
	int dport_hi;
	int batch;
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_until(double t)
{
	struct timespec ts;

	ts.tv_sec = (time_t)t;
	ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
	clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
}

static void usage(void)
{
	fprintf(stderr, "usage: loadgen -d DST [-s SRC] -r RATE -n COUNT -t MAX_SECONDS "
			"[-p SPORT_BASE] [-l DPORT_LO] [-h DPORT_HI] [-b BATCH]\n");
	exit(2);
}

static void parse(int argc, char **argv, struct opts *o)
{
	int c;

	*o = (struct opts){ .src = "0.0.0.0", .rate = 0, .count = 0, .max_seconds = 10,
			    .sport_base = 20000, .dport_lo = 1024, .dport_hi = 65535, .batch = 32 };
	while ((c = getopt(argc, argv, "d:s:r:n:t:p:l:h:b:")) != -1) {
		switch (c) {
		case 'd': o->dst = optarg; break;
		case 's': o->src = optarg; break;
		case 'r': o->rate = atof(optarg); break;
		case 'n': o->count = atol(optarg); break;
		case 't': o->max_seconds = atof(optarg); break;
		case 'p': o->sport_base = atoi(optarg); break;
		case 'l': o->dport_lo = atoi(optarg); break;
		case 'h': o->dport_hi = atoi(optarg); break;
		case 'b': o->batch = atoi(optarg); break;
		default: usage();
		}
	}
	if (!o->dst || o->count <= 0 || o->max_seconds <= 0 || o->rate < 0 || o->batch < 1 ||
	    o->batch > MAX_BATCH || o->dport_lo < 1 || o->dport_hi > 65535 ||
	    o->dport_lo > o->dport_hi || o->sport_base < 1)
		usage();
}

/* Open one UDP socket per source port needed; returns the number opened or -1. */
static int open_sockets(const struct opts *o, long nports, int *fds)
{
	long nsock = (o->count + nports - 1) / nports;
	struct sockaddr_in sa = { .sin_family = AF_INET };

	if (nsock > MAX_SOCKS || o->sport_base + nsock - 1 > 65535) {
		fprintf(stderr, "loadgen: %ld flows need %ld source ports: widen the port range\n",
			o->count, nsock);
		return -1;
	}
	if (inet_pton(AF_INET, o->src, &sa.sin_addr) != 1) {
		fprintf(stderr, "loadgen: bad source address %s\n", o->src);
		return -1;
	}
	for (long i = 0; i < nsock; i++) {
		int one = 1;

		fds[i] = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		if (fds[i] < 0) {
			perror("loadgen: socket");
			return -1;
		}
		setsockopt(fds[i], SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		sa.sin_port = htons((uint16_t)(o->sport_base + i));
		if (bind(fds[i], (struct sockaddr *)&sa, sizeof(sa)) < 0) {
			perror("loadgen: bind");
			return -1;
		}
	}
	return (int)nsock;
}

/*
 * Send datagrams [k, k + n) on one socket (the caller keeps them within one source port).
 * Returns the number the kernel accepted; counts failed calls in *errors.
 */
static long send_batch(int fd, const struct opts *o, const struct in_addr *dst, long k, int n,
		       long nports, long *errors)
{
	static struct sockaddr_in addrs[MAX_BATCH];
	static struct mmsghdr msgs[MAX_BATCH];
	static struct iovec iovs[MAX_BATCH];
	static char payload[18] = "conntrail-bench";
	int done = 0;

	for (int j = 0; j < n; j++) {
		addrs[j] = (struct sockaddr_in){ .sin_family = AF_INET, .sin_addr = *dst,
			.sin_port = htons((uint16_t)(o->dport_lo + (k + j) % nports)) };
		iovs[j] = (struct iovec){ .iov_base = payload, .iov_len = sizeof(payload) };
		msgs[j] = (struct mmsghdr){ .msg_hdr = { .msg_name = &addrs[j],
			.msg_namelen = sizeof(addrs[j]), .msg_iov = &iovs[j], .msg_iovlen = 1 } };
	}
	while (done < n) {
		int r = sendmmsg(fd, msgs + done, (unsigned int)(n - done), 0);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			(*errors)++;
			/* a refused or unreachable datagram is skipped, never retried forever */
			done++;
			continue;
		}
		done += r;
	}
	return n;
}

int main(int argc, char **argv)
{
	static int fds[MAX_SOCKS];
	struct opts o;
	struct in_addr dst;
	long nports, sent = 0, errors = 0; /* sent counts attempts until the summary */
	int nsock;
	double start, deadline, elapsed;

	parse(argc, argv, &o);
	if (inet_pton(AF_INET, o.dst, &dst) != 1) {
		fprintf(stderr, "loadgen: bad destination address %s\n", o.dst);
		return 2;
	}
	nports = o.dport_hi - o.dport_lo + 1;
	nsock = open_sockets(&o, nports, fds);
	if (nsock < 0)
		return 1;
	start = now_s();
	deadline = start + o.max_seconds;
	for (;;) {
		double t = now_s();
		long due, n, room;

		if (sent >= o.count || t >= deadline)
			break;
		due = o.rate > 0 ? (long)((t - start) * o.rate) + 1 : sent + o.batch;
		if (due > o.count)
			due = o.count;
		if (due <= sent) {
			sleep_until(start + (double)(sent + 1) / o.rate);
			continue;
		}
		n = due - sent;
		if (n > o.batch)
			n = o.batch;
		room = nports - sent % nports; /* stay on one source port per call */
		if (n > room)
			n = room;
		sent += send_batch(fds[sent / nports], &o, &dst, sent, (int)n, nports, &errors);
	}
	elapsed = now_s() - start;
	printf("attempted=%ld sent=%ld errors=%ld seconds=%.6f rate=%.1f sockets=%d\n", sent,
	       sent - errors, errors, elapsed,
	       elapsed > 0 ? (double)(sent - errors) / elapsed : 0.0, nsock);
	for (int i = 0; i < nsock; i++)
		close(fds[i]);
	return 0;
}
