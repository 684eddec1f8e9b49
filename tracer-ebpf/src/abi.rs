//! Records in the ring buffer, keys and values of the maps, and the probes' configuration.
//!
//! Layout rules: every record starts with [`Header`]; fields are ordered largest first and padded
//! explicitly so the layout is the same on every target; sizes are checked at compile time below.
//! Timestamps are `bpf_ktime_get_ns()` (`CLOCK_MONOTONIC` nanoseconds).

/// Most payload bytes copied from one socket read/write; the full byte count is always reported.
/// A power of two: the probes mask offsets and lengths with it for the verifier.
pub const CAPTURE_MAX: usize = 4096;
/// Most bytes copied from one read of a request on a server connection, in records of up to
/// [`CAPTURE_MAX`] ([`DATA_FLAG_MORE`], [`DATA_FLAG_CONT`]): heads with large cookies or tokens,
/// and bodies whose metadata comes after the prompt.
pub const REQUEST_CAPTURE_MAX: usize = 65_536;
/// iovec segments walked per readv/writev/recvmsg/sendmsg (`bpf_loop` in the probe): the
/// kernel's own limit (`UIO_MAXIOV`), so every segment that can carry bytes is walked. Servers
/// gather a chunk's size line, data and CRLF as three (Node ends a stream with 9).
pub const IOV_WALK_MAX: usize = 1024;
/// Bytes of an opened path copied into [`DevOpenEvent`].
pub const PATH_CAPTURE: usize = 128;
/// Longest device-root prefix (e.g. `/dev/nvidia`) the probes compare paths against.
pub const DEV_PREFIX_MAX: usize = 96;
/// Length of a task's `comm`, as in the kernel.
pub const COMM_LEN: usize = 16;
/// Number of slots in the per-CPU statistics array ([`Stat`]).
pub const STAT_SLOTS: u32 = 64;

/// What a ring-buffer record is. Stored in [`Header::kind`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A connection appeared: accept/accept4 (server side) or connect (client side).
    Conn = 1,
    /// Bytes moved on a tracked connection.
    Data = 2,
    /// A tracked connection's fd was closed.
    Close = 3,
    /// A device node under the configured device root was opened.
    DevOpen = 4,
    /// A tracked device fd was closed.
    DevClose = 5,
    /// An ioctl on a tracked device fd returned.
    Ioctl = 6,
    /// A target created a task (process or thread); the child is now a target.
    ProcFork = 7,
    /// A target (or a process whose comm matched) called exec.
    ProcExec = 8,
    /// The last thread of a target process exited.
    ProcExit = 9,
    /// What a target holds on a GPU changed (first use of a device, a compute context created
    /// or destroyed, a GPU registered with UVM): the per-(process, device) counters are
    /// aggregated in the kernel and only these changes are reported.
    Gpu = 10,
    /// A target synchronised with the GPU (stream, event or context) after launching work: the
    /// launches since its previous reported synchronisation, counted in the kernel.
    CudaSync = 11,
}

impl Kind {
    /// Every kind, in discriminant order.
    pub const ALL: [Kind; 11] = [
        Kind::Conn,
        Kind::Data,
        Kind::Close,
        Kind::DevOpen,
        Kind::DevClose,
        Kind::Ioctl,
        Kind::ProcFork,
        Kind::ProcExec,
        Kind::ProcExit,
        Kind::Gpu,
        Kind::CudaSync,
    ];

    /// Decodes a header's kind field.
    pub const fn from_u16(v: u16) -> Option<Kind> {
        match v {
            1 => Some(Kind::Conn),
            2 => Some(Kind::Data),
            3 => Some(Kind::Close),
            4 => Some(Kind::DevOpen),
            5 => Some(Kind::DevClose),
            6 => Some(Kind::Ioctl),
            7 => Some(Kind::ProcFork),
            8 => Some(Kind::ProcExec),
            9 => Some(Kind::ProcExit),
            10 => Some(Kind::Gpu),
            11 => Some(Kind::CudaSync),
            _ => None,
        }
    }

