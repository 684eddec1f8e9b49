//! Decoding ring-buffer records into typed events.
//!
//! The probes and this module share `tracer_ebpf::abi`; a record that is shorter than its kind
//! says, or of an unknown kind, is an error the caller counts (never a panic).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::Serialize;
use tracer_ebpf::abi::{
    self, CloseEvent, ConnEvent, CudaSyncEvent, DATA_FLAG_CONT, DATA_FLAG_EOF, DATA_FLAG_IPC,
    DATA_FLAG_MORE, DATA_HEAD_LEN, DataHead, DevOpenEvent, EXEC_FLAG_COMM_MATCH, GpuEvent, Header,
    IoctlEvent, Kind, ProcEvent, Syscall,
};

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the record's fixed part.
    #[error("{kind} record of {len} bytes, need {need}")]
    Short {
        kind: &'static str,
        len: usize,
        need: usize,
    },
    /// The header names no known kind (probe/daemon version mismatch or corruption).
    #[error("unknown record kind {0}")]
    UnknownKind(u16),
    /// The record names no known syscall.
    #[error("unknown syscall {0} in a {1} record")]
    UnknownSyscall(u8, &'static str),
    /// A CUDA synchronisation record names no known synchronisation.
    #[error("unknown CUDA synchronisation {0}")]
    UnknownCudaSync(u8),
}

/// A decoded record: who, when, what.
#[derive(Debug, Clone, Serialize)]
pub struct Event<'a> {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub ts_ns: u64,
    /// Process id.
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    #[serde(flatten)]
    pub body: Body<'a>,
}

/// The kind-specific part of an [`Event`].
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body<'a> {
    /// A new connection (accept: server side; connect: client side).
    Conn {
        conn_id: u64,
        fd: i32,
        /// The listening socket for accept, `None` for connect.
        listen_fd: Option<i32>,
        #[serde(serialize_with = "ser_syscall")]
        syscall: Syscall,
        /// Address family as the kernel numbers it (2 = IPv4, 10 = IPv6, 1 = Unix, 0 = unknown).
        family: u16,
        /// The peer's address, when the caller passed a buffer for it and it is IP.
        peer: Option<SocketAddr>,
    },
    /// Bytes moved on a connection.
    Data {
        conn_id: u64,
        fd: i32,
        #[serde(serialize_with = "ser_syscall")]
        syscall: Syscall,
        /// Bytes flowed into the process.
        inbound: bool,
        /// Bytes the syscall moved.
        total_len: u64,
        /// A read returned 0: the peer closed its side.
        eof: bool,
        /// iovec segments walked.
        iov_segs: u16,
        /// An IPC connection between service members: no payload is captured.
        ipc: bool,
        /// More of this syscall's bytes follow in continuation records.
        more: bool,
        /// A continuation: `payload` continues the previous record of the connection at
        /// `offset` (its `total_len` is the syscall's, already counted).
        cont: bool,
        /// Where `payload` starts among the bytes the syscall moved.
        offset: u32,
        /// The first bytes moved (up to the capture limit); shown as lossy UTF-8 in JSON.
        #[serde(serialize_with = "ser_lossy")]
        payload: &'a [u8],
    },
    /// A connection's fd was closed.
    Close { conn_id: u64, fd: i32 },
    /// A device node under the device root was opened.
    DevOpen { fd: i32, flags: i32, path: String },
    /// A device fd was closed.
    DevClose { fd: i32 },
    /// An ioctl on a device fd.
    Ioctl {
        fd: i32,
        cmd: u32,
        ret: i64,
        arg: u64,
    },
    /// A target created a task, now followed.
    Fork {
        child: u32,
        parent: u32,
        comm: String,
    },
    /// A target called exec (or became one by its name).
    Exec {
        pid: u32,
        comm: String,
        comm_match: bool,
    },
    /// A target process ended (`thread`: a followed thread of a target, `pid` its thread id).
    Exit {
        pid: u32,
        comm: String,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        thread: bool,
    },
    /// What the process holds on a GPU changed.
    Gpu {
        #[serde(flatten)]
        change: GpuChange,
        /// Ioctls the process has issued on the device so far.
        ioctls: u64,
    },
    /// The process synchronised with the GPU after launching work (an engine step's end).
    CudaSync {
        /// Kernel launches since its previous reported synchronisation.
        launches: u32,
        /// CUDA graph launches in the same span.
        graph_launches: u32,
        /// What it waited for.
        sync: CudaSyncKind,
    },
}

