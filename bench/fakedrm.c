/* A fake display kernel for benchmarks on machines without a KMS device, loaded with LD_PRELOAD.
 *
 * Opening the path in $FAKEDRM_PATH gives the read end of a pipe; ioctls on it answer as an atomic
 * KMS driver would: $FAKEDRM_OUTPUTS connectors (default 4, "Virtual-N", each 1920x1080@60 and
 * 1280x720@60), one encoder and CRTC per connector, a primary, an overlay and a cursor plane per
 * CRTC, dumb buffers (memfds, mmap()ed through the card fd), PRIME import of any descriptor (or
 * ENODEV with FAKEDRM_PRIME_IMPORT=0: a driver that cannot scan out another device's buffer), AddFB2,
 * property blobs, master, and atomic commits checked for unknown objects, properties and
 * framebuffers, modesets without ALLOW_MODESET, planes on inactive CRTCs, and a second nonblocking
 * commit on a CRTC with one in flight (EBUSY). A nonblocking commit that asks for an event gets one
 * flip event per CRTC it touches, written into the pipe $FAKEDRM_DELAY_US (default 1000) later, at the
 * first tick ($FAKEDRM_TICK_US, default 4000) of a thread named "fakekms" past that time, as a
 * display engine would at its vblank; its CPU is the kernel's, not ours. A blocking commit's events are there
 * when it returns.
 *
 * Every atomic commit also makes one real ioctl (on /dev/null), so the caller pays a syscall as it
 * would with a real card. Everything else is answered in process. Requests this fake does not know
 * fail with ENOTTY and one line on stderr.
 *
 * FAKEDRM_TRACE set: every atomic commit and flip event is logged on stderr.
 *
 * A fake vGPU too: with $FAKEDRM_VGPU naming a regular file, any descriptor of that file answers the
 * VFIO display ioctls as a mediated device with dma-buf planes would. VFIO_DEVICE_QUERY_GFX_PLANE
 * copies its answer from the file (struct vfio_device_gfx_plane_info: the primary plane's at offset 0,
 * the cursor plane's at 64; all zero is a disabled plane), VFIO_DEVICE_GET_GFX_DMABUF of id N opens
 * "$FAKEDRM_VGPU.N" (the test makes it) as the plane's dma-buf, VFIO_DEVICE_GET_INFO says there are no
 * regions. Every query is counted in "$FAKEDRM_VGPU.queries" (one byte per query). readlink of
 * "/proc/self/fd/N" for such a descriptor says "anon_inode:[vfio-device]", as for a real VFIO device,
 * so that the compositor's descriptor check (compositor/fdguard.py) takes it.
 *
 * Only benchmarks and host tests load this; the compositor itself never does.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <drm.h>
#include <drm_fourcc.h>
#include <drm_mode.h>

#define MAX_OUT 8
#define MAX_FB 512
#define MAX_GEM 512
#define MAX_BLOB 256
#define MAX_EVENTS 256
#define BLOB_MAX_LEN 4096

enum prop_id {
	P_NONE,
	P_TYPE,
	P_FB_ID,
	P_CRTC_ID,
	P_SRC_X,
	P_SRC_Y,
	P_SRC_W,
	P_SRC_H,
	P_CRTC_X,
	P_CRTC_Y,
	P_CRTC_W,
	P_CRTC_H,
	P_ACTIVE,
	P_MODE_ID,
	P_CONN_CRTC_ID,
	P_EDID,
	P_DPMS,
	P_COUNT
};

struct prop_def {
	const char *name;
	uint32_t flags;
	uint64_t lo, hi;
};

static const struct prop_def PROPS[P_COUNT] = {
	[P_TYPE] = { "type", DRM_MODE_PROP_ENUM | DRM_MODE_PROP_IMMUTABLE, 0, 0 },
	[P_FB_ID] = { "FB_ID", DRM_MODE_PROP_OBJECT | DRM_MODE_PROP_ATOMIC, 0, 0 },
	[P_CRTC_ID] = { "CRTC_ID", DRM_MODE_PROP_OBJECT | DRM_MODE_PROP_ATOMIC, 0, 0 },
	[P_SRC_X] = { "SRC_X", DRM_MODE_PROP_RANGE | DRM_MODE_PROP_ATOMIC, 0, UINT32_MAX },
	[P_SRC_Y] = { "SRC_Y", DRM_MODE_PROP_RANGE | DRM_MODE_PROP_ATOMIC, 0, UINT32_MAX },
	[P_SRC_W] = { "SRC_W", DRM_MODE_PROP_RANGE | DRM_MODE_PROP_ATOMIC, 0, UINT32_MAX },
	[P_SRC_H] = { "SRC_H", DRM_MODE_PROP_RANGE | DRM_MODE_PROP_ATOMIC, 0, UINT32_MAX },
	[P_CRTC_X] = { "CRTC_X", DRM_MODE_PROP_SIGNED_RANGE | DRM_MODE_PROP_ATOMIC, (uint64_t)INT32_MIN,
		       INT32_MAX },
	[P_CRTC_Y] = { "CRTC_Y", DRM_MODE_PROP_SIGNED_RANGE | DRM_MODE_PROP_ATOMIC, (uint64_t)INT32_MIN,
		       INT32_MAX },
	[P_CRTC_W] = { "CRTC_W", DRM_MODE_PROP_RANGE | DRM_MODE_PROP_ATOMIC, 0, INT32_MAX },
	[P_CRTC_H] = { "CRTC_H", DRM_MODE_PROP_RANGE | DRM_MODE_PROP_ATOMIC, 0, INT32_MAX },
	[P_ACTIVE] = { "ACTIVE", DRM_MODE_PROP_RANGE | DRM_MODE_PROP_ATOMIC, 0, 1 },
	[P_MODE_ID] = { "MODE_ID", DRM_MODE_PROP_BLOB | DRM_MODE_PROP_ATOMIC, 0, 0 },
	[P_CONN_CRTC_ID] = { "CRTC_ID", DRM_MODE_PROP_OBJECT | DRM_MODE_PROP_ATOMIC, 0, 0 },
	[P_EDID] = { "EDID", DRM_MODE_PROP_BLOB | DRM_MODE_PROP_IMMUTABLE, 0, 0 },
	[P_DPMS] = { "DPMS", DRM_MODE_PROP_ENUM, 0, 0 },
};

static const uint32_t PLANE_PROPS[] = { P_TYPE,  P_FB_ID,  P_CRTC_ID, P_SRC_X,  P_SRC_Y, P_SRC_W,
					P_SRC_H, P_CRTC_X, P_CRTC_Y,  P_CRTC_W, P_CRTC_H };
static const uint32_t CRTC_PROPS[] = { P_ACTIVE, P_MODE_ID };
static const uint32_t CONN_PROPS[] = { P_CONN_CRTC_ID, P_EDID, P_DPMS };
#define NPROPS(a) (sizeof(a) / sizeof((a)[0]))

/* Object ids: CRTC 10+i, encoder 30+i, connector 50+i, planes 70+3i (primary, overlay, cursor). */
enum kind { K_NONE, K_CRTC, K_ENC, K_CONN, K_PLANE };