    /// Short lowercase name for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Conn => "conn",
            Kind::Data => "data",
            Kind::Close => "close",
            Kind::DevOpen => "dev_open",
            Kind::DevClose => "dev_close",
            Kind::Ioctl => "ioctl",
            Kind::ProcFork => "fork",
            Kind::ProcExec => "exec",
            Kind::ProcExit => "exit",
            Kind::Gpu => "gpu",
            Kind::CudaSync => "cuda_sync",
        }
    }

    /// Slot of this kind's "emitted" counter in the statistics array.
    pub const fn emitted_stat(self) -> u32 {
        self as u32
    }

    /// Slot of this kind's "dropped (ring buffer full)" counter in the statistics array.
    pub const fn dropped_stat(self) -> u32 {
        16 + self as u32
    }
}

/// The syscall that produced a record (and that a stashed entry belongs to).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Syscall {
    Accept = 1,
    Accept4 = 2,
    Connect = 3,
    Read = 4,
    Readv = 5,
    Recvfrom = 6,
    Recvmsg = 7,
    Write = 8,
    Writev = 9,
    Sendto = 10,
    Sendmsg = 11,
    Close = 12,
    Openat = 13,
    Ioctl = 14,
    Socket = 15,
    /// `dup`, `dup2`, `dup3`, `fcntl(F_DUPFD*)`: a second fd for a tracked connection.
    Dup = 16,
    /// OpenSSL's `SSL_read`/`SSL_read_ex` returning (a uprobe, not a syscall): plaintext read
    /// from a TLS connection.
    SslRead = 17,
    /// `SSL_write`/`SSL_write_ex` returning: plaintext written to a TLS connection.
    SslWrite = 18,
}

impl Syscall {
    /// Decodes a record's syscall field.
    pub const fn from_u8(v: u8) -> Option<Syscall> {
        match v {
            1 => Some(Syscall::Accept),
            2 => Some(Syscall::Accept4),
            3 => Some(Syscall::Connect),
            4 => Some(Syscall::Read),
            5 => Some(Syscall::Readv),
            6 => Some(Syscall::Recvfrom),
            7 => Some(Syscall::Recvmsg),
            8 => Some(Syscall::Write),
            9 => Some(Syscall::Writev),
            10 => Some(Syscall::Sendto),
            11 => Some(Syscall::Sendmsg),
            12 => Some(Syscall::Close),
            13 => Some(Syscall::Openat),
            14 => Some(Syscall::Ioctl),
            15 => Some(Syscall::Socket),
            16 => Some(Syscall::Dup),
            17 => Some(Syscall::SslRead),
            18 => Some(Syscall::SslWrite),
            _ => None,
        }
    }

    /// The syscall's name as the kernel spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Syscall::Accept => "accept",
            Syscall::Accept4 => "accept4",
            Syscall::Connect => "connect",
            Syscall::Read => "read",
            Syscall::Readv => "readv",
            Syscall::Recvfrom => "recvfrom",
            Syscall::Recvmsg => "recvmsg",
            Syscall::Write => "write",
            Syscall::Writev => "writev",
            Syscall::Sendto => "sendto",
            Syscall::Sendmsg => "sendmsg",
            Syscall::Close => "close",
            Syscall::Openat => "openat",
            Syscall::Ioctl => "ioctl",
            Syscall::Socket => "socket",
            Syscall::Dup => "dup",
            Syscall::SslRead => "SSL_read",
            Syscall::SslWrite => "SSL_write",
        }
    }

    /// Whether bytes flow into the process (a read) for this syscall.
    pub const fn is_inbound(self) -> bool {
        matches!(
            self,
            Syscall::Read
                | Syscall::Readv
                | Syscall::Recvfrom
                | Syscall::Recvmsg
                | Syscall::SslRead
        )
    }

    /// Whether the bytes are a TLS connection's plaintext, seen in the TLS library.
    pub const fn is_plaintext(self) -> bool {
        matches!(self, Syscall::SslRead | Syscall::SslWrite)
    }
}

