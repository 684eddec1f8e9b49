//! Small sysfs/procfs readers shared by the CPU sources (RAPL, powercap, the model).

use std::path::Path;

use super::PowerError;

/// Reads a small sysfs/procfs file, trimmed.
pub(super) fn read_trimmed(path: &Path) -> Result<String, PowerError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| PowerError::Sysfs {
            path: path.to_owned(),
            source,
        })
}

/// Parses a kernel CPU list (`0,36`, `0-3,8-11`, `5`); `None` on malformed input.
pub(super) fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((lo, hi)) = part.split_once('-') {
            let lo: usize = lo.trim().parse().ok()?;
            let hi: usize = hi.trim().parse().ok()?;
            if hi < lo {
                return None;
            }
            cpus.extend(lo..=hi);
        } else {
            cpus.push(part.parse().ok()?);
        }
    }
    Some(cpus)
}

/// The physical package of `cpu` (`<sysfs_root>/devices/system/cpu/cpuN/topology/
/// physical_package_id`); `None` when the file is missing or unreadable (VMs often lack it).
pub(super) fn package_of(sysfs_root: &Path, cpu: usize) -> Option<u32> {
    let path = sysfs_root.join(format!(
        "devices/system/cpu/cpu{cpu}/topology/physical_package_id"
    ));
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_list_parsing() {
        assert_eq!(parse_cpu_list("0,36"), Some(vec![0, 36]));
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(
            parse_cpu_list("0-2,8,10-11"),
            Some(vec![0, 1, 2, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
    }
}