struct plane_state {
	uint32_t fb, crtc;
	uint64_t v[P_COUNT];
};

struct state {
	struct plane_state plane[3 * MAX_OUT];
	uint64_t crtc_active[MAX_OUT], crtc_mode[MAX_OUT], conn_crtc[MAX_OUT];
};

struct fb {
	uint32_t id, w, h, format, handle;
};
struct gem {
	uint32_t handle;
	int memfd;
	uint64_t size;
	dev_t dev;
	ino_t ino;
};
struct blob {
	uint32_t id, len;
	unsigned char *data;
};
struct event {
	uint64_t due_ns, user_data;
	uint32_t crtc;
};

static struct {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int ready, fd, wfd, devnull, master, outputs, prime_import, trace;
	uint64_t delay_ns, tick_ns;
	struct state st;
	struct fb fbs[MAX_FB];
	struct gem gems[MAX_GEM];
	struct blob blobs[MAX_BLOB];
	uint32_t next_fb, next_gem, next_blob, sequence;
	int pending[MAX_OUT];
	struct event q[MAX_EVENTS];
	unsigned qlen;
	pthread_t thread;
	int thread_started;
} K = { .lock = PTHREAD_MUTEX_INITIALIZER, .fd = -1, .wfd = -1, .devnull = -1 };

static int (*real_ioctl)(int, unsigned long, ...);
static int (*real_open)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_close)(int);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static ssize_t (*real_readlink)(const char *, char *, size_t);