/// Statistics slots other than the per-kind emitted/dropped counters (see [`Kind::emitted_stat`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A syscall's entry arguments could not be stashed for its exit (map full).
    StashFull = 40,
    /// A new connection could not be tracked (connection map full).
    ConnTableFull = 41,
    /// A device fd could not be tracked (device-fd map full).
    DevTableFull = 42,
    /// A socket payload was longer than the capture limit (counted, not a loss: the full byte
    /// count is still reported).
    CaptureTruncated = 43,
    /// Copying user memory failed (page not resident, bad pointer).
    UserReadFailed = 44,
    /// An iovec array had more segments than the probe walks.
    IovTruncated = 45,
    /// A forked task could not be added to the target map.
    TargetTableFull = 46,
    /// Records emitted with a forced wakeup because the ring buffer was filling up.
    ForcedWakeups = 47,
    /// A per-(process, device) GPU counter entry could not be created (map full).
    GpuTableFull = 48,
    /// An RM object handle could not be remembered (map full): a later free of it is not seen.
    HandleTableFull = 49,
    /// Ioctls on NVIDIA fds the probes decoded (RM alloc/free, UVM register/unregister).
    IoctlsDecoded = 50,
    /// CUDA synchronisations with nothing launched since the process's previous reported one
    /// (counted, not reported).
    CudaSyncEmpty = 51,
    /// A process's CUDA launch counters could not be created (map full): its launches are lost.
    CudaTableFull = 52,
    /// An accept that was in progress when the probes attached (a server idle in a blocking
    /// `accept`): its connection is followed without its listener and address.
    AcceptEntryUnseen = 53,
    /// An OpenSSL read or write whose socket is not known (a memory BIO, or a call served from
    /// the library's buffer on a connection it had before the probes attached): its plaintext
    /// is not seen.
    TlsNoSocket = 54,
}

impl Stat {
    /// Every counter, in slot order.
    pub const ALL: [Stat; 15] = [
        Stat::StashFull,
        Stat::ConnTableFull,
        Stat::DevTableFull,
        Stat::CaptureTruncated,
        Stat::UserReadFailed,
        Stat::IovTruncated,
        Stat::TargetTableFull,
        Stat::ForcedWakeups,
        Stat::GpuTableFull,
        Stat::HandleTableFull,
        Stat::IoctlsDecoded,
        Stat::CudaSyncEmpty,
        Stat::CudaTableFull,
        Stat::AcceptEntryUnseen,
        Stat::TlsNoSocket,
    ];

    /// The counter's name in reports and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::StashFull => "stash_full",
            Stat::ConnTableFull => "conn_table_full",
            Stat::DevTableFull => "dev_table_full",
            Stat::CaptureTruncated => "capture_truncated",
            Stat::UserReadFailed => "user_read_failed",
            Stat::IovTruncated => "iov_truncated",
            Stat::TargetTableFull => "target_table_full",
            Stat::ForcedWakeups => "forced_wakeups",
            Stat::GpuTableFull => "gpu_table_full",
            Stat::HandleTableFull => "handle_table_full",
            Stat::IoctlsDecoded => "ioctls_decoded",
            Stat::CudaSyncEmpty => "cuda_sync_empty",
            Stat::CudaTableFull => "cuda_table_full",
            Stat::AcceptEntryUnseen => "accept_entry_unseen",
            Stat::TlsNoSocket => "tls_no_socket",
        }
    }
}

/// `Header::flags` bit on a [`Kind::Data`] record: the read returned 0 (peer closed its side).
pub const DATA_FLAG_EOF: u16 = 1;
/// `Header::flags` bit on a [`Kind::Data`] record: an IPC connection between service members
/// ([`ROLE_IPC`]): timing, direction and length only, never payload.
pub const DATA_FLAG_IPC: u16 = 2;
/// `Header::flags` bit on a [`Kind::Data`] record: more of the same syscall's bytes follow, in
/// records flagged [`DATA_FLAG_CONT`] from the same thread.
pub const DATA_FLAG_MORE: u16 = 4;
/// `Header::flags` bit on a [`Kind::Data`] record: a continuation of the previous record of the
/// same connection and thread; [`DataHead::offset`] places its bytes.
pub const DATA_FLAG_CONT: u16 = 8;
/// `Header::flags` bit on a [`Kind::ProcExec`] record: the process became a target by its comm.
pub const EXEC_FLAG_COMM_MATCH: u16 = 1;
/// `Header::flags` bit on a [`Kind::ProcExit`] record: a followed thread ended (`pid` is its
/// thread id), not a process. Lets userspace forget what the thread's creation added.
pub const EXIT_FLAG_THREAD: u16 = 1;

