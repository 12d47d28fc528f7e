/* The fault server's wire protocol (docs/fault-server.md), shared by the C client library and the
 * server. Plain C: a SOCK_SEQPACKET Unix socket carries one message per packet, descriptors ride
 * along as SCM_RIGHTS. Every message starts with struct pm_hdr; all fields are little-endian
 * host-order integers of fixed size (client and server run on the same machine). */
#ifndef PAGEMIRROR_PM_PROTO_H
#define PAGEMIRROR_PM_PROTO_H

#include <stdint.h>

#define PM_PROTO_MAGIC 0x53464d50u /* "PMFS" */
#define PM_PROTO_VERSION 1u

/* Bounds the server enforces: a message larger, a count larger or more descriptors end the
 * connection (a client cannot make the server allocate or hold more than this per message). */
#define PM_MAX_RANGES 64u           /* ranges in one REGISTER */
#define PM_MAX_CLIENT_RANGES 1024u  /* ranges one client may have registered at once */
#define PM_MAX_FDS (1u + PM_MAX_RANGES)
#define PM_MAX_POOL_PAGES (1u << 20) /* 4 GiB of 4 KiB pages */

enum pm_msg_type {
  PM_MSG_HELLO = 1,      /* client -> server: version, pid, the pool (fd: pool memfd, optional) */
  PM_MSG_REGISTER = 2,   /* client -> server: ranges; fds: [uffd (first REGISTER only)], memfds */
  PM_MSG_UNREGISTER = 3, /* client -> server: ranges (addr, len) to forget; pooled pages come home */
  PM_MSG_BYE = 4,        /* client -> server: stop serving me; the server replies, then closes */
  PM_MSG_REPLY = 0x80    /* server -> client: error (0 or -errno) for the message with that seq */
};

struct pm_hdr {
  uint32_t magic;   /* PM_PROTO_MAGIC */
  uint16_t version; /* PM_PROTO_VERSION */
  uint16_t type;    /* enum pm_msg_type */
  uint32_t size;    /* bytes of the whole message, this header included */
  uint32_t seq;     /* chosen by the client; the reply echoes it */
};

#define PM_HELLO_POOL 1u /* a pool memfd is attached (the only descriptor of a HELLO) */

struct pm_hello {
  struct pm_hdr h;
  uint32_t pid;        /* must be the peer's pid as SO_PEERCRED reports it */
  uint32_t flags;      /* PM_HELLO_* */
  uint64_t features;   /* the UFFD_FEATURE_* mask the client negotiated on its userfaultfd */
  uint32_t pool_pages; /* slots in the pool (0 without PM_HELLO_POOL), <= PM_MAX_POOL_PAGES */
  uint32_t page_size;  /* the client's base page size: must equal the server's */
};

/* Register modes, as UFFDIO_REGISTER_MODE_* (MISSING 1, WP 2, MINOR 4). */
#define PM_MODE_MISSING 1u
#define PM_MODE_WP 2u
#define PM_MODE_MINOR 4u

struct pm_range {
  uint64_t addr;     /* page aligned, in the client's address space */
  uint64_t len;      /* page aligned, > 0, addr + len within the user address space */
  uint32_t modes;    /* PM_MODE_* the client registered the range with, non-zero */
  int32_t fd_index;  /* -1: private anonymous memory; else the index among this message's memfds */
  uint64_t offset;   /* shared memory: the range's offset in its memfd (page aligned) */
};

#define PM_REG_UFFD 1u /* the first descriptor is the client's userfaultfd */

struct pm_register { /* REGISTER and UNREGISTER */
  struct pm_hdr h;
  uint32_t count; /* 1..PM_MAX_RANGES; size == sizeof(struct pm_register) + count * sizeof(struct pm_range) */
  uint32_t flags; /* PM_REG_* (REGISTER only) */
  /* struct pm_range ranges[count] follows */
};

struct pm_reply {
  struct pm_hdr h;
  int32_t error;  /* 0, or -errno: why the message was refused */
  uint32_t value; /* message specific (REGISTER: ranges now registered) */
};

/* The pool: one memfd the client creates, seals against shrinking and shares in HELLO. The server
 * keeps pages it takes away from the client's shared memory ("migrated to device memory") there,
 * so the client can still reach them if the server dies. Layout: a table, then the slots.
 *   table: struct pm_pool_header, then uint64_t entry[pool_pages]; entry[i] is the client address
 *          of the page slot i holds, 0 when free.
 *   slots: pool_pages pages, starting at pm_pool_table_bytes().
 * Ordering that makes a kill at any instant lose nothing (the server's side):
 *   take away: write-protect the page, copy it into a free slot, store entry[slot] = address,
 *              punch the page out of the client's memfd, lift the write protection.
 *   bring back: UFFDIO_COPY the slot into the client's page, then store entry[slot] = 0.
 * So whenever the client's memfd holds the page, that copy is current; when it has a hole there,
 * the slot named by an entry is. The client's watchdog restores exactly the entries whose page is a
 * hole. */
struct pm_pool_header {
  uint32_t magic; /* PM_PROTO_MAGIC */
  uint32_t version;
  uint32_t pool_pages;
  uint32_t page_size;
};

static inline uint64_t pm_pool_table_bytes(uint64_t pool_pages, uint64_t page) {
  uint64_t t = sizeof(struct pm_pool_header) + pool_pages * 8u;
  return (t + page - 1) / page * page;
}
static inline uint64_t pm_pool_bytes(uint64_t pool_pages, uint64_t page) {
  return pm_pool_table_bytes(pool_pages, page) + pool_pages * page;
}

/* One packet with nfds descriptors (SCM_RIGHTS, at most 80), MSG_NOSIGNAL | flags; 0 or -errno.
 * In the client library (the demo and fuzz programs use it too). */
#include <stddef.h>
#ifdef __cplusplus
extern "C"
#endif
int pm_send_packet(int sock, const void *buf, size_t len, const int *fds, int nfds, int flags);

#endif
