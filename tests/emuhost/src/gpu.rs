//! The NVIDIA driver calls a CUDA process makes, against stand-in device nodes.
//!
//! The nodes under the device root are regular files, so every ioctl fails with `ENOTTY`;
//! that is expected: the point is that the syscalls happen (tracer's probes watch `openat` of
//! `<root>/nvidia*` and ioctls on those fds), with the request numbers and parameter blocks a
//! real process would pass.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tracer_emugpu::GpuSpec;

/// `NV_ESC_RM_ALLOC`: `_IOWR('F', 0x2B, NVOS64_PARAMETERS)`.
pub const RM_ALLOC: u32 = 0xC030_462B;
/// `NV_ESC_RM_CONTROL`: `_IOWR('F', 0x2A, NVOS54_PARAMETERS)`.
pub const RM_CONTROL: u32 = 0xC020_462A;
/// `NV_ESC_RM_FREE`: `_IOWR('F', 0x29, NVOS00_PARAMETERS)`.
pub const RM_FREE: u32 = 0xC010_4629;
/// `UVM_INITIALIZE` (raw request number; UVM does not use `_IOC`).
pub const UVM_INITIALIZE: u32 = 0x3000_0001;
/// `UVM_REGISTER_GPU`.
pub const UVM_REGISTER_GPU: u32 = 37;
/// `UVM_UNREGISTER_GPU`.
pub const UVM_UNREGISTER_GPU: u32 = 38;

/// `NV01_ROOT_CLIENT`.
pub const CLASS_CLIENT: u32 = 0x0;
/// `NV01_DEVICE_0`.
pub const CLASS_DEVICE: u32 = 0x80;
/// `NV20_SUBDEVICE_0`.
pub const CLASS_SUBDEVICE: u32 = 0x2080;
/// `HOPPER_CHANNEL_GPFIFO_A`.
pub const CLASS_CHANNEL: u32 = 0xC86F;
/// `HOPPER_COMPUTE_A`.
pub const CLASS_COMPUTE: u32 = 0xCBC0;

/// `NV2080_CTRL_CMD_GPU_GET_NAME_STRING`, the control issued on each GPU fd.
const CTRL_GPU_GET_NAME_STRING: u32 = 0x2080_0110;

/// `NVOS64_PARAMETERS` (48 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Nvos64 {
    h_root: u32,
    h_object_parent: u32,
    h_object_new: u32,
    h_class: u32,
    p_alloc_parms: u64,
    p_rights_requested: u64,
    params_size: u32,
    flags: u32,
    status: u32,
    _pad: u32,
}

/// `NVOS54_PARAMETERS` (32 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Nvos54 {
    h_client: u32,
    h_object: u32,
    cmd: u32,
    flags: u32,
    params: u64,
    params_size: u32,
    status: u32,
}

/// `NVOS00_PARAMETERS` (16 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Nvos00 {
    h_root: u32,
    h_object_parent: u32,
    h_object_old: u32,
    status: u32,
}

/// `UVM_INITIALIZE_PARAMS`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UvmInitialize {
    flags: u64,
    rm_status: u32,
    _pad: u32,
}

/// `UVM_REGISTER_GPU_PARAMS` (40 bytes); starts with the GPU UUID.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UvmRegisterGpu {
    gpu_uuid: [u8; 16],
    numa_enabled: u8,
    _pad: [u8; 3],
    numa_node_id: i32,
    rm_ctrl_fd: i32,
    h_client: u32,
    h_smc_part_ref: u32,
    rm_status: u32,
}

/// `UVM_UNREGISTER_GPU_PARAMS`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UvmUnregisterGpu {
    gpu_uuid: [u8; 16],
    rm_status: u32,
}

const _: () = assert!(size_of::<Nvos64>() == 48);
const _: () = assert!(size_of::<Nvos54>() == 32);
const _: () = assert!(size_of::<Nvos00>() == 16);
const _: () = assert!(size_of::<UvmRegisterGpu>() == 40);