/// First bytes of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `bpf_ktime_get_ns()` at the syscall's exit (or at the event).
    pub ts_ns: u64,
    /// Process id (tgid) of the caller.
    pub tgid: u32,
    /// Thread id of the caller.
    pub tid: u32,
    /// A [`Kind`] discriminant.
    pub kind: u16,
    /// Kind-specific flag bits.
    pub flags: u16,
    pub pad: u32,
}

/// [`Kind::Conn`]: a connection the probes now follow.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnEvent {
    pub hdr: Header,
    /// Connection generation: unique per (tgid, fd) lifetime, so fd reuse is never confused.
    pub conn_id: u64,
    /// The connection's fd.
    pub fd: i32,
    /// The listening fd for accept; -1 for connect.
    pub listen_fd: i32,
    /// Peer address family (`AF_INET`, `AF_INET6`, `AF_UNIX`), 0 when the caller passed no
    /// address buffer.
    pub family: u16,
    /// Peer port, host byte order (0 for `AF_UNIX` or unknown).
    pub port: u16,
    /// A [`Syscall`] discriminant.
    pub syscall: u8,
    pub pad: [u8; 3],
    /// Peer address: IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
}

/// Fixed part of a [`Kind::Data`] record; `cap_len` payload bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DataHead {
    pub hdr: Header,
    pub conn_id: u64,
    /// Bytes the syscall moved (its return value), whatever was captured.
    pub total_len: u64,
    pub fd: i32,
    /// Payload bytes that follow this struct (≤ [`CAPTURE_MAX`]).
    pub cap_len: u32,
    /// A [`Syscall`] discriminant.
    pub syscall: u8,
    pub pad1: u8,
    /// iovec segments walked (0 for plain buffers).
    pub iov_segs: u16,
    /// Where the captured bytes start among those the syscall moved (non-zero only in a
    /// continuation, [`DATA_FLAG_CONT`]).
    pub offset: u32,
}

/// [`Kind::Close`] and [`Kind::DevClose`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CloseEvent {
    pub hdr: Header,
    /// Connection generation (0 for device fds).
    pub conn_id: u64,
    pub fd: i32,
    pub pad: u32,
}

/// [`Kind::DevOpen`]: a path under the device root was opened.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DevOpenEvent {
    pub hdr: Header,
    pub fd: i32,
    /// `openat` flags.
    pub flags: i32,
    /// Bytes of `path` used (without the NUL).
    pub path_len: u32,
    pub pad: u32,
    pub path: [u8; PATH_CAPTURE],
}

/// [`Kind::Ioctl`]: an ioctl on a tracked device fd.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoctlEvent {
    pub hdr: Header,
    /// The syscall's return value.
    pub ret: i64,
    /// The third argument (usually a user pointer to the parameter block).
    pub arg: u64,
    pub fd: i32,
    /// The request number as passed.
    pub cmd: u32,
}

/// [`Kind::Gpu`]: a change in what a process holds on a GPU.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GpuEvent {
    pub hdr: Header,
    /// Ioctls the process issued on `dev` so far (the kernel's per-(process, device) counter;
    /// for context and UVM events, on the fd the ioctl came through).
    pub ioctls: u64,
    /// What changed: one of the `GPU_*` constants.
    pub what: u32,
    /// [`GPU_FIRST_USE`]: the fd's device code (`DEV_*` or a GPU minor number);
    /// [`GPU_CONTEXT_UP`] / [`GPU_CONTEXT_DOWN`]: the RM device instance (`NV0080`'s `deviceId`);
    /// [`GPU_CLIENT_FREED`]: the freed client handle.
    pub dev: u32,
    /// Live compute contexts of the process on the RM device after the change.
    pub contexts: u32,
    /// The RM class allocated or freed (context events), 0 otherwise.
    pub class: u32,
    /// GPU UUID bytes ([`GPU_UVM_REGISTER`] / [`GPU_UVM_UNREGISTER`]).
    pub uuid: [u8; 16],
}

