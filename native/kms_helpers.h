/* directflip native helpers: what the KMS layer does per flip, in C.
 *
 * Python resolves every object and property id once; these functions only pack ids and values into
 * an atomic request, submit it, and drain the DRM event queue. Errors come back as negative errno
 * values, never through the C errno of a later call. */
#ifndef DIRECTFLIP_KMS_HELPERS_H
#define DIRECTFLIP_KMS_HELPERS_H

#include <stdint.h>

struct kms_flip_event {
	uint32_t crtc_id;
	uint32_t sequence;
	uint64_t timestamp_ns; /* CLOCK_MONOTONIC, as the kernel reports it */
	uint64_t user_data;
};

/* Logging hook: level uses Python's logging numbers (10 debug ... 40 error). */
typedef void (*kms_log_fn)(int level, const char *message);
void kms_set_logger(kms_log_fn fn);

/* Build one atomic request from n (object, property, value) triples and commit it with flags.
 * Returns 0 or -errno. */
int kms_atomic_commit(int fd, uint32_t n, const uint32_t *objects, const uint32_t *properties,
		      const uint64_t *values, uint32_t flags, uint64_t user_data);

/* The per-flip hot path: point one plane at a new framebuffer, nonblocking, with a page-flip event
 * carrying user_data. Returns 0 or -errno (-EBUSY: a flip is still pending on that CRTC). */
int kms_flip(int fd, uint32_t plane_id, uint32_t fb_prop_id, uint32_t fb_id, uint64_t user_data);

/* Read what is queued on the DRM fd (one read, as drmHandleEvent does) and store page-flip events
 * in out[0..max). Returns how many were stored, or -errno. Events beyond max are counted in
 * *dropped (never silently lost). Vblank events are ignored: nothing here requests them. */
int kms_drain_events(int fd, struct kms_flip_event *out, int max, int *dropped);

#endif