/// The 16 bytes of a `GPU-xxxxxxxx-xxxx-…` UUID (its 32 hex digits).
pub fn uuid_bytes(uuid: &str) -> [u8; 16] {
    let digits: Vec<u8> = uuid
        .trim_start_matches("GPU-")
        .chars()
        .filter_map(|c| c.to_digit(16))
        .map(|d| d as u8)
        .collect();
    let mut out = [0u8; 16];
    for (i, pair) in digits.chunks(2).take(16).enumerate() {
        out[i] = (pair[0] << 4) | pair.get(1).copied().unwrap_or(0);
    }
    out
}

/// Issue `request` on `fd` with `arg` as the parameter block. Failures (`ENOTTY` on the
/// stand-in files) are expected and ignored; the result is returned for logging.
fn ioctl<T>(fd: &File, request: u32, arg: &mut T) -> i32 {
    // SAFETY: `arg` is a valid, writable parameter block of the size encoded in `request`
    // (or the size UVM expects); the fd is open. On regular files the kernel rejects the
    // request without touching the buffer.
    unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::Ioctl::from(request),
            std::ptr::from_mut(arg),
        )
    }
}

/// Handles of one GPU's RM objects.
#[derive(Debug, Clone, Copy)]
struct GpuHandles {
    device: u32,
    subdevice: u32,
    channel: u32,
    compute: u32,
}

/// The open device nodes and RM objects of an engine process. Dropping it (or
/// [`GpuSession::close`]) frees the objects and closes the fds.
#[derive(Debug)]
pub struct GpuSession {
    ctl: File,
    uvm: File,
    gpus: Vec<File>,
    uuids: Vec<[u8; 16]>,
    client: u32,
    handles: Vec<GpuHandles>,
    closed: bool,
}