/// What a CUDA synchronisation waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CudaSyncKind {
    /// `cuStreamSynchronize`: one stream.
    Stream,
    /// `cuEventSynchronize`: an event recorded on a stream.
    Event,
    /// `cuCtxSynchronize`: everything in the context.
    Context,
}

impl CudaSyncKind {
    /// From the probes' `CUDA_SYNC_*` code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            abi::CUDA_SYNC_STREAM => Some(Self::Stream),
            abi::CUDA_SYNC_EVENT => Some(Self::Event),
            abi::CUDA_SYNC_CONTEXT => Some(Self::Context),
            _ => None,
        }
    }
}

/// A change in what a process holds on a GPU, as the probes aggregate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum GpuChange {
    /// First ioctl on a device node: a GPU minor number, or `nvidiactl`/`nvidia-uvm`/other.
    FirstUse { node: DeviceNode },
    /// First live compute object on an RM device instance: work runs on that GPU.
    ContextUp { instance: u32, class: u32 },
    /// The last compute object on an RM device instance was freed.
    ContextDown { instance: u32 },
    /// A GPU registered with UVM (CUDA does this for every GPU a context uses).
    UvmRegister { uuid: String },
    /// A GPU unregistered from UVM.
    UvmUnregister { uuid: String },
    /// An RM client was freed: every context under it is gone.
    ClientFreed { client: u32 },
    /// A code this build does not know (newer probes).
    Unknown { what: u32 },
}

/// An NVIDIA device node, from its name under the device root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceNode {
    /// `nvidia<minor>`: one GPU.
    Gpu(u32),
    /// `nvidiactl`.
    Ctl,
    /// `nvidia-uvm`.
    Uvm,
    /// `nvidia-modeset`.
    Modeset,
    /// Anything else under the prefix.
    Other,
}

impl DeviceNode {
    /// From the probes' device code.
    pub fn from_code(code: u32) -> Self {
        match code {
            abi::DEV_CTL => DeviceNode::Ctl,
            abi::DEV_UVM => DeviceNode::Uvm,
            abi::DEV_MODESET => DeviceNode::Modeset,
            m if m <= abi::GPU_MINOR_MAX => DeviceNode::Gpu(m),
            _ => DeviceNode::Other,
        }
    }
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, the form NVML and nvidia-smi print.
pub fn uuid_string(b: &[u8; 16]) -> String {
    use std::fmt::Write as _;
    let mut s = String::from("GPU-");
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{byte:02x}");
    }
    s
}

/// Syscalls appear in JSON by the name the kernel gives them.
#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with passes a reference"
)]
fn ser_syscall<S: serde::Serializer>(sc: &Syscall, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(sc.name())
}

fn ser_lossy<S: serde::Serializer>(payload: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(payload))
}

impl Body<'_> {
    /// The record kind this body came from.
    pub fn kind(&self) -> Kind {
        match self {
            Body::Conn { .. } => Kind::Conn,
            Body::Data { .. } => Kind::Data,
            Body::Close { .. } => Kind::Close,
            Body::DevOpen { .. } => Kind::DevOpen,
            Body::DevClose { .. } => Kind::DevClose,
            Body::Ioctl { .. } => Kind::Ioctl,
            Body::Fork { .. } => Kind::ProcFork,
            Body::Exec { .. } => Kind::ProcExec,
            Body::Exit { .. } => Kind::ProcExit,
            Body::Gpu { .. } => Kind::Gpu,
            Body::CudaSync { .. } => Kind::CudaSync,
        }
    }
}

/// Reads a `T` from the front of `bytes` if it is long enough.
fn read<T: Copy>(bytes: &[u8], kind: Kind) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            kind: kind.name(),
            len: bytes.len(),
            need,
        });
    }
    // SAFETY: length checked; every T here is #[repr(C)] plain data valid for any bit pattern.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn syscall(v: u8, kind: Kind) -> Result<Syscall, DecodeError> {
    Syscall::from_u8(v).ok_or(DecodeError::UnknownSyscall(v, kind.name()))
}

