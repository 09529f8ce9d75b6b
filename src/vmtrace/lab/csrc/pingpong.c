/*
 * pingpong: vmtrace's event-heavy workload.
 *
 * Two processes bounce one byte across two pipes.  Every round trip is two writes, two
 * reads and two context switches, so with sched, timer and kmem tracing on the ring
 * buffer fills quickly (tens of MB/s on one CPU): the shape of load that shows what a
 * trace collector costs.  Pin it with taskset to put all of it on one CPU.
 *
 * usage: pingpong [SECONDS]      (default 5)
 * prints the score, round trips per second, as one number on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Round trips between two clock reads: keeps clock_gettime out of the score. */
#define BATCH 128

static double seconds_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* One byte, retried on EINTR; anything else ends the run. */
static int move_byte(int fd, int writing, char *byte)
{
	for (;;) {
		ssize_t n = writing ? write(fd, byte, 1) : read(fd, byte, 1);

		if (n == 1)
			return 0;
		if (n < 0 && errno == EINTR)
			continue;
		return -1;
	}
}

static void echo_child(int from_parent, int to_parent)
{
	char byte;

	while (move_byte(from_parent, 0, &byte) == 0)
		if (move_byte(to_parent, 1, &byte) != 0)
			break;
	_exit(0);
}

int main(int argc, char **argv)
{
	double duration = argc > 1 ? strtod(argv[1], NULL) : 5.0;
	int down[2], up[2];
	unsigned long long trips = 0;
	double start, elapsed;
	char byte = 'p';
	pid_t child;

	if (duration <= 0) {
		fprintf(stderr, "pingpong: SECONDS must be positive\n");
		return 2;
	}
	if (pipe(down) != 0 || pipe(up) != 0) {
		perror("pingpong: pipe");
		return 1;
	}
	child = fork();
	if (child < 0) {
		perror("pingpong: fork");
		return 1;
	}
	if (child == 0) {
		close(down[1]);
		close(up[0]);
		echo_child(down[0], up[1]);
	}
	close(down[0]);
	close(up[1]);

	start = seconds_now();
	do {
		for (int i = 0; i < BATCH; i++) {
			if (move_byte(down[1], 1, &byte) != 0 || move_byte(up[0], 0, &byte) != 0) {
				fprintf(stderr, "pingpong: the echo process went away\n");
				return 1;
			}
		}
		trips += BATCH;
		elapsed = seconds_now() - start;
	} while (elapsed < duration);

	close(down[1]);		/* EOF ends the child */
	waitpid(child, NULL, 0);
	printf("%.1f\n", (double)trips / elapsed);
	return 0;
}
