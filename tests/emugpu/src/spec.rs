//! Static identity of an emulated GPU.

use serde::{Deserialize, Serialize};

/// PCI buses of the eight GPUs of an HGX H100 board, used for the default bus ids.
const HGX_BUSES: [u8; 8] = [0x1A, 0x40, 0x53, 0x66, 0x9C, 0xC0, 0xD2, 0xE4];

/// The identity and power envelope of one emulated GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSpec {
    /// NVML index (position in the state file).
    pub index: u32,
    /// `GPU-` followed by 36 characters (8-4-4-4-12 hex digits), as NVML prints it.
    pub uuid: String,
    /// Marketing name; the emulated ones say so.
    pub name: String,
    /// Minor number: `/dev/nvidia<minor>`.
    pub minor: u32,
    /// Bus id as NVML's `busId`: `"00000000:1A:00.0"` (domain:bus:device.function).
    pub pci_bus_id: String,
    /// `pciDeviceId`: device id in the upper 16 bits, vendor id (0x10DE) in the lower.
    pub pci_device_id: u32,
    /// `pciSubSystemId`.
    pub pci_subsystem_id: u32,
    /// Total frame-buffer memory in bytes.
    pub memory_total_bytes: u64,
    /// Power drawn when nothing runs, in watts.
    pub idle_w: f64,
    /// Power limit, in watts.
    pub max_w: f64,
    /// Value of the total-energy counter (mJ) when the state file is created: real counters
    /// count from driver load, so consumers must work with differences.
    pub energy_offset_mj: u64,
}

impl GpuSpec {
    /// An emulated H100 SXM (80 GB HBM3) at position `index`, with a deterministic UUID and
    /// the bus id of that position on an HGX board.
    pub fn h100(index: u32) -> Self {
        let bus = HGX_BUSES[index as usize % HGX_BUSES.len()];
        Self {
            index,
            uuid: format!(
                "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                0xe3a0_0000_u32 | index,
                0x7ace,
                0x4e00 | (index & 0xff),
                0x8000 | (index & 0xfff),
                0x0000_e11a_0000_u64 | u64::from(index)
            ),
            name: "NVIDIA H100 80GB HBM3 (emulated)".to_owned(),
            minor: index,
            pci_bus_id: format!("00000000:{bus:02X}:00.0"),
            pci_device_id: 0x2330_10DE,
            pci_subsystem_id: 0x16C1_10DE,
            memory_total_bytes: 80 * 1024 * 1024 * 1024,
            idle_w: 70.0,
            max_w: 700.0,
            energy_offset_mj: 1_000_000_000 + u64::from(index) * 123_456_789,
        }
    }

    /// `count` emulated H100s with indices `0..count`.
    pub fn h100s(count: u32) -> Vec<Self> {
        (0..count).map(Self::h100).collect()
    }

    /// The PCI bus number parsed from [`GpuSpec::pci_bus_id`] (`None` if malformed).
    pub fn pci_bus(&self) -> Option<u32> {
        let mut parts = self.pci_bus_id.split(':');
        let _domain = parts.next()?;
        u32::from_str_radix(parts.next()?, 16).ok()
    }

    /// The PCI domain parsed from [`GpuSpec::pci_bus_id`] (`None` if malformed).
    pub fn pci_domain(&self) -> Option<u32> {
        u32::from_str_radix(self.pci_bus_id.split(':').next()?, 16).ok()
    }

    /// The PCI device number parsed from [`GpuSpec::pci_bus_id`] (`None` if malformed).
    pub fn pci_device(&self) -> Option<u32> {
        let dev = self.pci_bus_id.split(':').nth(2)?.split('.').next()?;
        u32::from_str_radix(dev, 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h100_identity_looks_like_nvml() {
        let s = GpuSpec::h100(3);
        assert!(s.uuid.starts_with("GPU-"));
        assert_eq!(s.uuid.len(), 4 + 36);
        assert_eq!(s.uuid.matches('-').count(), 5);
        assert_eq!(s.pci_bus_id, "00000000:66:00.0");
        assert_eq!(s.pci_bus(), Some(0x66));
        assert_eq!(s.pci_domain(), Some(0));
        assert_eq!(s.pci_device(), Some(0));
        assert_ne!(GpuSpec::h100(0).uuid, GpuSpec::h100(1).uuid);
    }
}
