/* Touch N MiB of anonymous memory with non-repeating data, then sleep: a CT with a known memory size. */
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
	size_t words = mib * 1024 * 1024 / sizeof(uint64_t);
	uint64_t *mem = malloc(words * sizeof(uint64_t));
	uint64_t x = 0x9e3779b97f4a7c15ULL;

	if (!mem)
		return 1;
	for (size_t i = 0; i < words; i++) {
		x ^= x << 13; x ^= x >> 7; x ^= x << 17;  /* xorshift: pages that do not compress to nothing */
		mem[i] = x;
	}
	for (;;)
		pause();
}
