// File leases for mirrors (F_SETLEASE F_WRLCK): when another process opens or truncates a leased
// file, the kernel holds that process back and signals us; a native thread revokes the device's
// access, writes back and releases the lease (Mirror::break_lease), within the lease-break time.
//
// The signal (a real-time signal, set per descriptor with F_SETSIG) is caught by a handler that
// only writes the descriptor number to a pipe: no JavaScript and no lock runs in signal context,
// and which thread the kernel picks to deliver it does not matter.
#pragma once

namespace pm::engine {

class Mirror;

class Leases {
 public:
  // Takes the lease on fd for m. Errors: -EAGAIN (the file is open elsewhere, or mapped writable
  // by another process), -EACCES (not the file's owner and no CAP_LEASE), -EINVAL (file system
  // without leases), those of pipe/sigaction/thread creation.
  static int add(Mirror* m, int fd);
  // Forgets m (its lease is released by the caller). Waits for a break of m in progress.
  static void remove(Mirror* m);
  static int signal_number();
};

}  // namespace pm::engine
