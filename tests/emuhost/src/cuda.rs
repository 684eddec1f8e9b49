//! Stand-in CUDA driver calls: the engine `dlopen`s a library exporting `cuLaunchKernel` and
//! `cuStreamSynchronize` (the real `libcuda.so`'s signatures) and calls them once per kernel
//! launch and once per step, so that probes on those symbols see a real engine's rhythm.

use std::ffi::{CStr, CString, c_int, c_uint, c_void};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use anyhow::{Result, bail};

/// `CUresult cuLaunchKernel(CUfunction f, unsigned gx, gy, gz, bx, by, bz, unsigned
/// sharedMem, CUstream s, void** params, void** extra)`.
type LaunchKernel = unsafe extern "C" fn(
    *mut c_void,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    *mut c_void,
    *mut *mut c_void,
    *mut *mut c_void,
) -> c_int;
/// `CUresult cuStreamSynchronize(CUstream s)`.
type StreamSynchronize = unsafe extern "C" fn(*mut c_void) -> c_int;

/// The loaded library and its two entry points; closed on drop.
#[derive(Debug)]
pub struct CudaLib {
    handle: *mut c_void,
    launch: LaunchKernel,
    sync: StreamSynchronize,
}

fn dlerror() -> String {
    // SAFETY: dlerror returns null or a thread-local NUL-terminated string.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".to_owned()
    } else {
        // SAFETY: non-null, NUL-terminated (above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

impl CudaLib {
    /// `dlopen` `path` and resolve both symbols.
    pub fn open(path: &Path) -> Result<Self> {
        let c_path = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: a valid NUL-terminated path; the library's initialisers run, as for CUDA.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            bail!("dlopen {}: {}", path.display(), dlerror());
        }
        let sym = |name: &CStr| -> Result<*mut c_void> {
            // SAFETY: `handle` is a live dlopen handle, `name` NUL-terminated.
            let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
            if p.is_null() {
                bail!("{}: no symbol {name:?}: {}", path.display(), dlerror());
            }
            Ok(p)
        };
        let symbols = sym(c"cuLaunchKernel").and_then(|l| Ok((l, sym(c"cuStreamSynchronize")?)));
        let (launch, sync) = match symbols {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: closing the handle opened above, nothing from it in use.
                unsafe { libc::dlclose(handle) };
                return Err(e);
            }
        };
        // SAFETY: the symbols are the CUDA driver API's functions with these C signatures.
        let (launch, sync) = unsafe {
            (
                std::mem::transmute::<*mut c_void, LaunchKernel>(launch),
                std::mem::transmute::<*mut c_void, StreamSynchronize>(sync),
            )
        };
        Ok(Self {
            handle,
            launch,
            sync,
        })
    }

    /// Launch `n` (null) kernels on the default stream; returns how many did not return 0.
    pub fn launch_kernels(&self, n: u32) -> u32 {
        let mut failed = 0;
        for _ in 0..n {
            // SAFETY: the stand-in ignores its arguments; null function, stream and parameter
            // arrays are what it expects.
            let rc = unsafe {
                (self.launch)(
                    std::ptr::null_mut(),
                    1,
                    1,
                    1,
                    128,
                    1,
                    1,
                    0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if rc != 0 {
                failed += 1;
            }
        }
        failed
    }

    /// Wait for the default stream (the end of the step's compute); returns the `CUresult`.
    pub fn synchronize(&self) -> c_int {
        // SAFETY: a null stream is the default stream.
        unsafe { (self.sync)(std::ptr::null_mut()) }
    }
}

impl Drop for CudaLib {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen and its functions are no longer called.
        unsafe { libc::dlclose(self.handle) };
    }
}