/// Open `path` read-write like the driver's user-space does. A missing node is replaced by a
/// regular stand-in file, created under another name and renamed into place so that the only
/// `openat` of the node's own path is the real one.
fn open_node(path: &Path) -> Result<File> {
    if !path.exists() {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(
            ".standin-{}.{}",
            name.unwrap_or_default(),
            std::process::id()
        ));
        File::create(&tmp).with_context(|| format!("create stand-in {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("create stand-in {}", path.display()))?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

impl GpuSession {
    /// Open `<root>/nvidiactl`, `<root>/nvidia-uvm` and `<root>/nvidia<minor>` for each GPU
    /// and issue the initialisation ioctls.
    pub fn open(root: &Path, specs: &[GpuSpec]) -> Result<Self> {
        let node = |name: &str| -> PathBuf { root.join(name) };
        let ctl = open_node(&node("nvidiactl"))?;
        let client = 0xC1D0_0000 | (std::process::id() & 0xFFFF);
        let alloc = |parent: u32, new: u32, class: u32, params: &mut [u8]| {
            let mut p = Nvos64 {
                h_root: client,
                h_object_parent: parent,
                h_object_new: new,
                h_class: class,
                p_alloc_parms: params.as_mut_ptr() as u64,
                params_size: params.len() as u32,
                ..Nvos64::default()
            };
            ioctl(&ctl, RM_ALLOC, &mut p);
        };
        alloc(client, client, CLASS_CLIENT, &mut [0u8; 8]);
        let uvm = open_node(&node("nvidia-uvm"))?;
        let mut init = UvmInitialize::default();
        ioctl(&uvm, UVM_INITIALIZE, &mut init);

        let mut gpus = Vec::new();
        let mut uuids = Vec::new();
        let mut handles = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let idx = i as u32;
            let file = open_node(&node(&format!("nvidia{}", spec.minor)))?;
            let h = GpuHandles {
                device: 0xCAF0_0000 | (idx << 8) | 0x01,
                subdevice: 0xCAF0_0000 | (idx << 8) | 0x02,
                channel: 0xCAF0_0000 | (idx << 8) | 0x03,
                compute: 0xCAF0_0000 | (idx << 8) | 0x04,
            };
            // NV0080_ALLOC_PARAMETERS starts with deviceId; NV2080_ALLOC_PARAMETERS with
            // subDeviceId.
            let mut dev_params = [0u8; 56];
            dev_params[..4].copy_from_slice(&idx.to_le_bytes());
            alloc(client, h.device, CLASS_DEVICE, &mut dev_params);
            let mut sub_params = [0u8; 4];
            alloc(h.device, h.subdevice, CLASS_SUBDEVICE, &mut sub_params);
            let mut ctrl_params = [0u8; 128];
            let mut ctrl = Nvos54 {
                h_client: client,
                h_object: h.subdevice,
                cmd: CTRL_GPU_GET_NAME_STRING,
                params: ctrl_params.as_mut_ptr() as u64,
                params_size: ctrl_params.len() as u32,
                ..Nvos54::default()
            };
            ioctl(&file, RM_CONTROL, &mut ctrl);
            let mut chan_params = [0u8; 256];
            alloc(h.device, h.channel, CLASS_CHANNEL, &mut chan_params);
            let mut compute_params = [0u8; 16];
            alloc(h.channel, h.compute, CLASS_COMPUTE, &mut compute_params);
            let uuid = uuid_bytes(&spec.uuid);
            let mut reg = UvmRegisterGpu {
                gpu_uuid: uuid,
                numa_node_id: -1,
                rm_ctrl_fd: ctl.as_raw_fd(),
                h_client: client,
                ..UvmRegisterGpu::default()
            };
            ioctl(&uvm, UVM_REGISTER_GPU, &mut reg);
            gpus.push(file);
            uuids.push(uuid);
            handles.push(h);
        }
        Ok(Self {
            ctl,
            uvm,
            gpus,
            uuids,
            client,
            handles,
            closed: false,
        })
    }

    /// Free the RM objects (children first), unregister the GPUs from UVM, close the fds.
    pub fn close(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        for uuid in &self.uuids {
            let mut p = UvmUnregisterGpu {
                gpu_uuid: *uuid,
                rm_status: 0,
            };
            ioctl(&self.uvm, UVM_UNREGISTER_GPU, &mut p);
        }
        let client = self.client;
        for h in self.handles.iter().rev() {
            for (parent, obj) in [
                (h.channel, h.compute),
                (h.device, h.channel),
                (h.device, h.subdevice),
                (client, h.device),
            ] {
                let mut p = Nvos00 {
                    h_root: client,
                    h_object_parent: parent,
                    h_object_old: obj,
                    status: 0,
                };
                ioctl(&self.ctl, RM_FREE, &mut p);
            }
        }
        let mut p = Nvos00 {
            h_root: client,
            h_object_parent: client,
            h_object_old: client,
            status: 0,
        };
        ioctl(&self.ctl, RM_FREE, &mut p);
        // The files close when `self` is dropped; close the per-GPU ones now.
        self.gpus.clear();
    }
}

impl Drop for GpuSession {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_bytes_from_hex() {
        let spec = GpuSpec::h100(1);
        let b = uuid_bytes(&spec.uuid);
        assert_eq!(b[..4], [0xe3, 0xa0, 0x00, 0x01]);
        assert_eq!(b[4..6], [0x7a, 0xce]);
    }

    #[test]
    fn request_numbers_match_the_ioc_encoding() {
        let iowr = |nr: u32, size: u32| (3u32 << 30) | (size << 16) | (u32::from(b'F') << 8) | nr;
        assert_eq!(RM_ALLOC, iowr(0x2B, 48));
        assert_eq!(RM_CONTROL, iowr(0x2A, 32));
        assert_eq!(RM_FREE, iowr(0x29, 16));
    }
}
