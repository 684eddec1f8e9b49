use std::{path::Path, time::Duration};

use nvml_wrapper::error::NvmlError;

use super::{
    is_permanent,
    period::period_from_changes,
    stamp::{StampClock, TRUST_NS, UTIL_TRUST_NS, stamp_to_monotonic},
    unavailable,
};
use crate::power::PowerError;

const MS: u64 = 1_000_000;

#[test]
fn period_is_the_median_interval_in_whole_ms() {
    // One interval stretched by a late read does not move the median.
    let changes = [0, 100 * MS + 300_000, 200 * MS, 330 * MS, 430 * MS];
    assert_eq!(
        period_from_changes(&changes),
        Some(Duration::from_millis(100))
    );
    // Even count: midpoint of the middle two.
    let changes = [0, 20 * MS, 40 * MS, 62 * MS, 84 * MS];
    assert_eq!(
        period_from_changes(&changes),
        Some(Duration::from_millis(21))
    );
}

#[test]
fn period_needs_two_intervals() {
    assert_eq!(period_from_changes(&[]), None);
    assert_eq!(period_from_changes(&[5 * MS, 105 * MS]), None);
    assert!(period_from_changes(&[0, 100 * MS, 200 * MS]).is_some());
    // Sub-millisecond "periods" are not believed.
    assert_eq!(period_from_changes(&[0, 100, 200, 300]), None);
}

#[test]
fn wall_clock_stamps_convert_to_monotonic() {
    let mono = 5_000 * MS;
    let real = 1_700_000_000_000 * MS;
    // 3 ms before now on the wall clock is 3 ms before now on the monotonic clock.
    let stamp_us = (real - 3 * MS) / 1000;
    assert_eq!(
        stamp_to_monotonic(stamp_us, mono, real, TRUST_NS),
        Some((mono - 3 * MS, StampClock::Wall))
    );
    // Slightly in the future (clock skew between the driver and us) stays consistent.
    let stamp_us = (real + 2 * MS) / 1000;
    assert_eq!(
        stamp_to_monotonic(stamp_us, mono, real, TRUST_NS),
        Some((mono + 2 * MS, StampClock::Wall))
    );
}

#[test]
fn monotonic_stamps_pass_and_strays_are_refused() {
    let mono = 5_000 * MS;
    let real = 1_700_000_000_000 * MS;
    assert_eq!(
        stamp_to_monotonic((mono - 7 * MS) / 1000, mono, real, TRUST_NS),
        Some((mono - 7 * MS, StampClock::Monotonic))
    );
    // Two seconds old: not trusted for power, fine for buffered utilisation samples.
    let old_us = (mono - 2_000 * MS) / 1000;
    assert_eq!(stamp_to_monotonic(old_us, mono, real, TRUST_NS), None);
    assert_eq!(
        stamp_to_monotonic(old_us, mono, real, UTIL_TRUST_NS),
        Some((mono - 2_000 * MS, StampClock::Monotonic))
    );
    assert_eq!(stamp_to_monotonic(0, mono, real, TRUST_NS), None);
}

#[test]
fn permanent_errors_are_the_unsupported_ones() {
    assert!(is_permanent(&NvmlError::NotSupported));
    assert!(is_permanent(&NvmlError::FunctionNotFound));
    assert!(!is_permanent(&NvmlError::GpuLost));
    assert!(!is_permanent(&NvmlError::Unknown));
    assert!(!is_permanent(&NvmlError::NotFound));
}

#[test]
fn missing_library_message_says_what_to_do() {
    let e = unavailable(
        Some(Path::new("/nowhere/libnvidia-ml.so.1")),
        &NvmlError::DriverNotLoaded,
    );
    let PowerError::NvmlUnavailable(msg) = e else {
        panic!("wrong variant");
    };
    assert!(msg.contains("/nowhere/libnvidia-ml.so.1"), "{msg}");
    assert!(msg.contains("driver is not loaded"), "{msg}");
}
