"""cffi builder for compositor._native: libdrm's KMS API (what the Python KMS layer calls) plus our
own helpers in kms_helpers.c. API mode: the C compiler checks every declaration against Debian's
libdrm headers, and struct layouts come from the headers, not from us."""

from __future__ import annotations

import os
import subprocess
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = r"""
typedef struct _drmVersion {
    int version_major; int version_minor; int version_patchlevel;
    int name_len; char *name; int date_len; char *date; int desc_len; char *desc;
} drmVersion;
drmVersion *drmGetVersion(int fd);
void drmFreeVersion(drmVersion *v);
int drmGetCap(int fd, uint64_t capability, uint64_t *value);
int drmSetClientCap(int fd, uint64_t capability, uint64_t value);
int drmSetMaster(int fd);
int drmDropMaster(int fd);
int drmIsMaster(int fd);
int drmPrimeHandleToFD(int fd, uint32_t handle, uint32_t flags, int *prime_fd);
int drmPrimeFDToHandle(int fd, int prime_fd, uint32_t *handle);
int drmCloseBufferHandle(int fd, uint32_t handle);

#define DRM_CLOEXEC ...
#define DRM_RDWR ...
#define DRM_CAP_DUMB_BUFFER ...
#define DRM_CAP_PRIME ...
#define DRM_PRIME_CAP_IMPORT ...
#define DRM_PRIME_CAP_EXPORT ...
#define DRM_CAP_CURSOR_WIDTH ...
#define DRM_CAP_CURSOR_HEIGHT ...
#define DRM_CAP_ADDFB2_MODIFIERS ...
#define DRM_CAP_TIMESTAMP_MONOTONIC ...
#define DRM_CAP_CRTC_IN_VBLANK_EVENT ...
#define DRM_CLIENT_CAP_UNIVERSAL_PLANES ...
#define DRM_CLIENT_CAP_ATOMIC ...
#define DRM_CLIENT_CAP_WRITEBACK_CONNECTORS ...

#define DRM_MODE_OBJECT_CRTC ...
#define DRM_MODE_OBJECT_CONNECTOR ...
#define DRM_MODE_OBJECT_ENCODER ...
#define DRM_MODE_OBJECT_PLANE ...
#define DRM_MODE_PROP_RANGE ...
#define DRM_MODE_PROP_IMMUTABLE ...
#define DRM_MODE_PROP_ENUM ...
#define DRM_MODE_PROP_BLOB ...
#define DRM_MODE_PROP_BITMASK ...
#define DRM_MODE_PROP_EXTENDED_TYPE ...
#define DRM_MODE_PROP_OBJECT ...
#define DRM_MODE_PROP_SIGNED_RANGE ...
#define DRM_MODE_PROP_ATOMIC ...
#define DRM_MODE_ATOMIC_TEST_ONLY ...
#define DRM_MODE_ATOMIC_NONBLOCK ...
#define DRM_MODE_ATOMIC_ALLOW_MODESET ...
#define DRM_MODE_PAGE_FLIP_EVENT ...
#define DRM_MODE_FB_MODIFIERS ...
#define DRM_MODE_TYPE_PREFERRED ...
#define DRM_MODE_TYPE_DRIVER ...
#define DRM_MODE_TYPE_USERDEF ...

typedef struct _drmModeRes {
    int count_fbs; uint32_t *fbs;
    int count_crtcs; uint32_t *crtcs;
    int count_connectors; uint32_t *connectors;
    int count_encoders; uint32_t *encoders;
    uint32_t min_width, max_width, min_height, max_height;
} drmModeRes;

typedef struct _drmModeModeInfo {
    uint32_t clock;
    uint16_t hdisplay, hsync_start, hsync_end, htotal, hskew;
    uint16_t vdisplay, vsync_start, vsync_end, vtotal, vscan;
    uint32_t vrefresh;
    uint32_t flags;
    uint32_t type;
    char name[...];
} drmModeModeInfo;

typedef int... drmModeConnection;
typedef int... drmModeSubPixel;

typedef struct _drmModeConnector {
    uint32_t connector_id;
    uint32_t encoder_id;
    uint32_t connector_type;
    uint32_t connector_type_id;
    drmModeConnection connection;
    uint32_t mmWidth, mmHeight;
    drmModeSubPixel subpixel;
    int count_modes; drmModeModeInfo *modes;
    int count_props; uint32_t *props; uint64_t *prop_values;
    int count_encoders; uint32_t *encoders;
} drmModeConnector;

typedef struct _drmModeEncoder {
    uint32_t encoder_id; uint32_t encoder_type; uint32_t crtc_id;
    uint32_t possible_crtcs; uint32_t possible_clones;
} drmModeEncoder;

typedef struct _drmModeCrtc {
    uint32_t crtc_id; uint32_t buffer_id;
    uint32_t x, y; uint32_t width, height;
    int mode_valid; drmModeModeInfo mode;
    int gamma_size;
} drmModeCrtc;

typedef struct _drmModePlaneRes { uint32_t count_planes; uint32_t *planes; } drmModePlaneRes;

typedef struct _drmModePlane {
    uint32_t count_formats; uint32_t *formats; uint32_t plane_id;
    uint32_t crtc_id; uint32_t fb_id;
    uint32_t crtc_x, crtc_y; uint32_t x, y;
    uint32_t possible_crtcs; uint32_t gamma_size;
} drmModePlane;

typedef struct _drmModeObjectProperties {
    uint32_t count_props; uint32_t *props; uint64_t *prop_values;
} drmModeObjectProperties;

struct drm_mode_property_enum { uint64_t value; char name[...]; ...; };

typedef struct _drmModeProperty {
    uint32_t prop_id; uint32_t flags; char name[...];
    int count_values; uint64_t *values;
    int count_enums; struct drm_mode_property_enum *enums;
    int count_blobs; uint32_t *blob_ids;
} drmModePropertyRes;

typedef struct _drmModePropertyBlob { uint32_t id; uint32_t length; void *data; } drmModePropertyBlobRes;

drmModeRes *drmModeGetResources(int fd);
void drmModeFreeResources(drmModeRes *ptr);
drmModeConnector *drmModeGetConnector(int fd, uint32_t connector_id);
drmModeConnector *drmModeGetConnectorCurrent(int fd, uint32_t connector_id);
void drmModeFreeConnector(drmModeConnector *ptr);
const char *drmModeGetConnectorTypeName(uint32_t connector_type);
drmModeEncoder *drmModeGetEncoder(int fd, uint32_t encoder_id);
void drmModeFreeEncoder(drmModeEncoder *ptr);
drmModeCrtc *drmModeGetCrtc(int fd, uint32_t crtc_id);
void drmModeFreeCrtc(drmModeCrtc *ptr);
drmModePlaneRes *drmModeGetPlaneResources(int fd);
void drmModeFreePlaneResources(drmModePlaneRes *ptr);
drmModePlane *drmModeGetPlane(int fd, uint32_t plane_id);
void drmModeFreePlane(drmModePlane *ptr);
drmModeObjectProperties *drmModeObjectGetProperties(int fd, uint32_t object_id, uint32_t object_type);
void drmModeFreeObjectProperties(drmModeObjectProperties *ptr);
drmModePropertyRes *drmModeGetProperty(int fd, uint32_t property_id);
void drmModeFreeProperty(drmModePropertyRes *ptr);
drmModePropertyBlobRes *drmModeGetPropertyBlob(int fd, uint32_t blob_id);
void drmModeFreePropertyBlob(drmModePropertyBlobRes *ptr);
int drmModeCreatePropertyBlob(int fd, const void *data, size_t size, uint32_t *id);
int drmModeDestroyPropertyBlob(int fd, uint32_t id);

int drmModeAddFB2(int fd, uint32_t width, uint32_t height, uint32_t pixel_format,
                  const uint32_t bo_handles[4], const uint32_t pitches[4], const uint32_t offsets[4],
                  uint32_t *buf_id, uint32_t flags);
int drmModeAddFB2WithModifiers(int fd, uint32_t width, uint32_t height, uint32_t pixel_format,
                  const uint32_t bo_handles[4], const uint32_t pitches[4], const uint32_t offsets[4],
                  const uint64_t modifier[4], uint32_t *buf_id, uint32_t flags);
int drmModeRmFB(int fd, uint32_t bufferId);
int drmModeDirtyFB(int fd, uint32_t bufferId, void *clips, uint32_t num_clips);

int drmModeCreateDumbBuffer(int fd, uint32_t width, uint32_t height, uint32_t bpp, uint32_t flags,
                            uint32_t *handle, uint32_t *pitch, uint64_t *size);
int drmModeDestroyDumbBuffer(int fd, uint32_t handle);
int drmModeMapDumbBuffer(int fd, uint32_t handle, uint64_t *offset);

typedef struct _drmModeAtomicReq drmModeAtomicReq;
drmModeAtomicReq *drmModeAtomicAlloc(void);
void drmModeAtomicFree(drmModeAtomicReq *req);
int drmModeAtomicAddProperty(drmModeAtomicReq *req, uint32_t object_id, uint32_t property_id,
                             uint64_t value);
int drmModeAtomicCommit(int fd, drmModeAtomicReq *req, uint32_t flags, void *user_data);

struct kms_flip_event { uint32_t crtc_id; uint32_t sequence; uint64_t timestamp_ns; uint64_t user_data; };
typedef void (*kms_log_fn)(int level, const char *message);
void kms_set_logger(kms_log_fn fn);
int kms_atomic_commit(int fd, uint32_t n, const uint32_t *objects, const uint32_t *properties,
                      const uint64_t *values, uint32_t flags, uint64_t user_data);
int kms_flip(int fd, uint32_t plane_id, uint32_t fb_prop_id, uint32_t fb_id, uint64_t user_data);
int kms_drain_events(int fd, struct kms_flip_event *out, int max, int *dropped);
int kms_copy_rows(void *dst, size_t dst_len, size_t dst_offset, size_t dst_pitch,
                  const void *src, size_t src_len, size_t src_offset, size_t src_pitch,
                  size_t height, size_t row_bytes);
extern "Python" void _kms_log_cb(int level, const char *message);

#define FS_MAX_JSON ...
#define FS_RECORD ...
enum fs_kind { FS_JSON, FS_FLIP, FS_PRESENTED, FS_RELEASED };
enum fs_reader { FS_SERVER, FS_CLIENT };
enum fs_error { FS_OK, FS_E_LENGTH, FS_E_KIND, FS_E_RESERVED, FS_E_ID, FS_E_ARGS };
struct fs_record {
    uint32_t kind; uint32_t id; uint64_t frame; uint64_t timestamp_ns; uint64_t sequence;
    uint64_t start; uint32_t offset; uint32_t length;
};
int fs_decode(const uint8_t *buf, size_t len, int version, int reader, struct fs_record *out, int max,
              size_t *used, int *error);
size_t fs_record_size(uint32_t kind);

#define DP_MAX_CARDS ...
#define DP_MAX_OUTPUTS ...
#define DP_MAX_CONNS ...
#define DP_MAX_BUFFERS ...
#define DP_MAX_FDS ...
#define DP_IN_SIZE ...
#define DP_MAX_OUT ...
#define DP_SAMPLES ...
#define DP_TOKEN_BIT ...
enum dp_event_kind { DP_EV_DATA = 1, DP_EV_CLOSED = 2, DP_EV_FLIP = 3, DP_EV_FREED = 4,
                     DP_EV_PRESENTED = 5, DP_EV_ERROR = 6, DP_EV_DRAINED = 7 };
struct dp_event {
    uint32_t kind; int32_t handle; int32_t a; uint32_t card; uint32_t crtc; uint32_t sequence;
    uint64_t timestamp_ns; uint64_t user_data; uint32_t buffer_id; uint64_t frame;
};
struct dp_output_stats {
    uint64_t frames; uint64_t commits; uint64_t presented; uint64_t dropped; uint64_t errors;
    uint64_t busy; uint32_t max_in_flight; uint32_t max_pending; uint32_t in_flight; uint32_t pending;
    uint32_t on_screen_buffer;
    uint64_t on_screen_frame; uint32_t samples; uint32_t commit_delay_ns[...]; uint32_t latency_ns[...];
    uint64_t present_ns[...];
};
struct dp_output_state {
    int32_t on_screen, in_flight, pending;
    uint64_t on_screen_frame, in_flight_frame, pending_frame;
    uint64_t in_flight_token;
    int32_t in_flight_presented, pending_presented;
    int32_t cursor_pending;
    int32_t cursor_committed;
    uint32_t cursor_fb;
};
struct dp;
struct dp *dp_new(void);
int dp_start(struct dp *dp);
void dp_free(struct dp *dp);
int dp_notify_fd(struct dp *dp);
int dp_poll_events(struct dp *dp, struct dp_event *out, int max);
int dp_card_add(struct dp *dp, int fd, int fake_write_fd, uint64_t fake_delay_ns);
int dp_output_add(struct dp *dp, int card, uint32_t crtc_id, uint32_t plane_id, uint32_t fb_prop_id);
int dp_output_show(struct dp *dp, int output, int conn, int on_screen, uint64_t frame);
int dp_output_release(struct dp *dp, int output, struct dp_output_state *state);
#define DP_CURSOR_PROPS 10
int dp_output_cursor(struct dp *dp, int output, uint32_t plane_id, const uint32_t *props,
                     const uint64_t *values);
int dp_output_watch(struct dp *dp, int output, int watch);
int dp_output_remove(struct dp *dp, int output);
int dp_output_stats(struct dp *dp, int output, struct dp_output_stats *out);
int dp_conn_add(struct dp *dp, int fd);
int dp_conn_remove(struct dp *dp, int conn, int *fds, int max_fds);
int dp_conn_take(struct dp *dp, int conn, uint8_t *buf, size_t cap, int *fds, int max_fds, int *nfds,
                 size_t *fds_from, int *flags);
int dp_conn_pause(struct dp *dp, int conn);
int dp_conn_resume(struct dp *dp, int conn, int fast);
int dp_conn_send(struct dp *dp, int conn, const uint8_t *data, size_t len, int drained);
int dp_conn_latest(struct dp *dp, int conn, int *buffer, uint64_t *frame, int *presented);
int dp_conn_show(struct dp *dp, int conn);
int64_t dp_conn_flips(struct dp *dp, int conn);
int dp_conn_set_latest(struct dp *dp, int conn, int buffer, uint64_t frame, uint32_t layout);
int dp_buffer_add(struct dp *dp, int conn, uint32_t id, uint32_t layout);
int dp_buffer_fb(struct dp *dp, int buffer, int output, uint32_t fb_id);
int dp_buffer_forget(struct dp *dp, int buffer);
int dp_buffer_hold(struct dp *dp, int buffer);
int dp_buffer_release(struct dp *dp, int buffer);
int dp_buffer_holds(struct dp *dp, int buffer);
int dp_flip(struct dp *dp, int conn, int buffer, uint64_t frame, uint64_t received_ns);
enum dp_vgpu_why { DP_VGPU_NO_OUTPUT = 1, DP_VGPU_FAILED = 2, DP_VGPU_OFF = 3, DP_VGPU_NEW_BUFFER = 4,
                  DP_VGPU_CURSOR = 5, DP_VGPU_NOT_HERE = 6 };
int dp_vgpu_add(struct dp *dp, int device_fd, uint64_t period_ns, int cursor);
int dp_local_add(struct dp *dp);
int dp_vgpu_set(struct dp *dp, int conn, uint64_t period_ns, int cursor);
int dp_buffer_plane(struct dp *dp, int buffer, uint32_t format, uint64_t modifier, uint32_t width,
                    uint32_t height, uint32_t stride);
"""


