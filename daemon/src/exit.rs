//! Process exit codes, documented in README.md ("Exit codes"). The unit file's
//! RestartPreventExitStatus= lists the ones a restart cannot fix.

/// Clean exit, including a drained shutdown on SIGTERM or SIGINT.
pub const OK: u8 = 0;
/// An unexpected internal error.
pub const SOFTWARE: u8 = 70;
/// Bad command line or configuration (sysexits EX_USAGE). Not restarted.
pub const CONFIG: u8 = 64;
/// Input data is unusable (e.g. `airgate model inspect` on a file that is no model).
pub const DATA: u8 = 65;
/// A listener could not be bound or adopted (address in use, bad passed socket).
pub const UNAVAILABLE: u8 = 69;
/// The state directory cannot be created or used.
pub const CANT_CREATE: u8 = 73;
/// Reading a store failed part-way (sysexits EX_IOERR).
pub const IO: u8 = 74;
/// A client command could not reach or was refused by the daemon.
pub const NO_DAEMON: u8 = 75;
/// The audit chain does not verify, or an export met damaged records. Not restarted.
pub const AUDIT_BROKEN: u8 = 76;