static void resolve(void)
{
	if (real_ioctl)
		return;
	real_open = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
	real_openat = (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, "openat");
	real_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
	real_mmap = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(RTLD_NEXT, "mmap");
	real_readlink = (ssize_t(*)(const char *, char *, size_t))dlsym(RTLD_NEXT, "readlink");
	real_ioctl =
		(int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl"); /* last: resolve() tests it */
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int fail(int err)
{
	errno = err;
	return -1;
}

/* ---- the fake vGPU ---------------------------------------------------------------------------- */

#define VFIO_TYPE_CHAR ';'
#define VFIO_GET_INFO (VFIO_TYPE_CHAR << 8 | 107)
#define VFIO_QUERY_GFX_PLANE (VFIO_TYPE_CHAR << 8 | 114)
#define VFIO_GET_GFX_DMABUF (VFIO_TYPE_CHAR << 8 | 115)
#define VFIO_PLANE_PROBE 1u
#define VFIO_PLANE_DMABUF 2u

static int is_vgpu(int fd, const char **path)
{
	struct stat want, st;
	*path = getenv("FAKEDRM_VGPU");
	return *path && fstat(fd, &st) == 0 && stat(*path, &want) == 0 && S_ISREG(st.st_mode) &&
	       st.st_dev == want.st_dev && st.st_ino == want.st_ino;
}

static int vgpu_ioctl(int fd, const char *path, unsigned long req, void *arg)
{
	char name[4096];
	if (req == VFIO_GET_INFO) {
		uint32_t *info = arg; /* argsz, flags, num_regions, num_irqs */
		info[1] = info[2] = info[3] = 0;
		return 0;
	}
	if (req == VFIO_GET_GFX_DMABUF) {
		snprintf(name, sizeof(name), "%s.%u", path, *(uint32_t *)arg);
		int dmabuf = real_open(name, O_RDWR | O_CLOEXEC);
		return dmabuf < 0 ? fail(ENOENT) : dmabuf;
	}
	if (req != VFIO_QUERY_GFX_PLANE)
		return fail(ENOTTY);
	uint32_t *q = arg; /* argsz, flags, drm_plane_type, then the answer */
	uint8_t answer[64];
	if (q[0] < 60)
		return fail(EINVAL);
	if (q[1] & VFIO_PLANE_PROBE)
		return q[1] == (VFIO_PLANE_PROBE | VFIO_PLANE_DMABUF) ? 0 : fail(EINVAL);
	if (q[1] != VFIO_PLANE_DMABUF)
		return fail(EINVAL);
	off_t at = q[2] == 2 ? 64 : 0; /* DRM_PLANE_TYPE_CURSOR: the second answer */
	if (pread(fd, answer, sizeof(answer), at) != (ssize_t)sizeof(answer))
		memset(answer, 0, sizeof(answer));
	memcpy((uint8_t *)arg + 12, answer + 12, 60 - 12);
	snprintf(name, sizeof(name), "%s.queries", path);
	int counter = real_open(name, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (counter >= 0) {
		if (write(counter, "q", 1) != 1) {
			/* a lost count only makes the test's number smaller */
		}
		real_close(counter);
	}
	return 0;
}

static enum kind kind_of(uint32_t id, int *index)
{
	int n = K.outputs;
	if (id >= 10 && id < 10u + n) {
		*index = (int)id - 10;
		return K_CRTC;
	}
	if (id >= 30 && id < 30u + n) {
		*index = (int)id - 30;
		return K_ENC;
	}
	if (id >= 50 && id < 50u + n) {
		*index = (int)id - 50;
		return K_CONN;
	}
	if (id >= 70 && id < 70u + 3 * n) {
		*index = (int)id - 70;
		return K_PLANE;
	}
	return K_NONE;
}

/* The "type" enum's values, as the kernel numbers them: Overlay 0, Primary 1, Cursor 2. */
static uint32_t plane_type(int p)
{
	return p % 3 == 0 ? 1 : p % 3 == 1 ? 0 : 2;
}

/* ---- the event thread ------------------------------------------------------------------------ */

static void write_event(uint32_t crtc, uint64_t user_data, uint64_t now)
{
	struct drm_event_vblank out;
	memset(&out, 0, sizeof(out));
	out.base.type = DRM_EVENT_FLIP_COMPLETE;
	out.base.length = sizeof(out);
	out.user_data = user_data;
	out.tv_sec = (uint32_t)(now / 1000000000ull);
	out.tv_usec = (uint32_t)(now % 1000000000ull / 1000);
	out.sequence = ++K.sequence;
	out.crtc_id = crtc;
	if (K.trace)
		fprintf(stderr, "fakedrm: %.3f event CRTC %u user_data %llu\n", now / 1e9, crtc,
			(unsigned long long)user_data);
	if (K.wfd >= 0 && write(K.wfd, &out, sizeof(out)) != (ssize_t)sizeof(out))
		fprintf(stderr, "fakedrm: flip event of CRTC %u lost: %s\n", crtc, strerror(errno));
}

/* The display engine: it looks at its queue every $FAKEDRM_TICK_US (default 4 ms), as a vblank
 * interrupt would come on its own, so a commit never wakes it (a futex wake on the committer's CPU
 * would be charged to the compositor, which a real kernel's interrupt is not). The tick is not
 * finer: this thread runs in the compositor's process, and at 1 kHz its wakeups alone cost the
 * compositor's data plane thread 10-15 us per frame at 60 flips/s (per-thread schedstat), which a
 * kernel's vblank interrupt at 60-144 Hz does not. 4 ms still completes a flip within a 144 Hz
 * frame. */

static void *kernel_thread(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&K.lock);
	for (;;) {
		uint64_t now = now_ns();
		while (K.qlen && K.q[0].due_ns <= now) {
			struct event ev = K.q[0];
			memmove(K.q, K.q + 1, (K.qlen - 1) * sizeof(K.q[0]));
			K.qlen--;
			K.pending[ev.crtc - 10] = 0;
			write_event(ev.crtc, ev.user_data, now);
		}
		uint64_t wake = now + K.tick_ns;
		if (K.qlen && K.q[0].due_ns < wake)
			wake = K.q[0].due_ns;
		struct timespec until = { (time_t)(wake / 1000000000ull), (long)(wake % 1000000000ull) };
		pthread_cond_timedwait(&K.cond, &K.lock, &until);
	}
	return NULL;
}

static void queue_event(uint32_t crtc, uint64_t user_data, uint64_t delay)
{
	if (K.qlen == MAX_EVENTS)
		return;
	uint64_t due = now_ns() + delay;
	unsigned at = K.qlen;
	while (at > 0 && K.q[at - 1].due_ns > due)
		at--;
	memmove(K.q + at + 1, K.q + at, (K.qlen - at) * sizeof(K.q[0]));
	K.q[at] = (struct event){ due, user_data, crtc };
	K.qlen++;
	K.pending[crtc - 10] = 1;
}

/* ---- objects -------------------------------------------------------------------------------- */

static struct fb *find_fb(uint32_t id)
{
	for (int i = 0; i < MAX_FB; i++)
		if (id && K.fbs[i].id == id)
			return &K.fbs[i];
	return NULL;
}

static struct gem *find_gem(uint32_t handle)
{
	for (int i = 0; i < MAX_GEM; i++)
		if (handle && K.gems[i].handle == handle)
			return &K.gems[i];
	return NULL;
}

static struct blob *find_blob(uint32_t id)
{
	for (int i = 0; i < MAX_BLOB; i++)
		if (id && K.blobs[i].id == id)
			return &K.blobs[i];
	return NULL;
}

static struct gem *new_gem(void)
{
	struct gem *g = find_gem(0);
	for (int i = 0; i < MAX_GEM && !g; i++)
		if (!K.gems[i].handle)
			g = &K.gems[i];
	if (!g)
		return NULL;
	memset(g, 0, sizeof(*g));
	g->memfd = -1;
	g->handle = ++K.next_gem;
	return g;
}

static void mode(struct drm_mode_modeinfo *m, int big)
{
	memset(m, 0, sizeof(*m));
	if (big) {
		*m = (struct drm_mode_modeinfo){ .clock = 148500,
						 .hdisplay = 1920,
						 .hsync_start = 2008,
						 .hsync_end = 2052,
						 .htotal = 2200,
						 .vdisplay = 1080,
						 .vsync_start = 1084,
						 .vsync_end = 1089,
						 .vtotal = 1125,
						 .vrefresh = 60,
						 .flags = DRM_MODE_FLAG_PHSYNC | DRM_MODE_FLAG_PVSYNC,
						 .type = DRM_MODE_TYPE_DRIVER | DRM_MODE_TYPE_PREFERRED };
		strcpy(m->name, "1920x1080");
	} else {
		*m = (struct drm_mode_modeinfo){ .clock = 74250,
						 .hdisplay = 1280,
						 .hsync_start = 1390,
						 .hsync_end = 1430,
						 .htotal = 1650,
						 .vdisplay = 720,
						 .vsync_start = 725,
						 .vsync_end = 730,
						 .vtotal = 750,
						 .vrefresh = 60,
						 .flags = DRM_MODE_FLAG_PHSYNC | DRM_MODE_FLAG_PVSYNC,
						 .type = DRM_MODE_TYPE_DRIVER };
		strcpy(m->name, "1280x720");
	}
}

/* Copy n u32s out when the caller's array has room; the count always says how many there are. */
static void put_u32(uint64_t ptr, uint32_t *count, const uint32_t *vals, uint32_t n)
{
	if (ptr && *count >= n)
		memcpy((void *)(uintptr_t)ptr, vals, n * sizeof(uint32_t));
	*count = n;
}

static uint64_t prop_value(const struct state *s, enum kind k, int i, uint32_t prop)
{
	switch (k) {
	case K_PLANE:
		if (prop == P_TYPE)
			return plane_type(i);
		if (prop == P_FB_ID)
			return s->plane[i].fb;
		if (prop == P_CRTC_ID)
			return s->plane[i].crtc;
		return s->plane[i].v[prop];
	case K_CRTC:
		return prop == P_ACTIVE ? s->crtc_active[i] : s->crtc_mode[i];
	case K_CONN:
		return prop == P_CONN_CRTC_ID ? s->conn_crtc[i] : 0;
	default:
		return 0;
	}
}

static int props_of(enum kind k, const uint32_t **props)
{
	switch (k) {
	case K_PLANE:
		*props = PLANE_PROPS;
		return NPROPS(PLANE_PROPS);
	case K_CRTC:
		*props = CRTC_PROPS;
		return NPROPS(CRTC_PROPS);
	case K_CONN:
		*props = CONN_PROPS;
		return NPROPS(CONN_PROPS);
	default:
		*props = NULL;
		return 0;
	}
}

/* An object's property ids and current values into the caller's arrays when they have room; the
 * count always says how many there are (GETCONNECTOR and OBJ_GETPROPERTIES answer alike). */
static void put_props(enum kind k, int i, uint64_t ids_ptr, uint64_t vals_ptr, uint32_t *count)
{
	const uint32_t *props;
	uint32_t n = (uint32_t)props_of(k, &props);

	if (ids_ptr && vals_ptr && *count >= n)
		for (uint32_t j = 0; j < n; j++) {
			((uint32_t *)(uintptr_t)ids_ptr)[j] = props[j];
			((uint64_t *)(uintptr_t)vals_ptr)[j] = prop_value(&K.st, k, i, props[j]);
		}
	*count = n;
}

/* ---- atomic ---------------------------------------------------------------------------------- */

static int set_prop(struct state *s, uint32_t obj, uint32_t prop, uint64_t val)
{
	int i;
	enum kind k = kind_of(obj, &i);
	const uint32_t *props;
	int n = props_of(k, &props), found = 0;
	for (int j = 0; j < n; j++)
		found |= props[j] == prop;
	if (!found || (PROPS[prop].flags & DRM_MODE_PROP_IMMUTABLE))
		return -EINVAL;
	if (k == K_PLANE) {
		if (prop == P_FB_ID) {
			if (val && !find_fb((uint32_t)val))
				return -EINVAL;
			s->plane[i].fb = (uint32_t)val;
		} else if (prop == P_CRTC_ID) {
			int c;
			if (val && (kind_of((uint32_t)val, &c) != K_CRTC || c != i / 3))
				return -EINVAL;
			s->plane[i].crtc = (uint32_t)val;
		} else {
			s->plane[i].v[prop] = val;
		}
	} else if (k == K_CRTC) {
		if (prop == P_ACTIVE) {
			if (val > 1)
				return -EINVAL;
			s->crtc_active[i] = val;
		} else {
			if (val && !find_blob((uint32_t)val))
				return -EINVAL;
			s->crtc_mode[i] = val;
		}
	} else {
		int c;
		if (val && (kind_of((uint32_t)val, &c) != K_CRTC || c != i))
			return -EINVAL;
		s->conn_crtc[i] = val;
	}
	return 0;
}

static int atomic(struct drm_mode_atomic *a)
{
	const uint32_t *objs = (const uint32_t *)(uintptr_t)a->objs_ptr;
	const uint32_t *counts = (const uint32_t *)(uintptr_t)a->count_props_ptr;
	const uint32_t *props = (const uint32_t *)(uintptr_t)a->props_ptr;
	const uint64_t *vals = (const uint64_t *)(uintptr_t)a->prop_values_ptr;
	struct state next = K.st;
	int touched[MAX_OUT] = { 0 }, modeset = 0;
	uint32_t at = 0;

	if (a->flags & ~(uint32_t)DRM_MODE_ATOMIC_FLAGS)
		return -EINVAL;
	if ((a->flags & DRM_MODE_ATOMIC_TEST_ONLY) && (a->flags & DRM_MODE_PAGE_FLIP_EVENT))
		return -EINVAL;
	for (uint32_t o = 0; o < a->count_objs; o++) {
		int i;
		enum kind k = kind_of(objs[o], &i);
		if (k == K_NONE || k == K_ENC)
			return -ENOENT;
		for (uint32_t j = 0; j < counts[o]; j++, at++) {
			int ret = set_prop(&next, objs[o], props[at], vals[at]);
			if (ret)
				return ret;
		}
		if (k == K_CRTC)
			touched[i] = 1;
		if (k == K_PLANE) {
			touched[i / 3] |= next.plane[i].crtc || K.st.plane[i].crtc;
		}
		if (k == K_CONN)
			touched[i] = 1;
	}
	for (int c = 0; c < K.outputs; c++) {
		if (next.crtc_active[c] != K.st.crtc_active[c] || next.crtc_mode[c] != K.st.crtc_mode[c] ||
		    next.conn_crtc[c] != K.st.conn_crtc[c])
			modeset = 1;
		if (next.crtc_active[c] && !next.crtc_mode[c])
			return -EINVAL;
	}
	if (modeset && !(a->flags & DRM_MODE_ATOMIC_ALLOW_MODESET))
		return -EINVAL;
	for (int p = 0; p < 3 * K.outputs; p++) {
		struct plane_state *ps = &next.plane[p];
		if (!ps->fb != !ps->crtc)
			return -EINVAL;
		if (ps->crtc && !next.crtc_active[p / 3])
			return -EINVAL;
		if (ps->fb) {
			struct fb *fb = find_fb(ps->fb);
			if ((ps->v[P_SRC_X] + ps->v[P_SRC_W]) >> 16 > fb->w ||
			    (ps->v[P_SRC_Y] + ps->v[P_SRC_H]) >> 16 > fb->h || !ps->v[P_SRC_W] ||
			    !ps->v[P_CRTC_W] || !ps->v[P_CRTC_H])
				return -EINVAL;
		}
	}
	for (int c = 0; c < K.outputs; c++) {
		if (!touched[c])
			continue;
		if ((a->flags & DRM_MODE_PAGE_FLIP_EVENT) && !next.crtc_active[c] && !K.st.crtc_active[c])
			return -EINVAL;
		if ((a->flags & DRM_MODE_ATOMIC_NONBLOCK) && K.pending[c])
			return -EBUSY;
	}
	if (a->flags & DRM_MODE_ATOMIC_TEST_ONLY)
		return 0;
	/* A blocking commit waits for the CRTC's commit in flight, as the kernel does. */
	for (int c = 0; c < K.outputs; c++) {
		uint64_t until = now_ns() + 1000000000ull;
		while (touched[c] && K.pending[c] && now_ns() < until) {
			pthread_mutex_unlock(&K.lock);
			usleep(100);
			pthread_mutex_lock(&K.lock);
		}
	}
	K.st = next;
	/* A nonblocking commit completes at the fake vblank; a blocking one has completed when it
	 * returns, its events already readable. */
	if (a->flags & DRM_MODE_PAGE_FLIP_EVENT)
		for (int c = 0; c < K.outputs; c++)
			if (touched[c]) {
				if (a->flags & DRM_MODE_ATOMIC_NONBLOCK)
					queue_event(10 + c, a->user_data, K.delay_ns);
				else
					write_event(10 + c, a->user_data, now_ns());
			}
	return 0;
}

/* ---- the ioctls ------------------------------------------------------------------------------ */

/* $FAKEDRM_STATS, rewritten whenever a framebuffer, buffer handle or blob comes or goes (never per
 * flip): what the fake kernel holds for its one client, as DRM debugfs lists a real card's. */
static void write_stats(void)
{
	const char *path = getenv("FAKEDRM_STATS");
	if (!path)
		return;
	int fbs = 0, gems = 0, blobs = 0;
	for (int i = 0; i < MAX_FB; i++)
		fbs += K.fbs[i].id != 0;
	for (int i = 0; i < MAX_GEM; i++)
		gems += K.gems[i].handle != 0;
	for (int i = 0; i < MAX_BLOB; i++)
		blobs += K.blobs[i].id != 0;
	char line[96];
	int n = snprintf(line, sizeof(line), "framebuffers %d handles %d blobs %d\n", fbs, gems, blobs);
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	int fd = real_open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	if (write(fd, line, (size_t)n) == n)
		rename(tmp, path);
	real_close(fd);
}

static int get_property(struct drm_mode_get_property *p)
{
	if (p->prop_id == 0 || p->prop_id >= P_COUNT)
		return -ENOENT;
	const struct prop_def *d = &PROPS[p->prop_id];
	snprintf(p->name, sizeof(p->name), "%s", d->name);
	p->flags = d->flags;
	if (d->flags & (DRM_MODE_PROP_RANGE | DRM_MODE_PROP_SIGNED_RANGE)) {
		uint64_t v[2] = { d->lo, d->hi };
		if (p->values_ptr && p->count_values >= 2)
			memcpy((void *)(uintptr_t)p->values_ptr, v, sizeof(v));
		p->count_values = 2;
		p->count_enum_blobs = 0;
	} else if (d->flags & DRM_MODE_PROP_ENUM) {
		static const char *plane_types[] = { "Overlay", "Primary", "Cursor" };
		static const char *dpms[] = { "On", "Standby", "Suspend", "Off" };
		const char **names = p->prop_id == P_TYPE ? plane_types : dpms;
		uint32_t n = p->prop_id == P_TYPE ? 3 : 4;
		if (p->enum_blob_ptr && p->count_enum_blobs >= n) {
			struct drm_mode_property_enum *e = (void *)(uintptr_t)p->enum_blob_ptr;
			uint64_t *v = (void *)(uintptr_t)p->values_ptr;
			for (uint32_t i = 0; i < n; i++) {
				e[i].value = i;
				snprintf(e[i].name, sizeof(e[i].name), "%s", names[i]);
				if (v && p->count_values >= n)
					v[i] = i;
			}
		}
		p->count_values = n;
		p->count_enum_blobs = n;
	} else {
		if (d->flags & DRM_MODE_PROP_OBJECT) {
			uint64_t v = p->prop_id == P_FB_ID ? DRM_MODE_OBJECT_FB : DRM_MODE_OBJECT_CRTC;
			if (p->values_ptr && p->count_values >= 1)
				memcpy((void *)(uintptr_t)p->values_ptr, &v, sizeof(v));
			p->count_values = 1;
		} else {
			p->count_values = 0;
		}
		p->count_enum_blobs = 0;
	}
	return 0;
}

static int handle(unsigned long req, void *arg)
{
	switch (req) {
	case DRM_IOCTL_VERSION: {
		struct drm_version *v = arg;
		static const char name[] = "fakedrm", date[] = "20261207", desc[] = "fake display kernel";
		v->version_major = 1;
		v->version_minor = 0;
		v->version_patchlevel = 0;
#define COPY(field, s)                                                                                       \
	do {                                                                                                 \
		if (v->field && v->field##_len >= sizeof(s) - 1)                                             \
			memcpy(v->field, s, sizeof(s) - 1);                                                  \
		v->field##_len = sizeof(s) - 1;                                                              \
	} while (0)
		COPY(name, name);
		COPY(date, date);
		COPY(desc, desc);
#undef COPY
		return 0;
	}
	case DRM_IOCTL_GET_CAP: {
		struct drm_get_cap *c = arg;
		switch (c->capability) {
		case DRM_CAP_DUMB_BUFFER:
		case DRM_CAP_TIMESTAMP_MONOTONIC:
		case DRM_CAP_CRTC_IN_VBLANK_EVENT:
			c->value = 1;
			return 0;
		case DRM_CAP_PRIME:
			c->value = DRM_PRIME_CAP_IMPORT | DRM_PRIME_CAP_EXPORT;
			return 0;
		case DRM_CAP_ADDFB2_MODIFIERS:
			c->value = 0;
			return 0;
		case DRM_CAP_CURSOR_WIDTH:
		case DRM_CAP_CURSOR_HEIGHT:
			c->value = 64;
			return 0;
		default:
			return -EINVAL;
		}
	}
	case DRM_IOCTL_SET_CLIENT_CAP: {
		struct drm_set_client_cap *c = arg;
		return c->capability == DRM_CLIENT_CAP_UNIVERSAL_PLANES ||
				       c->capability == DRM_CLIENT_CAP_ATOMIC
			       ? 0
			       : -EINVAL;
	}
	case DRM_IOCTL_SET_MASTER:
		K.master = 1;
		return 0;
	case DRM_IOCTL_DROP_MASTER:
		K.master = 0;
		return 0;
	case DRM_IOCTL_AUTH_MAGIC:
		return K.master ? -EINVAL : -EACCES;
	case DRM_IOCTL_MODE_GETRESOURCES: {
		struct drm_mode_card_res *r = arg;
		uint32_t crtcs[MAX_OUT], encs[MAX_OUT], conns[MAX_OUT], n = (uint32_t)K.outputs;
		for (uint32_t i = 0; i < n; i++) {
			crtcs[i] = 10 + i;
			encs[i] = 30 + i;
			conns[i] = 50 + i;
		}
		r->count_fbs = 0;
		put_u32(r->crtc_id_ptr, &r->count_crtcs, crtcs, n);
		put_u32(r->encoder_id_ptr, &r->count_encoders, encs, n);
		put_u32(r->connector_id_ptr, &r->count_connectors, conns, n);
		r->min_width = r->min_height = 1;
		r->max_width = r->max_height = 8192;
		return 0;
	}
	case DRM_IOCTL_MODE_GETPLANERESOURCES: {
		struct drm_mode_get_plane_res *r = arg;
		uint32_t ids[3 * MAX_OUT], n = 3 * (uint32_t)K.outputs;
		for (uint32_t i = 0; i < n; i++)
			ids[i] = 70 + i;
		put_u32(r->plane_id_ptr, &r->count_planes, ids, n);
		return 0;
	}
	case DRM_IOCTL_MODE_GETCRTC: {
		struct drm_mode_crtc *c = arg;
		int i;
		if (kind_of(c->crtc_id, &i) != K_CRTC)
			return -ENOENT;
		struct blob *b = find_blob((uint32_t)K.st.crtc_mode[i]);
		c->fb_id = K.st.plane[3 * i].fb;
		c->x = c->y = 0;
		c->gamma_size = 0;
		c->mode_valid = b && K.st.crtc_active[i];
		if (c->mode_valid)
			memcpy(&c->mode, b->data, sizeof(c->mode));
		else
			memset(&c->mode, 0, sizeof(c->mode));
		return 0;
	}
	case DRM_IOCTL_MODE_GETENCODER: {
		struct drm_mode_get_encoder *e = arg;
		int i;
		if (kind_of(e->encoder_id, &i) != K_ENC)
			return -ENOENT;
		e->encoder_type = DRM_MODE_ENCODER_VIRTUAL;
		e->crtc_id = (uint32_t)K.st.conn_crtc[i];
		e->possible_crtcs = 1u << i;
		e->possible_clones = 0;
		return 0;
	}
	case DRM_IOCTL_MODE_GETCONNECTOR: {
		struct drm_mode_get_connector *c = arg;
		int i;
		if (kind_of(c->connector_id, &i) != K_CONN)
			return -ENOENT;
		uint32_t enc = 30 + (uint32_t)i;
		put_u32(c->encoders_ptr, &c->count_encoders, &enc, 1);
		put_props(K_CONN, i, c->props_ptr, c->prop_values_ptr, &c->count_props);
		if (c->modes_ptr && c->count_modes >= 2) {
			struct drm_mode_modeinfo *m = (void *)(uintptr_t)c->modes_ptr;
			mode(&m[0], 1);
			mode(&m[1], 0);
		}
		c->count_modes = 2;
		c->encoder_id = K.st.conn_crtc[i] ? enc : 0;
		c->connector_type = DRM_MODE_CONNECTOR_VIRTUAL;
		c->connector_type_id = (uint32_t)i + 1;
		c->connection = 1; /* connected */
		c->mm_width = 530;
		c->mm_height = 300;
		c->subpixel = 1;
		return 0;
	}
	case DRM_IOCTL_MODE_GETPLANE: {
		struct drm_mode_get_plane *p = arg;
		int i;
		if (kind_of(p->plane_id, &i) != K_PLANE)
			return -ENOENT;
		uint32_t fmts[] = { DRM_FORMAT_XRGB8888, DRM_FORMAT_ARGB8888 };
		p->crtc_id = K.st.plane[i].crtc;
		p->fb_id = K.st.plane[i].fb;
		p->possible_crtcs = 1u << (i / 3);
		p->gamma_size = 0;
		put_u32(p->format_type_ptr, &p->count_format_types, fmts, 2);
		return 0;
	}
	case DRM_IOCTL_MODE_OBJ_GETPROPERTIES: {
		struct drm_mode_obj_get_properties *o = arg;
		int i;
		enum kind k = kind_of(o->obj_id, &i);
		const uint32_t *props;
		if (!props_of(k, &props))
			return -ENOENT;
		put_props(k, i, o->props_ptr, o->prop_values_ptr, &o->count_props);
		return 0;
	}
	case DRM_IOCTL_MODE_GETPROPERTY:
		return get_property(arg);
	case DRM_IOCTL_MODE_GETPROPBLOB: {
		struct drm_mode_get_blob *g = arg;
		struct blob *b = find_blob(g->blob_id);
		if (!b)
			return -ENOENT;
		if (g->data && g->length >= b->len)
			memcpy((void *)(uintptr_t)g->data, b->data, b->len);
		g->length = b->len;
		return 0;
	}
	case DRM_IOCTL_MODE_CREATEPROPBLOB: {
		struct drm_mode_create_blob *c = arg;
		struct blob *b = find_blob(0);
		for (int i = 0; i < MAX_BLOB && !b; i++)
			if (!K.blobs[i].id)
				b = &K.blobs[i];
		if (!b)
			return -ENOSPC;
		if (!c->length || c->length > BLOB_MAX_LEN)
			return -EINVAL;
		b->data = malloc(c->length);
		if (!b->data)
			return -ENOMEM;
		memcpy(b->data, (void *)(uintptr_t)c->data, c->length);
		b->len = c->length;
		b->id = 1000 + ++K.next_blob;
		c->blob_id = b->id;
		return 0;
	}
	case DRM_IOCTL_MODE_DESTROYPROPBLOB: {
		struct drm_mode_destroy_blob *d = arg;
		struct blob *b = find_blob(d->blob_id);
		if (!b)
			return -ENOENT;
		free(b->data);
		memset(b, 0, sizeof(*b));
		return 0;
	}
	case DRM_IOCTL_MODE_CREATE_DUMB: {
		struct drm_mode_create_dumb *c = arg;
		if (!c->width || !c->height || c->width > 8192 || c->height > 8192 || c->bpp != 32)
			return -EINVAL;
		struct gem *g = new_gem();
		if (!g)
			return -ENOSPC;
		c->pitch = (c->width * 4 + 63) & ~63u;
		c->size = (uint64_t)c->pitch * c->height;
		g->memfd = memfd_create("fakedrm-dumb", MFD_CLOEXEC);
		if (g->memfd < 0 || ftruncate(g->memfd, (off_t)c->size) < 0) {
			int err = errno;
			if (g->memfd >= 0)
				real_close(g->memfd);
			g->handle = 0;
			return -err;
		}
		g->size = c->size;
		c->handle = g->handle;
		return 0;
	}
	case DRM_IOCTL_MODE_MAP_DUMB: {
		struct drm_mode_map_dumb *m = arg;
		struct gem *g = find_gem(m->handle);
		if (!g || g->memfd < 0)
			return -ENOENT;
		m->offset = (uint64_t)g->handle << 32;
		return 0;
	}
	case DRM_IOCTL_MODE_DESTROY_DUMB:
	case DRM_IOCTL_GEM_CLOSE: {
		uint32_t h = req == DRM_IOCTL_GEM_CLOSE ? ((struct drm_gem_close *)arg)->handle
							: ((struct drm_mode_destroy_dumb *)arg)->handle;
		struct gem *g = find_gem(h);
		if (!g)
			return -EINVAL;
		if (g->memfd >= 0)
			real_close(g->memfd);
		memset(g, 0, sizeof(*g));
		return 0;
	}
	case DRM_IOCTL_PRIME_FD_TO_HANDLE: {
		struct drm_prime_handle *p = arg;
		struct stat st;
		if (fstat(p->fd, &st) < 0)
			return -EBADF;
		if (!K.prime_import)
			return -ENODEV;
		for (int i = 0; i < MAX_GEM; i++)
			if (K.gems[i].handle && K.gems[i].memfd < 0 && K.gems[i].dev == st.st_dev &&
			    K.gems[i].ino == st.st_ino) {
				p->handle = K.gems[i].handle;
				return 0;
			}
		struct gem *g = new_gem();
		if (!g)
			return -ENOSPC;
		g->dev = st.st_dev;
		g->ino = st.st_ino;
		p->handle = g->handle;
		return 0;
	}
	case DRM_IOCTL_PRIME_HANDLE_TO_FD: {
		struct drm_prime_handle *p = arg;
		struct gem *g = find_gem(p->handle);
		if (!g || g->memfd < 0)
			return -ENOENT;
		p->fd = fcntl(g->memfd, (p->flags & DRM_CLOEXEC) ? F_DUPFD_CLOEXEC : F_DUPFD, 0);
		return p->fd < 0 ? -errno : 0;
	}
	case DRM_IOCTL_MODE_ADDFB2: {
		struct drm_mode_fb_cmd2 *f = arg;
		if (!f->width || !f->height || !find_gem(f->handles[0]) || (f->flags & DRM_MODE_FB_MODIFIERS))
			return -EINVAL;
		if (f->pixel_format != DRM_FORMAT_XRGB8888 && f->pixel_format != DRM_FORMAT_ARGB8888)
			return -EINVAL;
		for (int i = 0; i < MAX_FB; i++)
			if (!K.fbs[i].id) {
				K.fbs[i] = (struct fb){ 5000 + ++K.next_fb, f->width, f->height,
							f->pixel_format, f->handles[0] };
				f->fb_id = K.fbs[i].id;
				return 0;
			}
		return -ENOSPC;
	}
	case DRM_IOCTL_MODE_RMFB: {
		uint32_t id = *(uint32_t *)arg;
		struct fb *fb = find_fb(id);
		if (!fb)
			return -ENOENT;
		for (int p = 0; p < 3 * K.outputs; p++) /* the kernel turns off a plane showing it */
			if (K.st.plane[p].fb == id)
				K.st.plane[p].fb = K.st.plane[p].crtc = 0;
		memset(fb, 0, sizeof(*fb));
		return 0;
	}
	case DRM_IOCTL_MODE_DIRTYFB:
		return -ENOSYS;
	case DRM_IOCTL_MODE_ATOMIC: {
		real_ioctl(K.devnull, req, arg); /* the syscall a real commit costs its caller */
		int ret = atomic(arg);
		if (K.trace) {
			struct drm_mode_atomic *a = arg;
			const uint32_t *objs = (const uint32_t *)(uintptr_t)a->objs_ptr;
			const uint32_t *counts = (const uint32_t *)(uintptr_t)a->count_props_ptr;
			const uint32_t *props = (const uint32_t *)(uintptr_t)a->props_ptr;
			const uint64_t *vals = (const uint64_t *)(uintptr_t)a->prop_values_ptr;
			uint32_t at = 0;

			fprintf(stderr,
				"fakedrm: %.3f atomic flags %#x objs %u user_data %llu -> %d; pending",
				now_ns() / 1e9, a->flags, a->count_objs, (unsigned long long)a->user_data,
				ret);
			for (int c = 0; c < K.outputs; c++)
				fprintf(stderr, " %d", K.pending[c]);
			for (uint32_t o = 0; o < a->count_objs; o++) { /* each object and what it sets */
				fprintf(stderr, "; obj %u", objs[o]);
				for (uint32_t j = 0; j < counts[o]; j++, at++)
					if (props[at] > 0 && props[at] < P_COUNT)
						fprintf(stderr, " %s=%lld", PROPS[props[at]].name,
							(long long)vals[at]);
			}
			fprintf(stderr, "\n");
		}
		return ret;
	}
	default: {
		static int warned;
		if (!warned++)
			fprintf(stderr, "fakedrm: ioctl %#lx is not faked (ENOTTY)\n", req);
		return -ENOTTY;
	}
	}
}

/* ---- the interposed calls -------------------------------------------------------------------- */

static int is_ours(const char *path)
{
	const char *want = getenv("FAKEDRM_PATH");
	return want && path && strcmp(path, want) == 0;
}

static int open_card(int flags)
{
	int p[2];
	pthread_mutex_lock(&K.lock);
	if (K.fd >= 0) {
		pthread_mutex_unlock(&K.lock);
		return fail(EBUSY); /* one opener at a time: enough for one compositor */
	}
	if (pipe2(p, O_CLOEXEC | (flags & O_NONBLOCK)) < 0) {
		pthread_mutex_unlock(&K.lock);
		return -1;
	}
	fcntl(p[1], F_SETFL, O_NONBLOCK);
	fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
	const char *n = getenv("FAKEDRM_OUTPUTS"), *d = getenv("FAKEDRM_DELAY_US"),
		   *pi = getenv("FAKEDRM_PRIME_IMPORT");
	K.outputs = n ? atoi(n) : 4;
	if (K.outputs < 1 || K.outputs > MAX_OUT)
		K.outputs = 4;
	K.delay_ns = (d ? strtoull(d, NULL, 10) : 1000) * 1000ull;
	const char *t = getenv("FAKEDRM_TICK_US");
	K.tick_ns = (t && strtoull(t, NULL, 10) ? strtoull(t, NULL, 10) : 4000) * 1000ull;
	K.prime_import = pi ? atoi(pi) != 0 : 1;
	K.trace = getenv("FAKEDRM_TRACE") != NULL;
	K.fd = p[0];
	K.wfd = p[1];
	K.master = 1; /* the first opener becomes master, as with a real card */
	if (K.devnull < 0)
		K.devnull = real_open("/dev/null", O_RDWR | O_CLOEXEC);
	if (!K.thread_started) {
		pthread_condattr_t attr; /* deadlines are CLOCK_MONOTONIC, like the events' times */
		pthread_condattr_init(&attr);
		pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
		pthread_cond_init(&K.cond, &attr);
		pthread_condattr_destroy(&attr);
		pthread_create(&K.thread, NULL, kernel_thread, NULL);
		pthread_setname_np(K.thread, "fakekms");
		K.thread_started = 1;
	}
	int fd = K.fd;
	pthread_mutex_unlock(&K.lock);
	return fd;
}

int open(const char *path, int flags, ...)
{
	va_list ap;
	va_start(ap, flags);
	mode_t m = (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0;
	va_end(ap);
	resolve();
	if (is_ours(path))
		return open_card(flags);
	return real_open(path, flags, m);
}

int open64(const char *path, int flags, ...) __attribute__((alias("open")));

int openat(int dirfd, const char *path, int flags, ...)
{
	va_list ap;
	va_start(ap, flags);
	mode_t m = (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0;
	va_end(ap);
	resolve();
	if (is_ours(path))
		return open_card(flags);
	return real_openat(dirfd, path, flags, m);
}

int openat64(int dirfd, const char *path, int flags, ...) __attribute__((alias("openat")));

ssize_t readlink(const char *path, char *buf, size_t size)
{
	static const char vfio[] = "anon_inode:[vfio-device]";
	const char *vgpu;
	int fd;
	char end;

	resolve();
	if (sscanf(path, "/proc/self/fd/%d%c", &fd, &end) == 1 && is_vgpu(fd, &vgpu)) {
		size_t n = sizeof(vfio) - 1 < size ? sizeof(vfio) - 1 : size;

		memcpy(buf, vfio, n);
		return (ssize_t)n;
	}
	return real_readlink(path, buf, size);
}

int close(int fd)
{
	resolve();
	pthread_mutex_lock(&K.lock);
	if (fd >= 0 && fd == K.fd) {
		real_close(K.wfd);
		K.fd = K.wfd = -1;
		K.qlen = 0;
		memset(K.pending, 0, sizeof(K.pending));
	}
	pthread_mutex_unlock(&K.lock);
	return real_close(fd);
}

int ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	va_start(ap, req);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	resolve();
	const char *vgpu;
	if (fd >= 0 && (req >> 8 & 0xff) == VFIO_TYPE_CHAR && is_vgpu(fd, &vgpu))
		return vgpu_ioctl(fd, vgpu, req, arg);
	if (fd < 0 || fd != K.fd)
		return real_ioctl(fd, req, arg);
	pthread_mutex_lock(&K.lock);
	int ret = handle(req, arg);
	if (ret == 0)
		switch (req) {
		case DRM_IOCTL_MODE_ADDFB2:
		case DRM_IOCTL_MODE_RMFB:
		case DRM_IOCTL_MODE_CREATE_DUMB:
		case DRM_IOCTL_MODE_DESTROY_DUMB:
		case DRM_IOCTL_GEM_CLOSE:
		case DRM_IOCTL_PRIME_FD_TO_HANDLE:
		case DRM_IOCTL_MODE_CREATEPROPBLOB:
		case DRM_IOCTL_MODE_DESTROYPROPBLOB:
			write_stats();
			break;
		}
	pthread_mutex_unlock(&K.lock);
	return ret < 0 ? fail(-ret) : ret;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	resolve();
	if (fd < 0 || fd != K.fd)
		return real_mmap(addr, len, prot, flags, fd, off);
	pthread_mutex_lock(&K.lock);
	struct gem *g = find_gem((uint32_t)((uint64_t)off >> 32));
	int memfd = g && g->memfd >= 0 && len <= g->size ? g->memfd : -1;
	pthread_mutex_unlock(&K.lock);
	if (memfd < 0) {
		errno = EINVAL;
		return MAP_FAILED;
	}
	return real_mmap(addr, len, prot, flags, memfd, 0);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) __attribute__((alias("mmap")));
