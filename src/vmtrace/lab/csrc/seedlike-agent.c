/*
 * seedlike-agent: the 2012 virtio-trace guest agent's data path, as its documents
 * describe it, for side-by-side measurement with vmtrace's agent.
 *
 * What it keeps from the seed, because that is what is being compared:
 *   - one reader thread per CPU, bound to that CPU;
 *   - splice(2) per_cpu/cpuN/trace_pipe_raw -> a pipe of 1 MiB -> the output, no copy;
 *   - when no full page is ready, sleep 100 ms and try again (the seed's only wait);
 *   - the output is opened blocking: a slow reader stalls the thread, as in the seed.
 * What it leaves out: the control port and the start/stop orders (it runs from start to
 * SIGINT/SIGTERM), and the virtio-serial port names (OUTDIR/cpuN is the output, which
 * may be a symlink to a port).  A modern kernel answers EAGAIN where the seed's kernel
 * answered 0 for "no page yet"; both mean "sleep".
 *
 * usage: seedlike-agent TRACEFS OUTDIR|- NCPUS      ("-" discards the data)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_READERS 256
#define PIPE_BYTES (1 << 20)
#define IDLE_SLEEP_US 100000

struct reader {
	int cpu;
	int in;			/* trace_pipe_raw */
	int out;		/* output file or port */
	int pipe_rd, pipe_wr;
};

static volatile sig_atomic_t stopping;

static void request_stop(int sig)
{
	(void)sig;
	stopping = 1;
}

static void fail(const char *what, int cpu)
{
	fprintf(stderr, "seedlike-agent: cpu%d: %s: %s\n", cpu, what, strerror(errno));
	exit(1);
}

/* Move every byte that is in the pipe to the output before reading more. */
static void drain_pipe(struct reader *r, ssize_t pending)
{
	while (pending > 0) {
		ssize_t n = splice(r->pipe_rd, NULL, r->out, NULL, (size_t)pending,
				   SPLICE_F_MOVE | SPLICE_F_MORE);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				fail("splice to output", r->cpu);
			n = 0;
		}
		if (n == 0) {	/* the seed slept a second when the port took nothing */
			sleep(1);
			continue;
		}
		pending -= n;
	}
}

static void *reader_main(void *arg)
{
	struct reader *r = arg;
	cpu_set_t only;

	CPU_ZERO(&only);
	CPU_SET(r->cpu, &only);
	sched_setaffinity(0, sizeof only, &only);

	while (!stopping) {
		ssize_t got = splice(r->in, NULL, r->pipe_wr, NULL, PIPE_BYTES,
				     SPLICE_F_MOVE | SPLICE_F_MORE);

		if (got < 0 && errno != EAGAIN && errno != EINTR)
			fail("splice from trace_pipe_raw", r->cpu);
		if (got <= 0) {
			usleep(IDLE_SLEEP_US);
			continue;
		}
		drain_pipe(r, got);
	}
	return NULL;
}

static void open_reader(struct reader *r, int cpu, const char *tracefs, const char *outdir)
{
	char path[PATH_MAX];
	int fds[2];

	r->cpu = cpu;
	snprintf(path, sizeof path, "%s/per_cpu/cpu%d/trace_pipe_raw", tracefs, cpu);
	r->in = open(path, O_RDONLY);
	if (r->in < 0)
		fail(path, cpu);
	if (strcmp(outdir, "-") == 0)
		snprintf(path, sizeof path, "/dev/null");
	else
		snprintf(path, sizeof path, "%s/cpu%d", outdir, cpu);
	r->out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (r->out < 0)
		fail(path, cpu);
	/* A non-blocking pipe makes the kernel answer "no full page yet" with EAGAIN
	 * instead of waiting inside splice, as in the seed. */
	if (pipe2(fds, O_NONBLOCK) != 0)
		fail("pipe2", cpu);
	r->pipe_rd = fds[0];
	r->pipe_wr = fds[1];
	if (fcntl(r->pipe_rd, F_SETPIPE_SZ, PIPE_BYTES) < 0)
		fail("F_SETPIPE_SZ", cpu);
}

int main(int argc, char **argv)
{
	static struct reader readers[MAX_READERS];
	pthread_t threads[MAX_READERS];
	struct sigaction sa;
	int ncpus;

	if (argc != 4) {
		fprintf(stderr, "usage: %s TRACEFS OUTDIR|- NCPUS\n", argv[0]);
		return 2;
	}
	ncpus = atoi(argv[3]);
	if (ncpus < 1 || ncpus > MAX_READERS) {
		fprintf(stderr, "seedlike-agent: NCPUS must be 1..%d\n", MAX_READERS);
		return 2;
	}
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = request_stop;	/* no SA_RESTART: a sleeping reader wakes and sees it */
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	for (int cpu = 0; cpu < ncpus; cpu++)
		open_reader(&readers[cpu], cpu, argv[1], argv[2]);
	for (int cpu = 0; cpu < ncpus; cpu++)
		if (pthread_create(&threads[cpu], NULL, reader_main, &readers[cpu]) != 0) {
			fprintf(stderr, "seedlike-agent: cannot start reader for cpu%d\n", cpu);
			return 1;
		}
	for (int cpu = 0; cpu < ncpus; cpu++)
		pthread_join(threads[cpu], NULL);
	return 0;
}