/// First ioctl of a process on a device fd's device.
pub const GPU_FIRST_USE: u32 = 1;
/// The process's first live compute object on an RM device: it runs work on that GPU.
pub const GPU_CONTEXT_UP: u32 = 2;
/// The process's last compute object on an RM device was freed.
pub const GPU_CONTEXT_DOWN: u32 = 3;
/// The process registered a GPU (by UUID) with UVM.
pub const GPU_UVM_REGISTER: u32 = 4;
/// The process unregistered a GPU from UVM.
pub const GPU_UVM_UNREGISTER: u32 = 5;
/// The process freed an RM client: every object under it (its contexts too) is gone.
pub const GPU_CLIENT_FREED: u32 = 6;

/// [`Kind::CudaSync`]: a synchronisation after launches (one engine step, roughly).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CudaSyncEvent {
    pub hdr: Header,
    /// Kernel launches (`cuLaunchKernel*`, `cuLaunchCooperativeKernel`) since the previous
    /// reported synchronisation of the process.
    pub launches: u32,
    /// CUDA graph launches (`cuGraphLaunch*`) in the same span.
    pub graph_launches: u32,
    /// What was synchronised: one of the `CUDA_SYNC_*` constants.
    pub sync: u8,
    pub pad: [u8; 7],
}

/// [`CudaSyncEvent::sync`]: `cuStreamSynchronize`.
pub const CUDA_SYNC_STREAM: u8 = 1;
/// [`CudaSyncEvent::sync`]: `cuEventSynchronize`.
pub const CUDA_SYNC_EVENT: u8 = 2;
/// [`CudaSyncEvent::sync`]: `cuCtxSynchronize`.
pub const CUDA_SYNC_CONTEXT: u8 = 3;

/// Per-process launch counters since its last reported synchronisation (kept in the kernel,
/// keyed by tgid; removed by userspace when the process exits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaCounts {
    pub launches: u32,
    pub graph_launches: u32,
}

/// Device code of `nvidiactl` (its minor number).
pub const DEV_CTL: u32 = 255;
/// Device code of `nvidia-modeset` (its minor number).
pub const DEV_MODESET: u32 = 254;
/// Device code of `nvidia-uvm`.
pub const DEV_UVM: u32 = 256;
/// Device code of any other node under the prefix (`nvidia-uvm-tools`, `nvidia-caps`...).
pub const DEV_OTHER: u32 = 511;
/// Highest GPU minor number (`/dev/nvidia0`..`/dev/nvidia247`).
pub const GPU_MINOR_MAX: u32 = 247;
/// [`GpuKey::dev`] of the counters kept per RM device instance (plus the instance).
pub const RM_DEV_BASE: u32 = 0x1000;

/// Key of the per-(process, device) GPU counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GpuKey {
    pub tgid: u32,
    /// A device code (`DEV_*` or GPU minor) or `RM_DEV_BASE + instance`.
    pub dev: u32,
}

/// Per-(process, device) GPU counters, kept in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GpuUse {
    /// Ioctls issued.
    pub ioctls: u64,
    /// Ioctls that failed (syscall error or RM status).
    pub errors: u64,
    /// Time of the last ioctl.
    pub last_ns: u64,
    /// Live compute objects (RM device entries only).
    pub contexts: u32,
    pub pad: u32,
}

/// Key of the RM object table: an object handle within a client of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HandleKey {
    pub tgid: u32,
    pub client: u32,
    pub handle: u32,
    pub pad: u32,
}

/// [`HandleKey`] value bit: the object is a compute object counted in [`GpuUse::contexts`].
pub const HANDLE_COUNTED: u32 = 0x8000_0000;

