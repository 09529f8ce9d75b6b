/*
 * intloop: vmtrace's CPU-bound workload, in the spirit of Dhrystone.
 *
 * Integer arithmetic, branches and small array and string work, no system calls in the
 * loop: it makes almost no trace events of its own, so a drop in its score measures what
 * a collector takes from the CPU it shares (cache, scheduling, interrupts), which is what
 * the 2012 virtio-trace evaluation measured with Dhrystone 2.
 *
 * usage: intloop [SECONDS]      (default 5)
 * prints the score, loop passes per second, as one number on stdout.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TABLE 64
#define STEPS 8192	/* work per pass; the clock is read once per pass */

static double seconds_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* volatile so the compiler cannot fold the work away */
static volatile unsigned table[TABLE];
static volatile char text[32];

static unsigned one_pass(unsigned state)
{
	for (int i = 0; i < STEPS; i++) {
		/* xorshift32: cheap, and its bits drive the branches below */
		state ^= state << 13;
		state ^= state >> 17;
		state ^= state << 5;
		unsigned slot = state % TABLE;

		switch (state >> 29) {
		case 0:
		case 1:
			table[slot] += state & 0xff;
			break;
		case 2:
			table[slot] ^= table[(slot + 7) % TABLE];
			break;
		case 3:
			text[slot % sizeof text] = (char)('a' + state % 26);
			break;
		default:
			if (table[slot] > 100000u)
				table[slot] = 0;
			else
				table[slot]++;
		}
	}
	return state;
}

int main(int argc, char **argv)
{
	double duration = argc > 1 ? strtod(argv[1], NULL) : 5.0;
	unsigned long long passes = 0;
	unsigned state = 2463534242u;
	double start, elapsed;

	if (duration <= 0) {
		fprintf(stderr, "intloop: SECONDS must be positive\n");
		return 2;
	}
	memset((void *)text, ' ', sizeof text);
	start = seconds_now();
	do {
		state = one_pass(state);
		passes++;
		elapsed = seconds_now() - start;
	} while (elapsed < duration);

	printf("%.1f\n", (double)passes / elapsed);
	return 0;
}
