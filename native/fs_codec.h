/* directflip: the frame socket's wire format, version 2 (docs/frame-socket.md).
 *
 * Every message starts with a 32-bit little-endian word W:
 *   1 <= W <= FS_MAX_JSON        a JSON message of W bytes follows (versions 1 and 2);
 *   W = FS_RECORD | kind         a fixed-size binary record of that kind follows (version 2 only).
 * The bytes come from guests (or, on the client's side, from the compositor): fs_decode checks
 * every word and every record before it reports it, and never reads outside buf[0..len). */
#ifndef DIRECTFLIP_FS_CODEC_H
#define DIRECTFLIP_FS_CODEC_H

#include <stddef.h>
#include <stdint.h>

#define FS_MAX_JSON 65536u
#define FS_RECORD 0x80000000u

/* Record kinds (W's low byte; bits 8..30 are zero). */
enum fs_kind {
	FS_JSON = 0,      /* not a record: a JSON message, body at buf[offset .. offset + length) */
	FS_FLIP = 1,      /* client -> server: u32 id, u64 frame                         (12 bytes) */
	FS_PRESENTED = 2, /* server -> client: u32 id, u32 zero, u64 frame, u64 timestamp_ns,
			   *                   u64 sequence                                 (32 bytes) */
	FS_RELEASED = 3,  /* server -> client: u32 id                                     (4 bytes) */
};

/* Which side reads: the records each may receive. */
enum fs_reader { FS_SERVER = 0, FS_CLIENT = 1 };

enum fs_error {
	FS_OK = 0,
	FS_E_LENGTH = 1,   /* a JSON length of 0 or over FS_MAX_JSON (any W in version 1 with bit 31) */
	FS_E_KIND = 2,     /* a record kind this side does not receive, or unknown */
	FS_E_RESERVED = 3, /* bits 8..30 of a record's word, or a reserved field, not zero */
	FS_E_ID = 4,       /* buffer id 0 */
	FS_E_ARGS = 5,     /* the caller's arguments (NULL pointers, unknown version or reader) */
};

struct fs_record {
	uint32_t kind;  /* enum fs_kind */
	uint32_t id;    /* FLIP, PRESENTED, RELEASED */
	uint64_t frame; /* FLIP, PRESENTED */
	uint64_t timestamp_ns;
	uint64_t sequence;
	uint64_t start;  /* offset in buf of the message's first byte (its word) */
	uint32_t offset; /* JSON: offset in buf of the body */
	uint32_t length; /* JSON: the body's length */
};

/* Decode the complete messages at the start of buf[0..len) into out[0..max), for protocol `version`
 * (1 or 2) as read by `reader`. Returns how many it stored and sets *used to the bytes they took: a
 * message cut short at the end of buf is left for the next call (with more bytes). *error is FS_OK,
 * or the reason the message at buf[*used] is malformed; the messages before it are good. */
int fs_decode(const uint8_t *buf, size_t len, int version, int reader, struct fs_record *out, int max,
	      size_t *used, int *error);

/* The size of a record of `kind` after its word, or 0 for none. */
size_t fs_record_size(uint32_t kind);

#endif