/// Key of the UVM registration table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UvmKey {
    pub tgid: u32,
    pub pad: u32,
    pub uuid: [u8; 16],
}

/// `ProbeConfig::flags` bit: also report every ioctl on a device fd ([`Kind::Ioctl`]).
pub const CONFIG_IOCTL_EVENTS: u32 = 1;
/// `ProbeConfig::flags` bit: the device nodes are stand-in files (an emulated host), whose
/// ioctls fail with `ENOTTY`; decode them as if they had succeeded.
pub const CONFIG_STANDIN_DEVICES: u32 = 2;
/// `ProbeConfig::flags` bit: follow targets' Unix-socket connections as IPC ([`ROLE_IPC`]).
pub const CONFIG_IPC: u32 = 4;

/// [`Kind::ProcFork`], [`Kind::ProcExec`] and [`Kind::ProcExit`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    pub hdr: Header,
    /// Fork: the new task's id; exec/exit: the process id.
    pub pid: u32,
    /// Fork: the parent's tgid; exec/exit: 0.
    pub ppid: u32,
    /// The task's comm after the event.
    pub comm: [u8; COMM_LEN],
}

/// Key of the per-(process, fd) maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FdKey {
    pub tgid: u32,
    pub fd: u32,
}

/// Value of the connection map: a socket the probes copy data from.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnState {
    pub conn_id: u64,
    pub family: u16,
    /// 1 = server side (accepted), 2 = client side (connected), 3 = seeded from /proc,
    /// 4 = IPC between service members (no payload captured), 5 = a Unix socket its first
    /// bytes will tell (`ROLE_*`).
    pub role: u8,
    pub pad: [u8; 5],
}

/// Connection accepted by the target.
pub const ROLE_SERVER: u8 = 1;
/// Connection the target opened.
pub const ROLE_CLIENT: u8 = 2;
/// Connection found in /proc at attach time.
pub const ROLE_SEEDED: u8 = 3;
/// A Unix-socket connection between service members (made by a target after attach, or seeded
/// from service discovery): its data records carry timing, direction and length, no payload.
pub const ROLE_IPC: u8 = 4;
/// A Unix-socket connection a target accepted or made, not yet known to be IPC or HTTP (a
/// proxy calling its engine over a Unix socket): its first bytes decide, in the kernel, and it
/// becomes [`ROLE_SERVER`]/[`ROLE_CLIENT`] (payload captured) or [`ROLE_IPC`].
pub const ROLE_UNIX_UNDECIDED: u8 = 5;

/// An OpenSSL read or write in progress on a thread (uprobe at entry → uretprobe).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SslCall {
    /// The `SSL *`.
    pub ssl: u64,
    /// The caller's buffer.
    pub buf: u64,
    /// `_ex` variants: where the library writes the byte count; 0 for `SSL_read`/`SSL_write`.
    pub len_ptr: u64,
    /// The socket under it, once known (-1 before).
    pub fd: i64,
    /// A [`Syscall`] discriminant: `SslRead` or `SslWrite`.
    pub syscall: u8,
    pub pad: [u8; 7],
}

/// A process's `SSL *` (key of the socket each one was last seen reading or writing).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SslKey {
    pub tgid: u32,
    pub pad: u32,
    pub ssl: u64,
}

/// A syscall's entry arguments, kept per thread until its exit.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Stash {
    /// First argument (the fd, or `dfd` for openat).
    pub fd: i64,
    /// Buffer / iovec / msghdr / sockaddr / filename pointer.
    pub ptr: u64,
    /// Length, iovec count, addrlen pointer, ioctl arg or open flags.
    pub arg: u64,
    /// Connection generation for socket I/O.
    pub conn_id: u64,
    /// A [`Syscall`] discriminant.
    pub syscall: u8,
    /// The connection's role (socket I/O; `ROLE_*`), 0 otherwise.
    pub role: u8,
    pub pad: [u8; 6],
}