def _libdrm_cflags() -> list[str]:
    try:
        out = subprocess.run(["pkg-config", "--cflags-only-I", "libdrm"], capture_output=True, text=True,
                             check=True).stdout
        return [flag[2:] for flag in out.split()]
    except (OSError, subprocess.CalledProcessError):
        return ["/usr/include/libdrm"]


# Warnings are errors in every file of the module: our three sources and the wrapper cffi generates
# (compositor/_native.c) alike. The generated wrapper compiles clean under -Wall -Wextra, so it gets no
# flags of its own, and a warning a newer cffi brought in would fail the build rather than pass unseen.
CFLAGS = ["-std=gnu11", "-pthread", "-Wall", "-Wextra", "-Werror", "-O2"]
# `python native/build.py --sanitize DIR` builds the same module with AddressSanitizer and
# UndefinedBehaviorSanitizer into DIR (for `make sanitize`, which loads it in place of the real one).
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def _relative_join(*parts: str) -> str:
    return os.path.relpath(os.path.join(*parts))


def builder(sanitize: bool = False) -> FFI:
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "compositor._native",
        '#include <fcntl.h>\n#include <xf86drm.h>\n#include <xf86drmMode.h>\n'
        '#include "kms_helpers.h"\n#include "fs_codec.h"\n#include "dataplane.h"\n',
        # setuptools wants paths relative to the project; a build in another directory, absolute ones
        sources=[(os.path.join if sanitize else _relative_join)(HERE, name)
                 for name in ("kms_helpers.c", "fs_codec.c", "dataplane.c")],
        include_dirs=[HERE, *_libdrm_cflags()],
        libraries=["drm"],
        extra_compile_args=CFLAGS + (SANITIZE if sanitize else []),
        extra_link_args=["-pthread", *(SANITIZE if sanitize else [])],
    )
    return ffi


ffibuilder = builder()

if __name__ == "__main__":
    if sys.argv[1:2] == ["--sanitize"] and len(sys.argv) == 3:
        print(builder(sanitize=True).compile(tmpdir=sys.argv[2]))
    elif len(sys.argv) == 1:
        ffibuilder.compile(verbose=True)
    else:
        sys.exit("usage: python native/build.py [--sanitize DIR]")