fn peer(family: u16, port: u16, addr: &[u8; 16]) -> Option<SocketAddr> {
    let ip = match family {
        2 => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        10 => IpAddr::V6(Ipv6Addr::from(*addr)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    if bytes.len() < size_of::<Header>() {
        return Err(DecodeError::Short {
            kind: "header",
            len: bytes.len(),
            need: size_of::<Header>(),
        });
    }
    // SAFETY: length checked above; Header is plain data.
    let hdr: Header = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Header>()) };
    let kind = Kind::from_u16(hdr.kind).ok_or(DecodeError::UnknownKind(hdr.kind))?;
    let body = match kind {
        Kind::Conn => {
            let ev: ConnEvent = read(bytes, kind)?;
            Body::Conn {
                conn_id: ev.conn_id,
                fd: ev.fd,
                listen_fd: (ev.listen_fd >= 0).then_some(ev.listen_fd),
                syscall: syscall(ev.syscall, kind)?,
                family: ev.family,
                peer: peer(ev.family, ev.port, &ev.addr),
            }
        }
        Kind::Data => {
            let head: DataHead = read(bytes, kind)?;
            let sc = syscall(head.syscall, kind)?;
            let cap = (head.cap_len as usize).min(abi::CAPTURE_MAX);
            let need = DATA_HEAD_LEN + cap;
            let payload = bytes.get(DATA_HEAD_LEN..need).ok_or(DecodeError::Short {
                kind: kind.name(),
                len: bytes.len(),
                need,
            })?;
            Body::Data {
                conn_id: head.conn_id,
                fd: head.fd,
                syscall: sc,
                inbound: sc.is_inbound(),
                total_len: head.total_len,
                eof: hdr.flags & DATA_FLAG_EOF != 0,
                iov_segs: head.iov_segs,
                ipc: hdr.flags & DATA_FLAG_IPC != 0,
                more: hdr.flags & DATA_FLAG_MORE != 0,
                cont: hdr.flags & DATA_FLAG_CONT != 0,
                offset: head.offset,
                payload,
            }
        }
        Kind::Close | Kind::DevClose => {
            let ev: CloseEvent = read(bytes, kind)?;
            if kind == Kind::Close {
                Body::Close {
                    conn_id: ev.conn_id,
                    fd: ev.fd,
                }
            } else {
                Body::DevClose { fd: ev.fd }
            }
        }
        Kind::DevOpen => {
            let ev: DevOpenEvent = read(bytes, kind)?;
            let n = (ev.path_len as usize).min(ev.path.len());
            Body::DevOpen {
                fd: ev.fd,
                flags: ev.flags,
                path: String::from_utf8_lossy(&ev.path[..n]).into_owned(),
            }
        }
        Kind::Ioctl => {
            let ev: IoctlEvent = read(bytes, kind)?;
            Body::Ioctl {
                fd: ev.fd,
                cmd: ev.cmd,
                ret: ev.ret,
                arg: ev.arg,
            }
        }
        Kind::Gpu => {
            let ev: GpuEvent = read(bytes, kind)?;
            let change = match ev.what {
                abi::GPU_FIRST_USE => GpuChange::FirstUse {
                    node: DeviceNode::from_code(ev.dev),
                },
                abi::GPU_CONTEXT_UP => GpuChange::ContextUp {
                    instance: ev.dev,
                    class: ev.class,
                },
                abi::GPU_CONTEXT_DOWN => GpuChange::ContextDown { instance: ev.dev },
                abi::GPU_UVM_REGISTER => GpuChange::UvmRegister {
                    uuid: uuid_string(&ev.uuid),
                },
                abi::GPU_UVM_UNREGISTER => GpuChange::UvmUnregister {
                    uuid: uuid_string(&ev.uuid),
                },
                abi::GPU_CLIENT_FREED => GpuChange::ClientFreed { client: ev.dev },
                what => GpuChange::Unknown { what },
            };
            Body::Gpu {
                change,
                ioctls: ev.ioctls,
            }
        }
        Kind::CudaSync => {
            let ev: CudaSyncEvent = read(bytes, kind)?;
            Body::CudaSync {
                launches: ev.launches,
                graph_launches: ev.graph_launches,
                sync: CudaSyncKind::from_code(ev.sync)
                    .ok_or(DecodeError::UnknownCudaSync(ev.sync))?,
            }
        }
        Kind::ProcFork | Kind::ProcExec | Kind::ProcExit => {
            let ev: ProcEvent = read(bytes, kind)?;
            let comm = cstr(&ev.comm);
            match kind {
                Kind::ProcFork => Body::Fork {
                    child: ev.pid,
                    parent: ev.ppid,
                    comm,
                },
                Kind::ProcExec => Body::Exec {
                    pid: ev.pid,
                    comm,
                    comm_match: hdr.flags & EXEC_FLAG_COMM_MATCH != 0,
                },
                _ => Body::Exit {
                    pid: ev.pid,
                    comm,
                    thread: hdr.flags & abi::EXIT_FLAG_THREAD != 0,
                },
            }
        }
    };
    Ok(Event {
        ts_ns: hdr.ts_ns,
        tgid: hdr.tgid,
        tid: hdr.tid,
        body,
    })
}

#[cfg(test)]
mod tests;