/// Target map value bits: why a process is traced.
pub const TARGET_PID: u32 = 1;
/// Listens on a configured port.
pub const TARGET_PORT: u32 = 2;
/// Matched a configured comm.
pub const TARGET_COMM: u32 = 4;
/// In a configured cgroup (found at attach time).
pub const TARGET_CGROUP: u32 = 8;
/// Forked from a target (followed in the kernel).
pub const TARGET_CHILD: u32 = 16;
/// An IPC peer of a target (same service: found by service discovery in userspace).
pub const TARGET_PEER: u32 = 32;
/// Its OpenSSL is probed (`tls.rs`): its socket reads are remembered per thread, for libraries
/// that hand OpenSSL the bytes through a memory BIO. Set by userspace with the uprobes.
pub const TARGET_TLS: u32 = 64;

/// The probes' configuration, a global the loader overrides before loading.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    /// The daemon's own tgid: never traced.
    pub self_tgid: u32,
    /// Non-zero when the cgroup map holds targets (saves a helper call when it does not).
    pub filter_cgroup: u32,
    /// Non-zero when the comm map holds targets.
    pub filter_comm: u32,
    /// Payload bytes to copy per socket syscall (≤ [`CAPTURE_MAX`]).
    pub capture_bytes: u32,
    /// Ring-buffer fill level (bytes) above which records force a consumer wakeup.
    pub wakeup_bytes: u64,
    /// Bytes of `dev_prefix` in use (0 disables device tracking).
    pub dev_prefix_len: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// Opened paths starting with this prefix are device fds (e.g. `/dev/nvidia`).
    pub dev_prefix: [u8; DEV_PREFIX_MAX],
    /// Bytes to copy per read of a server connection (requests), in records of up to
    /// `capture_bytes` (≤ [`REQUEST_CAPTURE_MAX`]).
    pub request_capture_bytes: u32,
    pub pad: u32,
}

impl ProbeConfig {
    /// The configuration compiled into the object (no target, nothing captured).
    pub const DEFAULT: ProbeConfig = ProbeConfig {
        self_tgid: 0,
        filter_cgroup: 0,
        filter_comm: 0,
        capture_bytes: CAPTURE_MAX as u32,
        wakeup_bytes: 0,
        dev_prefix_len: 0,
        flags: 0,
        dev_prefix: [0; DEV_PREFIX_MAX],
        request_capture_bytes: CAPTURE_MAX as u32,
        pad: 0,
    };
}

/// Byte offset of the payload in a [`Kind::Data`] record.
pub const DATA_HEAD_LEN: usize = size_of::<DataHead>();

const _: () = {
    assert!(size_of::<Header>() == 24);
    assert!(size_of::<ConnEvent>() == 64);
    assert!(size_of::<DataHead>() == 56);
    assert!(size_of::<CloseEvent>() == 40);
    assert!(size_of::<DevOpenEvent>() == 40 + PATH_CAPTURE);
    assert!(size_of::<IoctlEvent>() == 48);
    assert!(size_of::<ProcEvent>() == 48);
    assert!(size_of::<GpuEvent>() == 64);
    assert!(size_of::<CudaSyncEvent>() == 40);
    assert!(size_of::<CudaCounts>() == 8);
    assert!(size_of::<GpuUse>() == 32);
    assert!(size_of::<UvmKey>() == 24);
    assert!(size_of::<Stash>() == 40);
    assert!(size_of::<ConnState>() == 16);
    assert!(CAPTURE_MAX.is_power_of_two());
    assert!((Kind::CudaSync as u32) < 16);
    assert!(Kind::CudaSync.dropped_stat() < Stat::StashFull as u32);
    assert!((Stat::CudaTableFull as u32) < STAT_SLOTS);
};

#[cfg(feature = "user")]
mod pod {
    //! `aya::Pod` marks types userspace may copy in and out of maps and globals.
    use super::{ConnState, CudaCounts, FdKey, GpuKey, GpuUse, ProbeConfig, Stash, UvmKey};

    // SAFETY: plain `#[repr(C)]` data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for FdKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProbeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GpuKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GpuUse {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UvmKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CudaCounts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Stash {}
}
