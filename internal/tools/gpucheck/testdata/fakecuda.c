/* A stand-in for the driver's libcuda.so.1 on a host without a GPU, for
 * gpucheck's tests: the calls cuda-engine.py makes, with the real
 * prototypes. Like the driver, it opens the control node in cuInit and the
 * device's node for a context, so the device cgroup decides as it would
 * (EPERM: refused; ENXIO, a node without a driver behind it: let through).
 * The context holds the node open (O_PATH), as /proc shows a real one.
 * FAKE_CUDA_CTL and FAKE_CUDA_NODE name other nodes (tests on the host),
 * FAKE_CUDA_COUNT the devices it counts (default 1).
 * FAKE_CUDA_FAIL=<call> makes that call fail with CUDA_ERROR_OUT_OF_MEMORY. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NO_DEVICE 100
#define INVALID_DEVICE 101
#define OUT_OF_MEMORY 2

static int failing(const char *call)
{
	const char *f = getenv("FAKE_CUDA_FAIL");
	return f && strcmp(f, call) == 0;
}

static int reachable(const char *node)
{
	int fd = open(node, O_RDWR);
	if (fd >= 0) {
		close(fd);
		return 1;
	}
	return errno == ENXIO;
}

static const char *env(const char *name, const char *def)
{
	const char *v = getenv(name);
	return v ? v : def;
}

static const char *node(void)
{
	return env("FAKE_CUDA_NODE", "/dev/nvidia0");
}

int cuInit(unsigned flags)
{
	(void)flags;
	if (failing("cuInit"))
		return OUT_OF_MEMORY;
	return reachable(env("FAKE_CUDA_CTL", "/dev/nvidiactl")) ? 0 : NO_DEVICE;
}

int cuDeviceGetCount(int *n)
{
	*n = atoi(env("FAKE_CUDA_COUNT", "1"));
	return 0;
}

int cuDeviceGet(int *dev, int ordinal)
{
	if (ordinal != 0)
		return INVALID_DEVICE;
	*dev = 0;
	return 0;
}

int cuDeviceGetName(char *name, int len, int dev)
{
	(void)dev;
	strncpy(name, "Fake GPU", len);
	name[len - 1] = 0;
	return 0;
}

int cuCtxCreate_v2(void **ctx, unsigned flags, int dev)
{
	(void)flags;
	(void)dev;
	if (!reachable(node()))
		return NO_DEVICE;
	if (open(node(), O_PATH) < 0)
		return NO_DEVICE;
	*ctx = (void *)1;
	return 0;
}

int cuMemAlloc_v2(unsigned long long *ptr, size_t size)
{
	if (failing("cuMemAlloc_v2"))
		return OUT_OF_MEMORY;
	void *p = malloc(size);
	if (!p)
		return OUT_OF_MEMORY;
	*ptr = (unsigned long long)p;
	return 0;
}

int cuMemsetD8_v2(unsigned long long ptr, unsigned char v, size_t n)
{
	memset((void *)ptr, v, n);
	return 0;
}

int cuCtxSynchronize(void)
{
	return 0;
}

int cuGetErrorName(int rc, const char **s)
{
	switch (rc) {
	case NO_DEVICE:
		*s = "CUDA_ERROR_NO_DEVICE";
		return 0;
	case INVALID_DEVICE:
		*s = "CUDA_ERROR_INVALID_DEVICE";
		return 0;
	case OUT_OF_MEMORY:
		*s = "CUDA_ERROR_OUT_OF_MEMORY";
		return 0;
	}
	return 1;
}
